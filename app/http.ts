/**
 * The process's one HTTP server: GET /healthz (alive), GET /readyz (ready to serve),
 * GET /metrics (Prometheus); every other request goes to the REST API when the process serves
 * it, else answers 404 in PROTOCOL's error shape. WebSocket upgrades are the gateway's.
 */
import { createServer, ServerResponse, type IncomingMessage, type Server } from 'node:http';
import type { Socket } from 'node:net';
import type { Duplex } from 'node:stream';
import type { Metrics } from '../observability/metrics.ts';

export interface Readiness {
  /** undefined when ready, else why not. */
  notReadyBecause(): Promise<string | undefined>;
  /**
   * undefined while the process can serve, now or once ready; else why it never will again
   * without a restart: /healthz then answers 503, so that a supervisor restarts it.
   */
  deadBecause?(): string | undefined;
}

type Handler = (request: IncomingMessage, response: ServerResponse) => void;

const OPS_PATHS = new Set(['/healthz', '/readyz', '/metrics']);

/**
 * The path of a request's target; undefined when the target is not a URL at all (Node's parser
 * lets `GET http://[/ HTTP/1.1` through, and `new URL` throws on it).
 */
export function pathOf(request: IncomingMessage): string | undefined {
  try {
    return new URL(request.url ?? '/', 'http://localhost').pathname;
  } catch {
    return undefined;
  }
}

/** Whether a request with an Upgrade header asks for a WebSocket (a token in the list). */
export const wantsWebSocket = (request: IncomingMessage) =>
  (request.headers.upgrade ?? '').split(',').some((t) => t.trim().toLowerCase() === 'websocket');

/**
 * Answers, as though its Upgrade header were absent (RFC 9110 §7.8 lets a server ignore it), a
 * request that asks to upgrade to something other than a WebSocket: `curl --http2` on an
 * http:// URL sends `Upgrade: h2c`. Once an 'upgrade' listener exists, Node hands every such
 * request to it, and its socket with it. Its parser stops at the headers, so a body cannot be
 * read: a request with one is refused with 400.
 */
export function answerAsPlainRequest(server: Server, request: IncomingMessage, socket: Duplex) {
  socket.on('error', () => socket.destroy());
  const response = new ServerResponse(request);
  response.shouldKeepAlive = false;
  response.assignSocket(socket as Socket);
  // Closed once the answer is written, as Node closes a `Connection: close` one: the socket is
  // no longer the server's (closeAllConnections at shutdown would not see it), and a peer that
  // never closes its side must not hold it open.
  response.once('finish', () => {
    response.detachSocket(socket as Socket);
    (socket as Socket).destroySoon();
  });
  const length = request.headers['content-length'];
  if (request.headers['transfer-encoding'] !== undefined || (length && length !== '0')) {
    return json(response, 400, {
      error: {
        code: 'bad_request',
        message: `a request with a body cannot ask to upgrade to ${request.headers.upgrade}`,
      },
    });
  }
  if (!request.readableEnded) request.push(null); // no body, and nothing more from the parser
  server.emit('request', request, response);
}

/**
 * What Node's parser refuses before a request exists (headers over 16 KiB, a malformed
 * Content-Length, a request line that is no HTTP), answered in PROTOCOL's error shape instead
 * of Node's bare status line; then the connection closes, as Node's own answer closes it.
 */
export function answerClientError(error: NodeJS.ErrnoException, socket: Duplex): void {
  // A peer gone, or a response of ours already on its way: nothing can be answered.
  const answering = (socket as Duplex & { _httpMessage?: unknown })._httpMessage;
  if (error.code === 'ECONNRESET' || !socket.writable || answering) return void socket.destroy();
  const [status, reason, code] =
    error.code === 'HPE_HEADER_OVERFLOW'
      ? [431, 'Request Header Fields Too Large', 'too_large']
      : error.code === 'ERR_HTTP_REQUEST_TIMEOUT'
        ? [408, 'Request Timeout', 'bad_request']
        : [400, 'Bad Request', 'bad_request'];
  const message =
    status === 431
      ? 'the request headers are over 16 KiB'
      : status === 408
        ? 'the request took too long to arrive'
        : 'the request is not valid HTTP/1.1';
  const body = JSON.stringify({ error: { code, message } });
  socket.end(
    `HTTP/1.1 ${status} ${reason}\r\nContent-Type: application/json; charset=utf-8\r\n` +
      `Cache-Control: no-store\r\nContent-Length: ${Buffer.byteLength(body)}\r\n` +
      `Connection: close\r\n\r\n${body}`,
  );
}

