/**
 * /v1/auth: register, login, refresh (rotation with reuse detection), logout, and verify (for
 * a reverse proxy's auth sub-request).
 */
import { randomUUID } from 'node:crypto';
import { Router } from '@koa/router';
import type { Logger } from '../../observability/logger.ts';
import {
  AccountExistsError,
  type Account,
  type AccountRepository,
  type RefreshTokenRepository,
} from '../../state/accounts/port.ts';
import { requireUser, type AuthenticatedState } from '../auth-middleware.ts';
import { HttpError } from '../errors.ts';
import type { AccountOutbox } from '../account-outbox.ts';
import type { AddressLimit, LoginThrottle } from '../throttles.ts';
import type { PasswordHasher } from '../passwords.ts';
import { hashRefreshToken, type TokenService } from '../tokens.ts';
import { loginBody, refreshBody, registerBody, validate } from '../validation.ts';

export interface AuthRoutesDeps {
  accounts: AccountRepository;
  refreshTokens: RefreshTokenRepository;
  tokens: TokenService;
  passwords: PasswordHasher;
  outbox: AccountOutbox;
  logger: Logger;
  now: () => number;
  loginThrottle: LoginThrottle;
  registrationLimit: AddressLimit;
  refreshLimit: AddressLimit;
}

/** What register, login and refresh answer. */
export interface TokenPair {
  userId: string;
  accessToken: string;
  refreshToken: string;
  expiresIn: number;
}

export function authRouter(deps: AuthRoutesDeps): Router {
  const { accounts, refreshTokens, tokens, passwords, logger, now, loginThrottle } = deps;
  const router = new Router({ prefix: '/v1/auth' });

  /** A new refresh token in the family (a new family per login), and an access token. */
  async function issue(userId: string, familyId: string): Promise<TokenPair> {
    const refresh = tokens.newRefreshToken();
    await refreshTokens.store(refresh.hash, { userId, familyId, expiresAt: refresh.expiresAt });
    const { accessToken, expiresIn } = await tokens.issueAccessToken(userId);
    return { userId, accessToken, refreshToken: refresh.refreshToken, expiresIn };
  }

  const taken = (userId: string) => new HttpError(409, `the username "${userId}" is taken`);

  router.post('/register', async (ctx) => {
    const { username: userId, password, displayName } = validate(registerBody, ctx.request.body);
    await deps.registrationLimit.attempt(ctx.ip);
    // Checked first only to spare a hash; create() is what refuses a concurrent twin.
    if ((await accounts.get(userId)) !== undefined) throw taken(userId);
    const account: Account = { userId, displayName: displayName ?? userId, createdAt: now() };
    try {
      await accounts.create({ ...account, passwordHash: await passwords.hash(password) });
    } catch (error) {
      if (error instanceof AccountExistsError) throw taken(userId);
      throw error;
    }
    // Published before answering when the log takes it: once registered, the user exists for
    // everyone. When it does not, the account is in the outbox, which publishes it later.
    await deps.outbox.publish(account);
    logger.info({ userId }, 'account registered');
    ctx.status = 201;
    ctx.body = await issue(userId, randomUUID());
  });

  router.post('/login', async (ctx) => {
    const { username: userId, password } = validate(loginBody, ctx.request.body);
    await loginThrottle.attempt(userId, ctx.ip);
    let verified: boolean;
    try {
      const account = await accounts.get(userId);
      verified = await passwords.verify(password, account?.passwordHash);
    } catch (error) {
      // A 503 while the hashes are busy, or a 500: no failure, and a client retrying on
      // Retry-After must not lock itself out.
      await loginThrottle.unchecked(userId, ctx.ip);
      throw error;
    }
    // One answer for an unknown user and a wrong password, in the same time.
    if (!verified) {
      logger.info({ userId, address: ctx.ip }, 'login refused');
      throw new HttpError(401, 'wrong username or password');
    }
    await loginThrottle.succeeded(userId, ctx.ip);
    ctx.body = await issue(userId, randomUUID());
  });

  router.post('/refresh', async (ctx) => {
    const { refreshToken } = validate(refreshBody, ctx.request.body);
    await deps.refreshLimit.attempt(ctx.ip);
    const outcome = await refreshTokens.consume(hashRefreshToken(refreshToken));
    if (outcome?.state === 'reused') {
      // Two holders of one token: the thief or the user, we cannot tell; log both out.
      await refreshTokens.revokeFamily(outcome.grant.familyId);
      logger.warn(
        { userId: outcome.grant.userId, familyId: outcome.grant.familyId },
        'refresh token reused: its family is revoked',
      );
    }
    if (outcome?.state !== 'consumed' || outcome.grant.expiresAt <= now())
      throw new HttpError(401, 'the refresh token is not valid; log in again');
    ctx.body = await issue(outcome.grant.userId, outcome.grant.familyId);
  });

  router.post('/logout', async (ctx) => {
    const { refreshToken } = validate(refreshBody, ctx.request.body);
    await refreshTokens.revoke(hashRefreshToken(refreshToken));
    ctx.status = 204;
  });

  router.get('/verify', requireUser(tokens), (ctx) => {
    ctx.set('X-User-Id', (ctx.state as AuthenticatedState).userId);
    ctx.status = 204;
  });

  return router;
}
