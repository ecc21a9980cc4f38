/**
 * The REST API of PROTOCOL.md as a Koa application; the caller mounts `app.callback()` on its
 * HTTP server (or `app.listen`s). Middleware, outermost first: errors, CORS, no caching, JSON
 * body, then a router per resource.
 */
import Koa, { type Middleware } from 'koa';
import cors from '@koa/cors';
import { Router } from '@koa/router';
import type { Logger } from '../observability/logger.ts';
import type { AccountRepository, RefreshTokenRepository } from '../state/accounts/port.ts';
import type { AccountOutbox } from './account-outbox.ts';
import { jsonBody } from './body.ts';
import { RequestDrain } from './drain.ts';
import { errorHandler } from './errors.ts';
import {
  AddressLimit,
  DEFAULT_REGISTRATIONS_PER_HOUR,
  LoginThrottle,
  REFRESHES_PER_HOUR,
  type LoginLimits,
} from './throttles.ts';
import { PasswordHasher } from './passwords.ts';
import { authRouter } from './routes/auth.ts';
import type { Metrics } from '../observability/metrics.ts';
import { notBuiltRouter } from './routes/not-built.ts';
import { meRouter } from './routes/me.ts';
import type { TokenService } from './tokens.ts';

export interface ApiDeps {
  accounts: AccountRepository;
  refreshTokens: RefreshTokenRepository;
  tokens: TokenService;
  /** Publishes public accounts to the compacted `chat.accounts` topic. */
  outbox: AccountOutbox;
  logger: Logger;
  /** Defaults to scrypt at DEFAULT_PASSWORD_COST; tests pass a cheaper one. */
  passwords?: PasswordHasher;
  /** Milliseconds since the epoch. */
  now?: () => number;
  /** Failed-login limits (DEFAULT_LOGIN_LIMITS unless given). */
  loginLimits?: LoginLimits;
  /** Registrations per client address per hour (DEFAULT_REGISTRATIONS_PER_HOUR; 0: none). */
  registrationsPerHour?: number;
  /** Refreshes per client address per hour (REFRESHES_PER_HOUR; 0: none). */
  refreshesPerHour?: number;
  /** Take the client's address from X-Forwarded-For (Koa's `proxy`): only behind a proxy. */
  trustProxy?: boolean;
  /** Closed by the process as it stops, before the stores (none: never refuses). */
  drain?: RequestDrain;
  /** Where the API's request and outbox metrics go (none: not measured). */
  metrics?: Metrics;
  /** Bytes of request bodies held at once, across requests (BODIES_IN_MEMORY_BYTES unless given). */
  bodyBudgetBytes?: number;
  /** Of it, what one client address may hold (BODIES_IN_MEMORY_PER_CLIENT_BYTES unless given). */
  bodyBudgetPerClientBytes?: number;
}

/**
 * Every answer, timed and counted by method, route and status: the route as the router knows
 * it (`/v1/groups/:groupId`), never the raw path, so that the series stay few.
 */
function measured(metrics: Metrics): Middleware {
  const seconds = metrics.histogram(
    'kchat_api_request_seconds',
    'REST API requests, from arrival to answer, by method, route and status',
    [0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5],
    ['method', 'route', 'status'],
  );
  return async (ctx, next) => {
    const started = performance.now();
    try {
      await next();
    } finally {
      const route = (ctx as { _matchedRoute?: unknown })._matchedRoute;
      seconds.observe(
        {
          method: ctx.method,
          route: typeof route === 'string' ? route : 'unmatched',
          status: String(ctx.status),
        },
        (performance.now() - started) / 1000,
      );
    }
  };
}

/**
 * Browser clients on any origin may call the API, as the Matrix client-server API asks of its
 * servers: the credential is a bearer token the page holds, never a cookie the browser would
 * add by itself, so another site's page can do nothing with it that it could not do without
 * CORS. Errors carry the headers too, so that a page can read why it was refused.
 */
export const CORS: cors.Options = {
  origin: '*',
  allowMethods: ['GET', 'HEAD', 'POST', 'PUT', 'PATCH', 'DELETE'],
  allowHeaders: ['Authorization', 'Content-Type', 'Content-Encoding'],
  exposeHeaders: ['Retry-After', 'WWW-Authenticate', 'X-User-Id'],
  maxAge: 600,
};

/** Answers carry tokens and private data: no cache may keep them (RFC 6749 §5.1). */
const noStore: Middleware = async (ctx, next) => {
  ctx.set('Cache-Control', 'no-store');
  await next();
};

export function createApi(deps: ApiDeps): Koa {
  const logger = deps.logger.child({ component: 'api' });
  const resolved = {
    ...deps,
    logger,
    passwords: deps.passwords ?? new PasswordHasher(),
    now: deps.now ?? Date.now,
    loginThrottle: new LoginThrottle(deps.loginLimits),
    registrationLimit: new AddressLimit(
      'registrations',
      deps.registrationsPerHour ?? DEFAULT_REGISTRATIONS_PER_HOUR,
    ),
    refreshLimit: new AddressLimit('refreshes', deps.refreshesPerHour ?? REFRESHES_PER_HOUR),
  };
  const routes = new Router();
  routes.use(authRouter(resolved).routes());
  routes.use(meRouter(resolved).routes());
  routes.use(notBuiltRouter().routes());

  const app = new Koa();
  app.proxy = deps.trustProxy ?? false;
  // One proxy hop: the client's address is the last of X-Forwarded-For, the one the proxy saw
  // (what comes before it is whatever the client sent).
  app.maxIpsCount = 1;
  // Only what escapes errorHandler arrives here (a socket error while answering).
  app.on('error', (error: unknown) => logger.warn({ err: error }, 'http error'));
  if (deps.metrics) {
    app.use(measured(deps.metrics));
    const { accounts } = deps;
    deps.metrics.gauge(
      'kchat_api_outbox_pending',
      'Accounts stored but not yet confirmed on chat.accounts (at most 1,001 counted): registered users the gateways cannot see yet',
      async (gauge) => gauge.set((await accounts.unpublished(1001)).length),
    );
  }
  app
    .use(errorHandler(logger))
    .use(cors(CORS))
    .use(noStore)
    .use((deps.drain ?? new RequestDrain()).middleware())
    .use(jsonBody(deps.bodyBudgetBytes, deps.bodyBudgetPerClientBytes))
    .use(routes.routes())
    .use(routes.allowedMethods());
  return app;
}
