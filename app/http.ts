/**
 * The process's one HTTP server: GET /healthz (alive), GET /readyz (ready to serve),
 * GET /metrics (Prometheus); every other request goes to the REST API when the process serves
 * it, else answers 404 in PROTOCOL's error shape. WebSocket upgrades are the gateway's.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Metrics } from '../observability/metrics.ts';

export interface Readiness {
  /** undefined when ready, else why not. */
  notReadyBecause(): Promise<string | undefined>;
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

export function createHttpServer(metrics: Metrics, readiness: Readiness, api?: Handler): Server {
  return createServer((request: IncomingMessage, response: ServerResponse) => {
    const path = pathOf(request);
    if (path === undefined) {
      return json(response, 400, {
        error: { code: 'bad_request', message: 'the request target is not a valid URL' },
      });
    }
    if (api && !OPS_PATHS.has(path)) return api(request, response);
    void handle(path, request, response).catch(() => {
      if (!response.headersSent)
        json(response, 500, { error: { code: 'internal', message: 'internal error' } });
    });
  });

  async function handle(
    path: string,
    request: IncomingMessage,
    response: ServerResponse,
  ): Promise<void> {
    if (!OPS_PATHS.has(path)) {
      return json(response, 404, { error: { code: 'not_found', message: `no route for ${path}` } });
    }
    if (request.method !== 'GET' && request.method !== 'HEAD') {
      return json(response, 405, {
        error: { code: 'bad_request', message: `${request.method} is not allowed here` },
      });
    }
    if (path === '/healthz') return json(response, 200, { status: 'ok' });
    if (path === '/readyz') {
      const reason = await readiness.notReadyBecause();
      return reason === undefined
        ? json(response, 200, { status: 'ready' })
        : json(response, 503, { error: { code: 'unavailable', message: reason } });
    }
    const body = await metrics.text();
    response.writeHead(200, { 'content-type': metrics.contentType });
    response.end(body);
  }
}

function json(response: ServerResponse, status: number, body: unknown): void {
  response.writeHead(status, { 'content-type': 'application/json; charset=utf-8' });
  response.end(JSON.stringify(body));
}