/**
 * How long a request may take to arrive: its headers, and all of it with its body. Node's
 * defaults (60 s and 300 s) let a client hold a connection and a body buffer up to 1 MiB for five
 * minutes by sending slowly; a 1 MiB body needs only 35 KB/s to arrive in 30 s. Past them the
 * answer is 408 (answerClientError). WebSocket connections are not requests: only their
 * handshake's headers are timed.
 */
export const REQUEST_TIMEOUTS = { headersMs: 20_000, requestMs: 30_000, checkEveryMs: 5_000 };

export interface HttpServerOptions {
  /** The REST API, for every path but the operational ones. */
  api?: Handler;
  /**
   * Where the gateway takes WebSocket handshakes: a plain request there answers 426 with
   * `Upgrade: websocket` (RFC 9110 §15.5.22), not a 404 that reads as "no WebSocket here".
   */
  webSocketPath?: string;
  timeouts?: typeof REQUEST_TIMEOUTS;
}

export function createHttpServer(
  metrics: Metrics,
  readiness: Readiness,
  { api, webSocketPath, timeouts = REQUEST_TIMEOUTS }: HttpServerOptions = {},
): Server {
  const options = {
    headersTimeout: timeouts.headersMs,
    requestTimeout: timeouts.requestMs,
    connectionsCheckingInterval: timeouts.checkEveryMs,
  };
  const server = createServer(options, (request: IncomingMessage, response: ServerResponse) => {
    const path = pathOf(request);
    if (path === undefined) {
      return json(response, 400, {
        error: { code: 'bad_request', message: 'the request target is not a valid URL' },
      });
    }
    if (path === webSocketPath) {
      request.resume();
      return json(
        response,
        426,
        {
          error: {
            code: 'bad_request',
            message: `${path} takes a WebSocket handshake (Upgrade: websocket)`,
          },
        },
        { upgrade: 'websocket', connection: 'Upgrade' },
      );
    }
    if (api && !OPS_PATHS.has(path)) return api(request, response);
    void handle(path, request, response).catch(() => {
      if (!response.headersSent)
        json(response, 500, { error: { code: 'internal', message: 'internal error' } });
    });
  });
  server.on('clientError', answerClientError);
  return server;

  async function handle(
    path: string,
    request: IncomingMessage,
    response: ServerResponse,
  ): Promise<void> {
    if (!OPS_PATHS.has(path)) {
      return json(response, 404, { error: { code: 'not_found', message: `no route for ${path}` } });
    }
    if (request.method !== 'GET' && request.method !== 'HEAD') {
      return json(
        response,
        405,
        { error: { code: 'bad_request', message: `${request.method} is not allowed here` } },
        { allow: 'GET, HEAD' },
      );
    }
    if (path === '/healthz') {
      const dead = readiness.deadBecause?.();
      return dead === undefined
        ? json(response, 200, { status: 'ok' })
        : json(response, 503, { error: { code: 'unavailable', message: dead } });
    }
    if (path === '/readyz') {
      const reason = readiness.deadBecause?.() ?? (await readiness.notReadyBecause());
      return reason === undefined
        ? json(response, 200, { status: 'ready' })
        : json(response, 503, { error: { code: 'unavailable', message: reason } });
    }
    const body = await metrics.text();
    response.writeHead(200, { 'content-type': metrics.contentType, 'cache-control': 'no-store' });
    response.end(body);
  }
}

/** A JSON answer, never cached. */
export function json(
  response: ServerResponse,
  status: number,
  body: unknown,
  headers: Record<string, string> = {},
): void {
  response.writeHead(status, {
    'content-type': 'application/json; charset=utf-8',
    'cache-control': 'no-store',
    ...headers,
  });
  response.end(JSON.stringify(body));
}
