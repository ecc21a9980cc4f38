/**
 * Errors as values with a status, handled in one place: a handler throws an HttpError, and
 * errorHandler turns it (or anything else) into PROTOCOL.md's shape,
 * `{"error": {"code", "message", "field"?}}`.
 */
import type { Middleware } from 'koa';
import type { Logger } from '../observability/logger.ts';
import { PasswordsBusyError } from './passwords.ts';

export type ErrorCode =
  | 'bad_request'
  | 'unauthorized'
  | 'forbidden'
  | 'not_found'
  | 'conflict'
  | 'too_large'
  | 'rate_limited'
  | 'internal'
  | 'unavailable';

const CODE_OF_STATUS: Record<number, ErrorCode> = {
  400: 'bad_request',
  401: 'unauthorized',
  403: 'forbidden',
  404: 'not_found',
  409: 'conflict',
  413: 'too_large',
  429: 'rate_limited',
  500: 'internal',
  503: 'unavailable',
};

/** Statuses PROTOCOL.md does not name (405, 415...) are client mistakes: bad_request. */
const codeOf = (status: number): ErrorCode =>
  CODE_OF_STATUS[status] ?? (status < 500 ? 'bad_request' : 'internal');

export class HttpError extends Error {
  readonly code: ErrorCode;
  /** The request field at fault, for a 400. */
  readonly field: string | undefined;
  readonly headers: Record<string, string>;

  constructor(
    readonly status: number,
    message: string,
    options: { field?: string; headers?: Record<string, string>; cause?: unknown } = {},
  ) {
    super(message, { cause: options.cause });
    this.name = 'HttpError';
    this.code = codeOf(status);
    this.field = options.field;
    this.headers = options.headers ?? {};
  }
}

/**
 * The outermost middleware. Unknown routes (nothing answered) become 404, a known path with
 * another method 405; errors that are not HttpErrors are 500 `internal`, logged here and never
 * shown to the client.
 */
export function errorHandler(logger: Logger): Middleware {
  return async (ctx, next) => {
    try {
      await next();
      if (ctx.body === undefined || ctx.body === null) {
        if (ctx.status === 404) throw new HttpError(404, `no route for ${ctx.method} ${ctx.path}`);
        // The router's allowedMethods answers 405, or 501 for a method it does not know.
        if (ctx.status === 405 || ctx.status === 501)
          throw new HttpError(405, `${ctx.method} is not allowed on ${ctx.path}`, {
            headers: ctx.response.get('Allow') ? { Allow: ctx.response.get('Allow') } : {},
          });
      }
    } catch (error) {
      const httpError = asHttpError(error);
      // A 503 is the process stopping or too busy, not a fault: a warning.
      if (httpError.status === 503)
        logger.warn(
          { method: ctx.method, path: ctx.path, reason: httpError.message },
          'unavailable',
        );
      else if (httpError.status >= 500)
        logger.error({ err: error, method: ctx.method, path: ctx.path }, 'request failed');
      ctx.status = httpError.status;
      ctx.set(httpError.headers);
      // Every 401 says how to authenticate (RFC 9110 §15.5.2), the login's too.
      if (httpError.status === 401 && !ctx.response.get('WWW-Authenticate'))
        ctx.set('WWW-Authenticate', 'Bearer realm="kchat"');
      ctx.body = {
        error: {
          code: httpError.code,
          message: httpError.message,
          ...(httpError.field === undefined ? {} : { field: httpError.field }),
        },
      };
    }
  };
}

function asHttpError(error: unknown): HttpError {
  if (error instanceof HttpError) return error;
  if (error instanceof PasswordsBusyError)
    return new HttpError(503, 'too many logins at once; try again', {
      headers: { 'Retry-After': '1' },
    });
  // http-errors (from Koa and its middleware) mark the ones fit for a client as `expose`.
  const { status, expose, message } = (error ?? {}) as {
    status?: unknown;
    expose?: unknown;
    message?: unknown;
  };
  if (typeof status === 'number' && status >= 400 && status < 500 && expose === true)
    return new HttpError(status, typeof message === 'string' ? message : 'bad request');
  return new HttpError(500, 'internal error');
}
