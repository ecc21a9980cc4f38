/** A WebSocket chat client for end-to-end tests: it keeps every frame it receives. */
import assert from 'node:assert/strict';
import { WebSocket } from 'ws';
import { eventually } from './log-helpers.ts';

export type Frame = { type: string; [field: string]: unknown };

/** Registers an account through the REST API at `apiUrl`; answers its access token. */
export async function register(apiUrl: string, username: string): Promise<string> {
  const response = await fetch(`${apiUrl}/v1/auth/register`, {
    method: 'POST',
    headers: { 'content-type': 'application/json' },
    body: JSON.stringify({ username, password: 'a good password' }),
  });
  assert.equal(response.status, 201, await response.clone().text());
  return ((await response.json()) as { accessToken: string }).accessToken;
}

/**
 * A counter or gauge of the process serving `url`, read from its /metrics: the sum of its
 * series whose labels include `labels` (0 when it has none yet).
 */
export async function metric(
  url: string,
  name: string,
  labels: Record<string, string> = {},
): Promise<number> {
  const text = await fetch(`${url}/metrics`).then((r) => r.text());
  let sum = 0;
  for (const line of text.split('\n')) {
    const found = /^(\w+)(?:\{([^}]*)\})? (\S+)$/.exec(line);
    if (!found || found[1] !== name) continue;
    const series = found[2] ?? '';
    if (Object.entries(labels).every(([k, v]) => series.includes(`${k}="${v}"`)))
      sum += Number(found[3]);
  }
  return sum;
}

/**
 * The lines of the /metrics of the process serving `url` that match `pattern` (none when it
 * does not answer): what a failing test or bench prints of a process's state.
 */
export async function metricLines(url: string, pattern: RegExp): Promise<string[]> {
  const text = await fetch(`${url}/metrics`).then(
    (r) => r.text(),
    () => '',
  );
  return text.split('\n').filter((line) => pattern.test(line));
}

export class Client {
  readonly frames: Frame[] = [];
  private constructor(readonly ws: WebSocket) {
    ws.on('message', (data) => this.frames.push(JSON.parse(data.toString()) as Frame));
  }

  static async open(url: string, token: string, deviceId: string): Promise<Client> {
    const ws = new WebSocket(`${url.replace('http', 'ws')}/v1/ws?deviceId=${deviceId}`, {
      headers: { authorization: `Bearer ${token}` },
    });
    const client = new Client(ws);
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => resolve());
      ws.once('error', reject);
    });
    await client.next((f) => f.type === 'ready');
    return client;
  }

  send(frame: Frame): void {
    this.ws.send(JSON.stringify(frame));
  }

  async next(match: (f: Frame) => boolean, timeoutMs = 15_000): Promise<Frame> {
    let found: Frame | undefined;
    await eventually(() => (found = this.frames.find(match)) !== undefined, timeoutMs, 'a frame');
    return found!;
  }

  /** The `message` and `receipt` entries seen so far, by seq. */
  entries(): Frame[] {
    return this.frames.filter((f) => f.type === 'message' || f.type === 'receipt');
  }

  /**
   * Waits until `count` entries have come, or the connection closed, acking as a client does
   * (cumulatively, every `ackEvery` entries); answers the entries.
   */
  async receive(count: number, timeoutMs = 60_000, ackEvery = 50): Promise<Frame[]> {
    let acked = 0;
    await eventually(
      () => {
        const seqs = this.entries().map((f) => f.seq as number);
        const top = seqs[seqs.length - 1] ?? 0;
        if (top >= acked + ackEvery && this.ws.readyState === WebSocket.OPEN) {
          this.send({ type: 'ack', upTo: top });
          acked = top;
        }
        return seqs.length >= count || this.ws.readyState !== WebSocket.OPEN;
      },
      timeoutMs,
      `${count} entries`,
    );
    return this.entries();
  }

  async close(): Promise<void> {
    if (this.ws.readyState === WebSocket.CLOSED) return; // e.g. its server was killed
    const closed = new Promise((resolve) => this.ws.once('close', resolve));
    this.ws.close();
    await closed;
  }
}
