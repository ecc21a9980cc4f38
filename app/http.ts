/**
 * The operational HTTP face every process has: GET /healthz (alive), GET /readyz (ready to
 * serve), GET /metrics (Prometheus). The REST API and WebSocket gateway mount beside it.
 */
import { createServer, type IncomingMessage, type Server, type ServerResponse } from 'node:http';
import type { Metrics } from '../observability/metrics.ts';

export interface Readiness {
  /** undefined when ready, else why not. */
  notReadyBecause(): Promise<string | undefined>;
}

export function createOpsServer(metrics: Metrics, readiness: Readiness): Server {
  return createServer((request: IncomingMessage, response: ServerResponse) => {
    void handle(request, response).catch(() => {
      if (!response.headersSent)
        json(response, 500, { error: { code: 'internal', message: 'internal error' } });
    });
  });

  async function handle(request: IncomingMessage, response: ServerResponse): Promise<void> {
    const path = new URL(request.url ?? '/', 'http://localhost').pathname;
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
    if (path === '/metrics') {
      const body = await metrics.text();
      response.writeHead(200, { 'content-type': metrics.contentType });
      response.end(body);
      return;
    }
    json(response, 404, { error: { code: 'not_found', message: `no route for ${path}` } });
  }
}

function json(response: ServerResponse, status: number, body: unknown): void {
  response.writeHead(status, { 'content-type': 'application/json; charset=utf-8' });
  response.end(JSON.stringify(body));
}
