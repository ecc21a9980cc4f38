/**
 * Request bodies: JSON whatever the Content-Type (the API speaks nothing else), at most 1 MiB
 * after any Content-Encoding is undone, read for POST, PUT and PATCH only. The bytes must be
 * UTF-8 (RFC 8259): read leniently, two different byte strings could decode to one password.
 * A `__proto__` key is an unknown field like any other, and is dropped.
 *
 * Bodies are held in memory while they are read, so the API bounds what all requests together
 * may hold (`BODIES_IN_MEMORY_BYTES`), and what one client address may hold of it
 * (`BODIES_IN_MEMORY_PER_CLIENT_BYTES`): a request whose body would go over the whole is
 * answered 503 `unavailable`, over its address's share 429 `rate_limited`, both with
 * `Retry-After` and before any of it is read, instead of letting many slow uploads of 1 MiB
 * each grow the process without end. A request reserves its Content-Length, or the whole
 * 1 MiB when it has none (chunked) or is compressed. Past that, a body nesting deeper than
 * MAX_BODY_NESTING or holding more than MAX_BODY_VALUES values is refused before it is parsed.
 */
import type { IncomingMessage } from 'node:http';
import type { Readable } from 'node:stream';
import bourne from '@hapi/bourne';
import inflate from 'inflation';
import type { Middleware } from 'koa';
import getRawBody from 'raw-body';
import { HttpError } from './errors.ts';
import { clientOf } from './throttles.ts';

declare module 'koa' {
  interface Request {
    /** The parsed JSON body (POST, PUT, PATCH), for the handlers to validate. */
    body?: unknown;
  }
}

export const MAX_BODY_BYTES = 1024 * 1024;
/** What every request body being read at once may hold together: 64 bodies of 1 MiB. */
export const BODIES_IN_MEMORY_BYTES = 64 * MAX_BODY_BYTES;
/**
 * What the bodies of one client address (an IPv6 /64) may hold of it at once: one address
 * holding uploads open cannot take the budget from everyone else (found by a security review:
 * 64 idle uploads that declared 1 MiB each made every other POST answer 503).
 */
export const BODIES_IN_MEMORY_PER_CLIENT_BYTES = 4 * MAX_BODY_BYTES;
/** Deeper nesting, or more values, is no body of this API, and costs long to parse. */
export const MAX_BODY_NESTING = 64;
export const MAX_BODY_VALUES = 20_000;

const READ_METHODS = new Set(['POST', 'PUT', 'PATCH']);
const utf8 = new TextDecoder('utf-8', { fatal: true });

export function jsonBody(
  budgetBytes = BODIES_IN_MEMORY_BYTES,
  perClientBytes = BODIES_IN_MEMORY_PER_CLIENT_BYTES,
): Middleware {
  let reserved = 0;
  const byClient = new Map<string, number>();
  return async (ctx, next) => {
    if (!READ_METHODS.has(ctx.method)) return next();
    const length = ctx.get('content-length');
    const identity = (ctx.get('content-encoding') || 'identity') === 'identity';
    // No Content-Length and no Transfer-Encoding: no body (RFC 9112 §6.3).
    const chunked = ctx.get('transfer-encoding') !== '';
    // A declared length over the limit reserves nothing: raw-body answers it 413 unread.
    const reserve =
      length && identity
        ? Number(length) > MAX_BODY_BYTES
          ? 0
          : Number(length) || 0
        : chunked || length
          ? MAX_BODY_BYTES
          : 0;
    const client = clientOf(ctx.ip);
    const clientHolds = byClient.get(client) ?? 0;
    // A body is read whatever the budget when no other is being read, and whatever its
    // address's share when it is that address's only one.
    const refuse = (status: number, message: string) => {
      ctx.req.resume(); // drained unread, so that the client reads the answer
      return new HttpError(status, message, { headers: { 'Retry-After': '1' } });
    };
    if (reserve > 0 && clientHolds > 0 && clientHolds + reserve > perClientBytes)
      throw refuse(429, 'too many request bodies from this address at once');
    if (reserve > 0 && reserved > 0 && reserved + reserve > budgetBytes)
      throw refuse(503, 'the server is reading too many request bodies; try again soon');
    reserved += reserve;
    if (reserve > 0) byClient.set(client, clientHolds + reserve);
    let bytes: Buffer;
    try {
      bytes = await getRawBody(decoded(ctx.req), {
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
    } finally {
      reserved -= reserve;
      if (reserve > 0) {
        const left = byClient.get(client)! - reserve;
        if (left > 0) byClient.set(client, left);
        else byClient.delete(client);
      }
    }
    ctx.request.body = parse(bytes);
    return next();
  };
}

/**
 * The request as its Content-Encoding says (inflation). A request cut off mid-body ends its
 * decoder too: `inflation` pipes the request into it, and a pipe passes on no abort, so the
 * read of a compressed body whose client went away never ended, and held its share of the
 * bodies' budget for good (found by a review helper).
 */
function decoded(request: IncomingMessage): Readable {
  const stream = inflate(request) as Readable;
  if (stream !== request) {
    request.once('close', () => {
      if (!request.complete)
        stream.destroy(
          Object.assign(new Error('the request was cut off'), {
            status: 400,
            type: 'request.aborted',
          }),
        );
    });
  }
  return stream;
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
    throw new HttpError(400, 'the body must be a JSON object');
  const refusal = shapeRefusal(start);
  if (refusal) throw new HttpError(400, refusal);
  try {
    return bourne.parse(text, { protoAction: 'remove' }) as unknown;
  } catch (error) {
    throw new HttpError(400, 'the body is not valid JSON', { cause: error });
  }
}

/**
 * Why a JSON text is refused before it is parsed: nesting deeper than MAX_BODY_NESTING, or more
 * than MAX_BODY_VALUES values (counted by their separators), outside strings. One pass, a few
 * milliseconds for 1 MiB; parsing half a million nested arrays took 100 to 270 ms of the event
 * loop, and a gzip body of 1 KB inflates to that.
 */
function shapeRefusal(text: string): string | undefined {
  let depth = 0;
  let separators = 0;
  let inString = false;
  for (let i = 0; i < text.length; i++) {
    const c = text.charCodeAt(i);
    if (inString) {
      if (c === 0x5c)
        i++; // a backslash: the next character is escaped
      else if (c === 0x22) inString = false;
    } else if (c === 0x22) {
      inString = true;
    } else if (c === 0x7b || c === 0x5b) {
      if (++depth > MAX_BODY_NESTING)
        return `the body nests deeper than ${MAX_BODY_NESTING} levels`;
    } else if (c === 0x7d || c === 0x5d) {
      depth--;
    } else if (c === 0x2c || c === 0x3a) {
      if (++separators > MAX_BODY_VALUES)
        return `the body holds more than ${MAX_BODY_VALUES} values`;
    }
  }
  return undefined;
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
