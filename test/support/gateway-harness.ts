/**
 * What the gateway's in-process end-to-end tests share: access tokens signed with a test secret
 * and their verifier, a WebSocket client that keeps every frame it receives, a gateway served
 * on a real http.Server of 127.0.0.1, and a topic's records read back decoded.
 */
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo } from 'node:net';
import { jwtVerify, SignJWT } from 'jose';
import type { WebSocket } from 'ws';
import { createGateway, type Gateway, type GatewayDeps } from '../../gateway/gateway.ts';
import type { Log } from '../../log/port.ts';
import type { TopicCodec } from '../../schemas/codec.ts';
import { Metrics } from '../../observability/metrics.ts';

const secret = new TextEncoder().encode('a test secret of thirty-two bytes or more');

export async function tokenFor(userId: string, expiresAt: number | string = '1h'): Promise<string> {
  return new SignJWT({})
    .setProtectedHeader({ alg: 'HS256' })
    .setSubject(userId)
    .setIssuedAt()
    .setExpirationTime(expiresAt)
    .sign(secret);
}

export async function verifyAccessToken(token: string): Promise<string> {
  const { payload } = await jwtVerify(token, secret, { algorithms: ['HS256'] });
  if (typeof payload.sub !== 'string') throw new Error('no subject');
  return payload.sub;
}

/** A decoded record as plain objects (avsc decodes records into class instances). */
export const plain = <T>(value: unknown): T => JSON.parse(JSON.stringify(value)) as T;

export type Frame = { type: string } & Record<string, unknown>;

/** A WebSocket client that keeps every frame it receives, read in order with `next`. */
export class TestClient {
  readonly frames: Frame[] = [];
  readonly closed: Promise<{ code: number; reason: string }>;
  private cursor = 0;
  private wake: (() => void) | undefined;

  constructor(readonly ws: WebSocket) {
    ws.on('message', (data) => {
      this.frames.push(JSON.parse(data.toString()) as Frame);
      this.wake?.();
    });
    ws.on('error', () => undefined); // seen as `closed`
    this.closed = new Promise((resolve) =>
      ws.once('close', (code, reason) => resolve({ code, reason: reason.toString() })),
    );
  }

  send(frame: object | string): void {
    this.ws.send(typeof frame === 'string' ? frame : JSON.stringify(frame));
  }

  async next(timeoutMs = 5000): Promise<Frame> {
    const deadline = Date.now() + timeoutMs;
    while (this.cursor >= this.frames.length) {
      if (Date.now() > deadline) {
        throw new Error(`no frame within ${timeoutMs} ms after ${JSON.stringify(this.frames)}`);
      }
      await new Promise<void>((resolve) => {
        this.wake = resolve;
        setTimeout(resolve, 50);
      });
    }
    return this.frames[this.cursor++]!;
  }

  async request(frame: object | string): Promise<Frame> {
    this.send(frame);
    return this.next();
  }

  /** A ping answered by a pong: the connection still works. */
  async alive(): Promise<void> {
    assert.deepEqual(await this.request({ type: 'ping', id: 'alive?' }), {
      type: 'pong',
      id: 'alive?',
    });
  }

  close(): void {
    this.ws.close();
  }
}

export interface Running {
  gateway: Gateway;
  server: Server;
  base: string;
  metrics: Metrics;
  stop(): Promise<void>;
}

/** Creates and starts a gateway, and serves it on a free port of 127.0.0.1. */
export async function serveGateway(deps: GatewayDeps): Promise<Running> {
  const metrics = deps.metrics ?? new Metrics();
  const gateway = createGateway({ ...deps, metrics });
  await gateway.start();
  const server = createServer((_request, response) => response.writeHead(404).end());
  gateway.attach(server);
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as AddressInfo;
  let stopped = false;
  return {
    gateway,
    server,
    base: `ws://127.0.0.1:${port}`,
    metrics,
    async stop() {
      if (stopped) return;
      stopped = true;
      await gateway.close();
      server.closeAllConnections();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** Every record of a topic, decoded. */
export async function decodedRecords<T>(
  log: Log,
  topic: string,
  codec: TopicCodec<unknown>,
): Promise<{ key: string; value: T | null; partition: number }[]> {
  const marks = await log.admin.watermarks(topic);
  const out: { key: string; value: T | null; partition: number }[] = [];
  const starts = marks.map((m) => ({ partition: m.partition, from: m.low }));
  for await (const batch of log.readPartitions(topic, starts)) {
    for (const record of batch.records) {
      out.push({
        key: record.key?.toString('utf8') ?? '',
        value: record.value === null ? null : plain<T>(await codec.decode(record.value)),
        partition: batch.partition,
      });
    }
  }
  return out;
}
