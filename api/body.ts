/**
 * Request bodies: JSON whatever the Content-Type (the API speaks nothing else), at most 1 MiB
 * after any Content-Encoding is undone, read for POST, PUT and PATCH only.
 */
import { bodyParser } from '@koa/bodyparser';
import type { Middleware } from 'koa';
import { HttpError } from './errors.ts';

export const MAX_BODY_BYTES = 1024 * 1024;

export function jsonBody(): Middleware {
  return bodyParser({
    enableTypes: ['json'],
    detectJSON: () => true,
    jsonLimit: MAX_BODY_BYTES,
    onError(error, ctx) {
      // Read and drop what the client is still sending: it then reads our answer instead of a
      // reset, and the connection stays usable (what Node does with any body left unread).
      // Unpiped first: a decoder (gzip, br) it still flows into has stopped reading, and would
      // hold the upload back as soon as its buffer filled.
      ctx.req.unpipe();
      ctx.req.resume();
      throw bodyError(error);
    },
  });
}

function bodyError(error: Error): Error {
  const { status, type } = error as { status?: number; type?: string };
  if (status === 413 || type === 'entity.too.large')
    return new HttpError(413, `the body is over ${MAX_BODY_BYTES} bytes (1 MiB)`);
  if (error instanceof SyntaxError)
    return new HttpError(400, 'the body is not a JSON object', { cause: error });
  // Anything else the client sent wrong: an aborted body, an unknown Content-Encoding...
  if (status !== undefined && status >= 400 && status < 500)
    return new HttpError(400, error.message, { cause: error });
  // zlib's errors (a body that is not gzip, deflate or br as its Content-Encoding says) carry
  // no status, but the fault is the body's.
  const code = (error as { code?: unknown }).code;
  if (typeof code === 'string' && /^(Z_|ERR__ERROR|ERR_BROTLI)/.test(code))
    return new HttpError(400, `the body does not decode as its Content-Encoding says`, {
      cause: error,
    });
  return error;
}
