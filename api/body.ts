/**
 * Request bodies: JSON whatever the Content-Type (the API speaks nothing else), at most 1 MiB
 * after any Content-Encoding is undone, read for POST, PUT and PATCH only. The bytes must be
 * UTF-8 (RFC 8259): read leniently, two different byte strings could decode to one password.
 * A `__proto__` key is an unknown field like any other, and is dropped.
 */
import bourne from '@hapi/bourne';
import inflate from 'inflation';
import type { Middleware } from 'koa';
import getRawBody from 'raw-body';
import { HttpError } from './errors.ts';

declare module 'koa' {
  interface Request {
    /** The parsed JSON body (POST, PUT, PATCH), for the handlers to validate. */
    body?: unknown;
  }
}

export const MAX_BODY_BYTES = 1024 * 1024;

const READ_METHODS = new Set(['POST', 'PUT', 'PATCH']);
const utf8 = new TextDecoder('utf-8', { fatal: true });

export function jsonBody(): Middleware {
  return async (ctx, next) => {
    if (!READ_METHODS.has(ctx.method)) return next();
    let bytes: Buffer;
    try {
      const length = ctx.get('content-length');
      const identity = (ctx.get('content-encoding') || 'identity') === 'identity';
      bytes = await getRawBody(inflate(ctx.req), {
        limit: MAX_BODY_BYTES,
        ...(length && identity ? { length: Number(length) } : {}),
      });
    } catch (error) {
      // Read and drop what the client is still sending: it then reads our answer instead of a
      // reset, and the connection stays usable (what Node does with any body left unread).
      // Unpiped first: a decoder (gzip, br) it still flows into has stopped reading, and would
      // hold the upload back as soon as its buffer filled.
      ctx.req.unpipe();
      ctx.req.resume();
      throw bodyError(error as Error);
    }
    ctx.request.body = parse(bytes);
    return next();
  };
}

/** The body as JSON: an empty one is `{}`; anything but an object or array is refused. */
function parse(bytes: Buffer): unknown {
  let text: string;
  try {
    text = utf8.decode(bytes);
  } catch (error) {
    throw new HttpError(400, 'the body is not valid UTF-8', { cause: error });
  }
  // JSON's whitespace is space, tab, LF and CR (RFC 8259); trimStart takes more, but what it
  // takes besides is no JSON either, and JSON.parse refuses it.
  const start = text.trimStart();
  if (start === '') return {};
  if (start[0] !== '{' && start[0] !== '[')
    throw new HttpError(400, 'the body is not a JSON object');
  try {
    return bourne.parse(text, { protoAction: 'remove' }) as unknown;
  } catch (error) {
    throw new HttpError(400, 'the body is not a JSON object', { cause: error });
  }
}

function bodyError(error: Error): Error {
  const { status, type } = error as { status?: number; type?: string };
  if (status === 413 || type === 'entity.too.large')
    return new HttpError(413, `the body is over ${MAX_BODY_BYTES} bytes (1 MiB)`);
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
