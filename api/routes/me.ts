/** /v1/me: the caller's own account. */
import { Router } from '@koa/router';
import type { AccountRepository } from '../../state/accounts/port.ts';
import { requireUser, type AuthenticatedState } from '../auth-middleware.ts';
import { HttpError } from '../errors.ts';
import type { TokenService } from '../tokens.ts';

export interface MeRoutesDeps {
  accounts: AccountRepository;
  tokens: TokenService;
}

export function meRouter({ accounts, tokens }: MeRoutesDeps): Router {
  const router = new Router({ prefix: '/v1/me' });

  router.get('/', requireUser(tokens), async (ctx) => {
    const { userId } = ctx.state as AuthenticatedState;
    const account = await accounts.get(userId);
    // A valid token for an account that is gone (a data directory reset under the same
    // secret): the client must authenticate again.
    if (account === undefined) throw new HttpError(401, 'the account no longer exists');
    ctx.body = {
      userId: account.userId,
      displayName: account.displayName,
      createdAt: account.createdAt,
    };
  });

  return router;
}
