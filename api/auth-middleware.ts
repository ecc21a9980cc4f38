/**
 * Authenticated routes: `Authorization: Bearer <accessToken>` (RFC 6750), verified by the
 * TokenService; the userId goes to ctx.state.userId. Anything else is a 401 that says how to
 * authenticate (WWW-Authenticate).
 */
import type { Middleware } from 'koa';
import { HttpError } from './errors.ts';
import { InvalidAccessTokenError, type TokenService } from './tokens.ts';

export interface AuthenticatedState {
  userId: string;
}

const BEARER = /^Bearer +([A-Za-z0-9\-._~+/]+=*) *$/i;

/** The token of an `Authorization: Bearer` header, or undefined. */
export function bearerToken(authorization: string | undefined): string | undefined {
  return authorization === undefined ? undefined : BEARER.exec(authorization)?.[1];
}

/** RFC 6750 §3: no error attribute when the request carried no credentials at all. */
function unauthorized(message: string, error?: 'invalid_request' | 'invalid_token'): HttpError {
  const challenge = `Bearer realm="kchat"${error ? `, error="${error}"` : ''}`;
  return new HttpError(401, message, { headers: { 'WWW-Authenticate': challenge } });
}

/** The userId the bearer token of this Authorization header was issued to; else a 401. */
export async function authenticate(
  tokens: TokenService,
  authorization: string | undefined,
): Promise<string> {
  if (!authorization) throw unauthorized('an Authorization: Bearer access token is required');
  const token = bearerToken(authorization);
  if (token === undefined)
    throw unauthorized(
      'the Authorization header must be "Bearer <accessToken>"',
      'invalid_request',
    );
  try {
    return await tokens.verifyAccessToken(token);
  } catch (error) {
    if (error instanceof InvalidAccessTokenError)
      throw unauthorized('the access token is not valid or has expired', 'invalid_token');
    throw error;
  }
}

export function requireUser(tokens: TokenService): Middleware<AuthenticatedState> {
  return async (ctx, next) => {
    ctx.state.userId = await authenticate(tokens, ctx.get('Authorization') || undefined);
    await next();
  };
}
