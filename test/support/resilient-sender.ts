/**
 * A chat client that keeps sending through crashes, as a real client does: it keeps at most
 * `window` sends in flight, resends any send not answered by `sent` (same `id`: a retry, never
 * a new message) after an error frame, a timeout or a reconnect, and reconnects to the next
 * gateway when its socket closes.
 *
 * It keeps a logical clock of what it saw: the step of each message's first send and of its
 * `sent`, to check the order guarantee afterwards: a message acknowledged before another was
 * first sent comes before it in the recipient's inbox.
 */
import { WebSocket } from 'ws';

const RESEND_AFTER_MS = 5000;
const RETRY_AFTER_ERROR_MS = 300;
const RECONNECT_DELAY_MS = 200;

export interface SenderOptions {
  /** Gateways' base URLs, tried in turn from `first`. */
  urls: () => string[];
  token: string;
  deviceId: string;
  to: string;
  /** Messages 1..total, with body {n}; without it, messages until `finish()`. */
  total?: number;
  /** New messages a second at most, counted from run(); without it, as fast as the window. */
  rate?: number;
  window: number;
  /** A tag on each id, so that two senders' ids never meet. */
  tag: string;
}

export class ResilientSender {
  /** The logical step of each message's first send and of its first `sent`. */
  readonly firstSentAt = new Map<number, number>();
  readonly acknowledgedAt = new Map<number, number>();
  /** When (ms since the epoch) each message's first `sent` came. */
  readonly acknowledgedWall = new Map<number, number>();
  readonly errors = new Map<string, number>();
  reconnects = 0;
  /** Sends of an id already sent once (retries). */
  resends = 0;
  private step = 0;
  private next = 1;
  /** Unanswered sends: n → when it may be sent again. */
  private readonly pending = new Map<number, number>();
  private ws: WebSocket | undefined;
  private ready = false;
  private urlIndex = 0;
  private stopped = false;
  private finishing = false;

  constructor(readonly options: SenderOptions) {}

  get acknowledged(): number {
    return this.acknowledgedAt.size;
  }

  /** Messages sent at least once. */
  get issued(): number {
    return this.next - 1;
  }

  /** Sends no new message; run() ends once every one sent is acknowledged. */
  finish(): void {
    this.finishing = true;
  }

  /** Sends until every message is acknowledged, or throws at the deadline. */
  async run(deadlineMs: number): Promise<void> {
    const { window, rate } = this.options;
    const total = this.options.total ?? Infinity;
    const started = Date.now();
    for (;;) {
      if (this.stopped) return;
      const last = this.finishing ? this.issued : total;
      if (this.acknowledgedAt.size >= last) break;
      if (Date.now() > deadlineMs)
        throw new Error(
          `${this.options.tag}: ${this.acknowledgedAt.size} of ${last} acknowledged at the deadline; errors ${JSON.stringify(Object.fromEntries(this.errors))}`,
        );
      if (!this.ready) {
        await this.connect();
        continue;
      }
      const now = Date.now();
      for (const [n, due] of this.pending) if (due <= now) this.send(n);
      const allowed = rate === undefined ? total : Math.floor(((now - started) / 1000) * rate);
      while (
        !this.finishing &&
        this.next <= Math.min(total, allowed) &&
        this.pending.size < window
      ) {
        this.firstSentAt.set(this.next, ++this.step);
        this.send(this.next++);
      }
      await sleep(5);
    }
    this.close();
  }

  close(): void {
    this.stopped = true;
    this.ws?.terminate();
  }

  private send(n: number): void {
    if (this.pending.has(n)) this.resends++;
    this.pending.set(n, Date.now() + RESEND_AFTER_MS);
    this.ws!.send(
      JSON.stringify({
        type: 'send',
        id: `${this.options.tag}-${n}`,
        to: this.options.to,
        body: { n },
      }),
    );
  }

  private async connect(): Promise<void> {
    const urls = this.options.urls();
    const url = urls[this.urlIndex++ % urls.length]!;
    const ws = new WebSocket(
      `${url.replace('http', 'ws')}/v1/ws?deviceId=${this.options.deviceId}`,
      {
        headers: { authorization: `Bearer ${this.options.token}` },
      },
    );
    const opened = await new Promise<boolean>((resolve) => {
      ws.on('message', (data) => {
        const frame = JSON.parse(data.toString()) as { type: string; id?: string; code?: string };
        if (frame.type === 'ready') return resolve(true);
        this.onFrame(frame);
      });
      ws.once('error', () => resolve(false));
      ws.once('close', () => resolve(false));
    });
    if (!opened) {
      ws.terminate();
      await sleep(RECONNECT_DELAY_MS);
      return;
    }
    this.ws = ws;
    this.ready = true;
    if (this.firstSentAt.size > 0) this.reconnects++;
    ws.once('close', () => {
      if (this.ws === ws) this.ready = false;
    });
    // Everything unanswered goes again on the new connection.
    for (const n of this.pending.keys()) this.pending.set(n, 0);
  }

  private onFrame(frame: { type: string; id?: string; code?: string }): void {
    const n = Number(frame.id?.slice(this.options.tag.length + 1));
    if (!frame.id?.startsWith(`${this.options.tag}-`) || !Number.isInteger(n)) return;
    if (frame.type === 'sent') {
      this.pending.delete(n);
      if (!this.acknowledgedAt.has(n)) {
        this.acknowledgedAt.set(n, ++this.step);
        this.acknowledgedWall.set(n, Date.now());
      }
    } else if (frame.type === 'error') {
      this.errors.set(frame.code ?? '?', (this.errors.get(frame.code ?? '?') ?? 0) + 1);
      if (this.pending.has(n)) this.pending.set(n, Date.now() + RETRY_AFTER_ERROR_MS);
    }
  }
}

/**
 * Checks the order guarantee on a recipient's inbox (message numbers in seq order): whenever
 * message a was acknowledged before message b was first sent, a comes first. Answers the
 * violations found (empty when none).
 */
export function orderViolations(inbox: number[], sender: ResilientSender): string[] {
  const position = new Map(inbox.map((n, i) => [n, i]));
  const violations: string[] = [];
  for (const [a, ackedAt] of sender.acknowledgedAt) {
    for (const [b, firstSent] of sender.firstSentAt) {
      if (ackedAt < firstSent && position.get(a)! > position.get(b)!)
        violations.push(`${a} (acknowledged before ${b} was sent) comes after it`);
    }
  }
  return violations.slice(0, 10);
}

function sleep(ms: number): Promise<void> {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
