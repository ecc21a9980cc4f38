/**
 * Chaos: `npm start` (embedded shape) killed with SIGKILL again and again under a steady load
 * of 1:1 sends among several users with several devices each, then checked against PROTOCOL's
 * inbox guarantees.
 *
 * Devices play different parts: `holder` (opened a socket once before any message, then stays
 * offline until the end and never acks: nothing may be pruned, so its final replay is the whole
 * inbox), `acker` (online, acks, each ack confirmed by a ping answered after it), `lazy` (online,
 * never acks), `flaky` (reconnects every few seconds and sends `sync` frames). Senders retry an
 * unanswered send with the same id after a reconnect (some abandon them instead), and now and
 * then resend an id already answered by `sent`.
 *
 * Kills (at most CHAOS_KILLS, default 10), in turn: mid-load, right after a burst of sends,
 * during start-up (stores restoring, before or just after /healthz), during a SIGTERM shutdown,
 * right after every flaky device reconnected and asked for a sync.
 *
 * After the last restart every device connects and acks everything; then:
 * - every user's inbox (the union of what every connection of every device saw) maps each seq to
 *   one entry, and the holder's final replay is exactly seqs 1..N of it;
 * - every send answered by `sent` is in its recipient's and its sender's inbox exactly once,
 *   with the messageId of the `sent`; one never answered, at most once; no unknown messageId;
 * - order: a message answered before another (same sender device and recipient) was first
 *   sent comes first in both inboxes; `sent`/error answers on a connection come in frame order;
 * - no replay on a reconnect goes at or below an ack confirmed before it; the replay after
 *   `ready` and after a `sync` is gapless;
 * - `delivered` receipts: one per message and recipient, only for a message of that sender to
 *   that recipient, and (after the final acks) one for every such message;
 * - /healthz and /readyz answer 200 after each restart; error-level log lines are reported.
 *
 * Env: CHAOS_PORT (a free one), CHAOS_DATA_DIR, CHAOS_KILLS (10), CHAOS_SEED (random; printed,
 * to replay a run), CHAOS_USERS (5), CHAOS_SEND_CHANCE (0.15), TEST_LOG_DIR (where each process
 * life's output goes, and the journal of kills), TEST_LOG_LEVEL (info).
 *
 * Written by a review helper (session 17); 60 kills over six runs found nothing lost,
 * duplicated or out of order. `npm run test:chaos`, about 2.5 minutes; CI runs it.
 */
import assert from 'node:assert/strict';
import { spawn, type ChildProcess } from 'node:child_process';
import { createWriteStream, mkdirSync, rmSync, writeFileSync, type WriteStream } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WebSocket } from 'ws';
import { messageIdFor } from '../../gateway/message-id.ts';
import { register } from '../support/chat-client.ts';
import { freePort } from '../support/process.ts';

const PORT = Number(process.env.CHAOS_PORT ?? (await freePort()));
const DATA_DIR = process.env.CHAOS_DATA_DIR ?? join(tmpdir(), `kchat-chaos-data-${PORT}`);
const LOG_DIR = process.env.TEST_LOG_DIR ?? join(tmpdir(), `kchat-chaos-logs-${PORT}`);
const LOG_LEVEL = process.env.TEST_LOG_LEVEL ?? 'info';
const MAX_KILLS = Number(process.env.CHAOS_KILLS ?? 10);
const SEED = Number(process.env.CHAOS_SEED ?? Math.floor(Math.random() * 1e9));
const USERS = Number(process.env.CHAOS_USERS ?? 5);
const CHAOS_BUDGET_MS = 190_000;
/** Chance per 10 ms turn that a sending device issues a new send. */
const SEND_CHANCE = Number(process.env.CHAOS_SEND_CHANCE ?? 0.15);
const URL_BASE = `http://127.0.0.1:${PORT}`;

// ---- deterministic randomness ----
let rngState = SEED >>> 0 || 1;
function rand(): number {
  // mulberry32
  rngState = (rngState + 0x6d2b79f5) >>> 0;
  let t = rngState;
  t = Math.imul(t ^ (t >>> 15), t | 1);
  t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
  return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
}
const between = (a: number, b: number) => a + Math.floor(rand() * (b - a + 1));
const pick = <T>(xs: T[]): T => xs[Math.floor(rand() * xs.length)]!;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

const t0 = Date.now();
const stamp = () => `+${((Date.now() - t0) / 1000).toFixed(1)}s`;
const journal: string[] = [];
function note(line: string): void {
  const text = `${stamp()} ${line}`;
  journal.push(text);
  if (process.env.CHAOS_VERBOSE !== '0') console.log(text);
}

// ---- the process ----
interface LogLine {
  life: number;
  line: string;
}

class Server {
  life = 0;
  child: ChildProcess | undefined;
  closed: Promise<void> = Promise.resolve();
  out: WriteStream | undefined;
  readonly errorLines: LogLine[] = [];
  private buffer = '';

  spawn(): void {
    this.life++;
    const life = this.life;
    this.out = createWriteStream(join(LOG_DIR, `life-${String(life).padStart(2, '0')}.log`));
    const child = spawn('npm', ['start', '--silent'], {
      cwd: process.cwd(),
      env: {
        ...process.env,
        PORT: String(PORT),
        HOST: '127.0.0.1',
        DATA_DIR,
        RATE_LIMIT_PER_S: '100000',
        LOG_LEVEL,
      },
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    this.child = child;
    const out = this.out;
    const onData = (d: Buffer) => {
      out.write(d);
      this.buffer += d.toString();
      let i: number;
      while ((i = this.buffer.indexOf('\n')) >= 0) {
        const line = this.buffer.slice(0, i);
        this.buffer = this.buffer.slice(i + 1);
        this.scan(life, line);
      }
    };
    child.stdout!.on('data', onData);
    child.stderr!.on('data', onData);
    this.closed = new Promise((resolve) =>
      child.on('close', () => {
        out.end();
        resolve();
      }),
    );
    note(`life ${life}: spawned pid ${child.pid}`);
  }

  private scan(life: number, line: string): void {
    if (!line.trim()) return;
    let level = 0;
    try {
      level = (JSON.parse(line) as { level?: number }).level ?? 0;
    } catch {
      // Not pino: the URL line, or something on stderr (a stack trace).
      if (/error|exception|unhandled|fatal/i.test(line)) level = 50;
    }
    if (level >= 50) this.errorLines.push({ life, line: line.slice(0, 2000) });
  }

  signal(signal: NodeJS.Signals): void {
    if (!this.child?.pid) return;
    try {
      process.kill(-this.child.pid, signal);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ESRCH') throw error;
    }
  }

  async kill(why: string): Promise<void> {
    note(`life ${this.life}: SIGKILL (${why})`);
    this.signal('SIGKILL');
    await this.closed;
  }

  async healthy(timeoutMs = 40_000): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (Date.now() < deadline) {
      const r = await fetch(`${URL_BASE}/healthz`).catch(() => undefined);
      if (r?.status === 200) return true;
      await sleep(50);
    }
    return false;
  }

  async ready(timeoutMs = 40_000): Promise<string | undefined> {
    const deadline = Date.now() + timeoutMs;
    let last = '';
    while (Date.now() < deadline) {
      const r = await fetch(`${URL_BASE}/readyz`).catch(() => undefined);
      if (r?.status === 200) return undefined;
      last = r ? `${r.status} ${await r.text()}` : 'no answer';
      await sleep(100);
    }
    return last;
  }
}

// ---- the clients ----
type Frame = { type: string; [field: string]: unknown };
type Kind = 'holder' | 'acker' | 'lazy' | 'flaky';

interface SendRec {
  device: Device;
  cid: string;
  to: string;
  messageId: string;
  firstStep: number;
  firstConn: number;
  /** Step of the first `sent`. */
  sentStep?: number;
  sentIds: Set<string>;
  attempts: number;
  abandoned: boolean;
}

interface Conn {
  index: number;
  ws: WebSocket;
  ready: boolean;
  openedAtLife: number;
  openedAt: number;
  /** Arrival time of each entry (ms since t0). */
  times: number[];
  /** Acks confirmed / sent before this connection opened. */
  ackConfirmedAtOpen: number;
  ackSentAtOpen: number;
  /** Acks sent (on any connection, this one included) before its first entry came. */
  ackSentAtFirstEntry?: number;
  entries: Frame[];
  /** Index into `entries` where each explicit sync's answer starts, and its `after`. */
  syncs: Array<{ at: number; after: number; top: number }>;
  /** Frame ids of the send frames issued on it, in order, and the ids answered, in order. */
  issued: string[];
  answered: string[];
}

let step = 0;
const violations: string[] = [];
function violation(text: string): void {
  if (violations.length < 400) violations.push(text);
  note(`VIOLATION ${text}`);
}

class Device {
  conns: Conn[] = [];
  current: Conn | undefined;
  wantOnline = false;
  ackSent = 0;
  ackConfirmed = 0;
  topSeen = 0;
  private pings = new Map<string, number>();
  private pingN = 0;
  sends = new Map<string, SendRec>();
  pending = new Set<string>();
  nextN = 1;
  connecting = false;
  lastAttempt = 0;
  /** A flaky device's next forced reconnect. */
  nextFlap = 0;

  constructor(
    readonly user: string,
    readonly deviceId: string,
    readonly kind: Kind,
    readonly token: string,
    readonly sender: boolean,
    readonly abandons: boolean,
  ) {}

  get name(): string {
    return `${this.user}/${this.deviceId}`;
  }

  open(): Conn | undefined {
    return this.current?.ready && this.current.ws.readyState === WebSocket.OPEN
      ? this.current
      : undefined;
  }

  async connect(life: number): Promise<boolean> {
    if (this.connecting) return false;
    this.connecting = true;
    try {
      const ws = new WebSocket(
        `${URL_BASE.replace('http', 'ws')}/v1/ws?deviceId=${this.deviceId}`,
        {
          headers: { authorization: `Bearer ${this.token}` },
        },
      );
      const conn: Conn = {
        index: this.conns.length,
        ws,
        ready: false,
        openedAtLife: life,
        openedAt: Date.now() - t0,
        times: [],
        ackConfirmedAtOpen: this.ackConfirmed,
        ackSentAtOpen: this.ackSent,
        entries: [],
        syncs: [],
        issued: [],
        answered: [],
      };
      ws.on('message', (data) => this.onFrame(conn, JSON.parse(data.toString()) as Frame));
      const ok = await new Promise<boolean>((resolve) => {
        const timer = setTimeout(() => resolve(false), 5000);
        ws.on('message', (data) => {
          if ((JSON.parse(data.toString()) as Frame).type === 'ready') {
            clearTimeout(timer);
            resolve(true);
          }
        });
        ws.once('error', () => resolve(false));
        ws.once('close', () => resolve(false));
      });
      if (!ok) {
        ws.terminate();
        return false;
      }
      this.conns.push(conn);
      this.current = conn;
      return true;
    } finally {
      this.connecting = false;
    }
  }

  close(): void {
    this.current?.ws.terminate();
    this.current = undefined;
  }

  private onFrame(conn: Conn, frame: Frame): void {
    if (frame.type === 'ready') {
      conn.ready = true;
      return;
    }
    if (
      frame.type === 'message' ||
      frame.type === 'receipt' ||
      frame.type === 'rejected' ||
      frame.type === 'group'
    ) {
      if (conn.entries.length === 0) conn.ackSentAtFirstEntry = this.ackSent;
      conn.entries.push(frame);
      conn.times.push(Date.now() - t0);
      observe(this, conn, frame);
      this.topSeen = Math.max(this.topSeen, frame.seq as number);
      return;
    }
    if (frame.type === 'pong') {
      const upTo = this.pings.get(String(frame.id));
      if (upTo !== undefined) {
        this.pings.delete(String(frame.id));
        this.ackConfirmed = Math.max(this.ackConfirmed, upTo);
      }
      return;
    }
    if (frame.type === 'sent' || (frame.type === 'error' && frame.id !== undefined)) {
      const id = String(frame.id);
      conn.answered.push(id);
      const rec = this.sends.get(id);
      if (!rec) {
        if (frame.type === 'error') note(`${this.name}: error ${JSON.stringify(frame)}`);
        return;
      }
      if (frame.type === 'sent') {
        rec.sentIds.add(String(frame.messageId));
        if (frame.messageId !== rec.messageId)
          violation(
            `${this.name} ${id}: sent with messageId ${frame.messageId}, expected ${rec.messageId}`,
          );
        if (rec.sentStep === undefined) rec.sentStep = ++step;
        this.pending.delete(id);
      } else {
        note(`${this.name}: error answer ${JSON.stringify(frame)}`);
      }
      return;
    }
    if (frame.type === 'error') note(`${this.name}: error ${JSON.stringify(frame)}`);
  }

  /** A send frame, first or again. */
  send(conn: Conn, rec: SendRec): void {
    rec.attempts++;
    conn.issued.push(rec.cid);
    conn.ws.send(
      JSON.stringify({
        type: 'send',
        id: rec.cid,
        to: rec.to,
        body: { cid: rec.cid, from: this.name },
      }),
    );
  }

  newSend(conn: Conn, to: string): void {
    const cid = `${this.deviceId}.${this.nextN++}`;
    const rec: SendRec = {
      device: this,
      cid,
      to,
      messageId: messageIdFor(this.user, this.deviceId, cid),
      firstStep: ++step,
      firstConn: conn.index,
      sentIds: new Set(),
      attempts: 0,
      abandoned: false,
    };
    this.sends.set(cid, rec);
    this.pending.add(cid);
    this.send(conn, rec);
  }

  /** After a reconnect: the unanswered sends again, or abandoned for good. */
  resendPending(conn: Conn): void {
    for (const cid of [...this.pending]) {
      const rec = this.sends.get(cid)!;
      if (this.abandons && !rec.abandoned && rec.firstConn < conn.index) {
        rec.abandoned = true;
        this.pending.delete(cid);
        continue;
      }
      this.send(conn, rec);
    }
  }

  ack(conn: Conn): void {
    if (this.topSeen <= this.ackSent) return;
    const upTo = this.topSeen;
    conn.ws.send(JSON.stringify({ type: 'ack', upTo }));
    this.ackSent = upTo;
    const id = `p${this.pingN++}`;
    this.pings.set(id, upTo);
    conn.ws.send(JSON.stringify({ type: 'ping', id }));
  }

  sync(conn: Conn): void {
    const after = between(this.ackConfirmed, Math.max(this.ackConfirmed, this.topSeen));
    conn.syncs.push({ at: conn.entries.length, after, top: this.topSeen });
    conn.ws.send(JSON.stringify({ type: 'sync', after }));
  }
}

// ---- what the users' inboxes hold, as seen ----
interface Seen {
  seq: number;
  type: string;
  messageId: string;
  from?: string;
  to?: string;
  by?: string;
  status?: string;
  cid?: string;
  where: string;
}
const inboxes = new Map<string, Map<number, Seen>>();

function observe(device: Device, conn: Conn, frame: Frame): void {
  const seq = frame.seq as number;
  const seen: Seen = {
    seq,
    type: frame.type,
    messageId: String(frame.messageId),
    ...(frame.from !== undefined ? { from: String(frame.from) } : {}),
    ...(frame.to !== undefined ? { to: String(frame.to) } : {}),
    ...(frame.by !== undefined ? { by: String(frame.by) } : {}),
    ...(frame.status !== undefined ? { status: String(frame.status) } : {}),
    ...((frame.body as { cid?: string } | undefined)?.cid !== undefined
      ? { cid: (frame.body as { cid: string }).cid }
      : {}),
    where: `${device.name}#${conn.index}`,
  };
  let inbox = inboxes.get(device.user);
  if (!inbox) inboxes.set(device.user, (inbox = new Map()));
  const before = inbox.get(seq);
  if (!before) {
    inbox.set(seq, seen);
    return;
  }
  const same = (a: Seen) =>
    `${a.type}|${a.messageId}|${a.by ?? ''}|${a.status ?? ''}|${a.cid ?? ''}`;
  if (same(before) !== same(seen))
    violation(
      `${device.user} seq ${seq}: two different entries: ${JSON.stringify(before)} and ${JSON.stringify(seen)}`,
    );
}

// ---- the test ----
describe('chaos: SIGKILL again and again under load (npm start, embedded shape)', function () {
  this.timeout(330_000);
  const server = new Server();
  const devices: Device[] = [];
  const users: string[] = [];

  before(async () => {
    rmSync(DATA_DIR, { recursive: true, force: true });
    mkdirSync(LOG_DIR, { recursive: true });
    note(
      `seed ${SEED}, port ${PORT}, data ${DATA_DIR}, logs ${LOG_DIR}, at most ${MAX_KILLS} kills`,
    );
  });

  after(async function () {
    for (const d of devices) d.close();
    server.signal('SIGKILL');
    await server.closed;
    writeFileSync(join(LOG_DIR, 'journal.txt'), journal.join('\n') + '\n');
    // The data of a failed run is kept, to look into (probe it with the embedded log).
    const failed = this.test?.parent?.tests.some((t) => t.state === 'failed');
    if (!failed && !process.env.CHAOS_DATA_DIR) rmSync(DATA_DIR, { recursive: true, force: true });
  });

  it('keeps every `sent` message once, in order, gapless, through repeated SIGKILLs', async () => {
    server.spawn();
    assert.ok(await server.healthy(), 'first start');
    for (let u = 0; u < USERS; u++) {
      const user = `chaos${u}`;
      users.push(user);
      const token = await register(URL_BASE, user);
      // Every user: a holder, an acker that sends, a flaky that sends; some a lazy one too.
      devices.push(new Device(user, 'holder', 'holder', token, false, false));
      devices.push(new Device(user, 'ack', 'acker', token, true, u % 3 === 2));
      devices.push(new Device(user, 'flaky', 'flaky', token, true, u % 2 === 1));
      if (u % 2 === 0) devices.push(new Device(user, 'lazy', 'lazy', token, u % 4 === 0, false));
    }
    const ready = await server.ready();
    assert.equal(ready, undefined, `readyz: ${ready}`);
    // Every holder opens a socket once, before any message: from then on it holds back pruning.
    for (const d of devices.filter((d) => d.kind === 'holder')) {
      assert.ok(await d.connect(server.life), `${d.name} connects`);
    }
    await sleep(1500);
    for (const d of devices.filter((d) => d.kind === 'holder')) d.close();
    for (const d of devices.filter((d) => d.kind !== 'holder')) d.wantOnline = true;

    // ---- the load: runs until stopped ----
    let loadOn = true;
    let burstAsked = false;
    let flapAllAsked = false;
    const WINDOW = 8;
    const load = (async () => {
      let lastAck = 0;
      while (loadOn) {
        const now = Date.now();
        for (const d of devices) {
          if (!d.wantOnline) continue;
          const conn = d.open();
          if (!conn) {
            if (!d.connecting && now - d.lastAttempt > 200) {
              d.lastAttempt = now;
              void d.connect(server.life).then((ok) => {
                if (ok) {
                  const c = d.open()!;
                  d.resendPending(c);
                  if (d.kind === 'flaky' && rand() < 0.5) d.sync(c);
                  d.nextFlap = Date.now() + between(1500, 4000);
                }
              });
            }
            continue;
          }
          if (d.sender) {
            const others = users.filter((u) => u !== d.user);
            // A steady load, not a flood: about 15 new sends a second a device.
            if (d.pending.size < WINDOW && rand() < SEND_CHANCE) d.newSend(conn, pick(others));
            // Now and then a retry of an id already answered: same messageId, no new entry.
            if (rand() < 0.01) {
              const answered = [...d.sends.values()].filter((r) => r.sentStep !== undefined);
              if (answered.length > 0) d.send(conn, pick(answered));
            }
          }
          if (now - lastAck > 300 && (d.kind === 'acker' || (d.kind === 'flaky' && rand() < 0.5)))
            d.ack(conn);
          if (d.kind === 'flaky' && (now > d.nextFlap || flapAllAsked)) {
            if (rand() < 0.5) {
              d.close(); // reconnects on the next turn
            } else {
              d.sync(conn);
              d.nextFlap = now + between(1500, 4000);
            }
          }
        }
        flapAllAsked = false;
        if (now - lastAck > 300) lastAck = now;
        if (burstAsked) {
          burstAsked = false;
          for (const d of devices.filter((d) => d.sender)) {
            const conn = d.open();
            if (!conn) continue;
            const others = users.filter((u) => u !== d.user);
            for (let i = 0; i < 40; i++) d.newSend(conn, pick(others));
          }
        }
        await sleep(10);
      }
    })();

    // ---- the kills ----
    let kills = 0;
    const modes = ['mid-load', 'burst', 'startup', 'sigterm', 'flap', 'startup-healthz'] as const;
    const chaosDeadline = Date.now() + CHAOS_BUDGET_MS;
    let modeIndex = between(0, modes.length - 1);
    const restart = async () => {
      server.spawn();
      const healthy = await server.healthy();
      if (!healthy) violation(`life ${server.life}: /healthz not 200 within 40 s`);
      const notReady = await server.ready();
      if (notReady) violation(`life ${server.life}: /readyz not 200 within 40 s: ${notReady}`);
      note(`life ${server.life}: healthy and ready`);
    };
    await sleep(between(1000, 3000));
    while (kills < MAX_KILLS && Date.now() < chaosDeadline) {
      const mode = modes[modeIndex++ % modes.length]!;
      const sentBefore = devices.reduce(
        (n, d) => n + [...d.sends.values()].filter((r) => r.sentStep !== undefined).length,
        0,
      );
      switch (mode) {
        case 'mid-load':
          await sleep(between(200, 3000));
          await server.kill('mid-load');
          kills++;
          break;
        case 'burst': {
          burstAsked = true;
          while (burstAsked) await sleep(1);
          await sleep(between(0, 60));
          await server.kill('right after a burst of sends');
          kills++;
          break;
        }
        case 'sigterm':
          await sleep(between(500, 2000));
          note(`life ${server.life}: SIGTERM`);
          server.signal('SIGTERM');
          await sleep(between(0, 400));
          await server.kill('during the SIGTERM shutdown');
          kills++;
          break;
        case 'flap':
          flapAllAsked = true;
          while (flapAllAsked) await sleep(1);
          await sleep(between(20, 300));
          await server.kill('right after the flaky devices reconnected and synced');
          kills++;
          break;
        case 'startup':
        case 'startup-healthz': {
          // A kill now, then one during the next start-up.
          await sleep(between(300, 1500));
          await server.kill(`mid-load, before a start-up kill`);
          kills++;
          if (kills >= MAX_KILLS) break;
          server.spawn();
          if (mode === 'startup') {
            await sleep(between(300, 2500));
            await server.kill('during start-up');
          } else {
            await server.healthy();
            await sleep(between(0, 300));
            await server.kill('just after /healthz, while tasks restore');
          }
          kills++;
          break;
        }
      }
      const sentAfter = devices.reduce(
        (n, d) => n + [...d.sends.values()].filter((r) => r.sentStep !== undefined).length,
        0,
      );
      note(
        `kill ${kills} (${mode}): ${sentAfter} sends answered so far (+${sentAfter - sentBefore})`,
      );
      await restart();
      await sleep(between(1500, 4000));
    }
    loadOn = false;
    await load;
    note(`chaos over: ${kills} kills, ${server.life} lives`);

    // ---- the end: everything again, every device on, every entry acked ----
    const finalDeadline = Date.now() + 90_000;
    for (const d of devices) d.wantOnline = true;
    // Holders first, on their own: their replay must be the whole inbox.
    for (const d of devices.filter((d) => d.kind === 'holder')) {
      while (!(await d.connect(server.life)) && Date.now() < finalDeadline) await sleep(200);
    }
    for (const d of devices.filter((d) => d.kind !== 'holder')) {
      if (d.open()) continue;
      while (!(await d.connect(server.life)) && Date.now() < finalDeadline) await sleep(200);
    }
    for (const d of devices) {
      const c = d.open();
      if (!c) {
        violation(`${d.name}: no connection at the end`);
        continue;
      }
      d.resendPending(c);
    }
    // Until every retried send is answered.
    while (Date.now() < finalDeadline && devices.some((d) => d.pending.size > 0)) await sleep(100);
    for (const d of devices)
      if (d.pending.size > 0)
        violation(`${d.name}: ${d.pending.size} sends never answered at the end`);
    // Ack everything until nothing new comes for 4 s (receipts come from the acks), and every
    // holder has had the whole inbox as its other devices saw it.
    let quietSince = Date.now();
    let lastTotal = -1;
    const holdersBehind = () =>
      devices
        .filter((d) => d.kind === 'holder')
        .some(
          (d) =>
            (d.conns.at(-1)?.entries.length ?? 0) <
            Math.max(0, ...(inboxes.get(d.user)?.keys() ?? [])),
        );
    while (Date.now() < finalDeadline && (Date.now() - quietSince < 4000 || holdersBehind())) {
      for (const d of devices) {
        const c = d.open();
        if (c) d.ack(c);
      }
      const total = devices.reduce(
        (n, d) => n + d.conns.reduce((m, c) => m + c.entries.length, 0),
        0,
      );
      if (total !== lastTotal) {
        lastTotal = total;
        quietSince = Date.now();
      }
      await sleep(200);
    }

    // ---- the checks ----
    const allSends = devices.flatMap((d) => [...d.sends.values()]);
    const byMessageId = new Map(allSends.map((r) => [r.messageId, r]));
    let checkedMessages = 0;
    for (const user of users) {
      const inbox = inboxes.get(user) ?? new Map<number, Seen>();
      const top = Math.max(0, ...inbox.keys());
      // Gapless: every seq 1..top was seen by someone.
      const missing: number[] = [];
      for (let s = 1; s <= top; s++) if (!inbox.has(s)) missing.push(s);
      if (missing.length > 0)
        violation(
          `${user}: seqs never seen by any device: ${missing.slice(0, 20).join(',')} (of ${top})`,
        );
      // The holder's final replay: the whole inbox, 1..top, in order, once.
      const holder = devices.find((d) => d.user === user && d.kind === 'holder')!;
      const last = holder.conns[holder.conns.length - 1];
      const seqs = (last?.entries ?? []).map((f) => f.seq as number);
      const firstRun = seqs.slice(0, top);
      const expected = Array.from({ length: top }, (_, i) => i + 1);
      if (JSON.stringify(firstRun) !== JSON.stringify(expected)) {
        const firstBad = firstRun.findIndex((s, i) => s !== i + 1);
        violation(
          `${user}/holder final replay is not 1..${top}: ${firstRun.length} entries, first off at index ${firstBad}: ${JSON.stringify(firstRun.slice(Math.max(0, firstBad - 3), firstBad + 5))}`,
        );
      }
      // Each message once; receipts once per (message, by).
      const messageSeqs = new Map<string, number[]>();
      const receiptSeqs = new Map<string, number[]>();
      for (const e of inbox.values()) {
        if (e.type === 'message') {
          const list = messageSeqs.get(e.messageId) ?? [];
          list.push(e.seq);
          messageSeqs.set(e.messageId, list);
          const rec = byMessageId.get(e.messageId);
          if (!rec)
            violation(
              `${user} seq ${e.seq}: message ${e.messageId} was never sent by anyone (${JSON.stringify(e)})`,
            );
          else if (e.from !== rec.device.user || e.to !== rec.to || e.cid !== rec.cid)
            violation(
              `${user} seq ${e.seq}: message fields ${JSON.stringify(e)} do not match the send ${rec.device.name} ${rec.cid} to ${rec.to}`,
            );
          else if (user !== rec.to && user !== rec.device.user)
            violation(`${user} seq ${e.seq}: holds a message of ${rec.device.user} to ${rec.to}`);
        } else if (e.type === 'receipt') {
          if (e.status !== 'delivered') continue;
          const key = `${e.messageId}|${e.by}`;
          const list = receiptSeqs.get(key) ?? [];
          list.push(e.seq);
          receiptSeqs.set(key, list);
          const rec = byMessageId.get(e.messageId);
          if (!rec || rec.device.user !== user || rec.to !== e.by)
            violation(
              `${user} seq ${e.seq}: delivered receipt for ${e.messageId} by ${e.by} matches no message of ${user} to ${e.by}`,
            );
        } else {
          violation(`${user} seq ${e.seq}: unexpected entry ${JSON.stringify(e)}`);
        }
      }
      for (const [mid, list] of messageSeqs)
        if (list.length > 1) {
          const rec = byMessageId.get(mid);
          violation(
            `${user}: message ${mid} (${rec?.device.name} ${rec?.cid} to ${rec?.to}, sent ${rec?.sentStep !== undefined ? 'answered' : 'never answered'}, ${rec?.attempts} attempts) twice in the inbox, seqs ${list.join(',')}`,
          );
        }
      for (const [key, list] of receiptSeqs)
        if (list.length > 1)
          violation(
            `${user}: delivered receipt ${key} ${list.length} times, seqs ${list.join(',')}`,
          );
      (inboxes as Map<string, unknown>).set(`${user}#messages`, messageSeqs);
      (inboxes as Map<string, unknown>).set(`${user}#receipts`, receiptSeqs);
    }
    const seqOf = (user: string, mid: string): number[] =>
      ((inboxes as Map<string, unknown>).get(`${user}#messages`) as Map<string, number[]>).get(
        mid,
      ) ?? [];
    const receiptsOf = (user: string, key: string): number[] =>
      ((inboxes as Map<string, unknown>).get(`${user}#receipts`) as Map<string, number[]>).get(
        key,
      ) ?? [];
    let answered = 0;
    let abandoned = 0;
    for (const rec of allSends) {
      checkedMessages++;
      const atRecipient = seqOf(rec.to, rec.messageId);
      const atSender = seqOf(rec.device.user, rec.messageId);
      const what = `${rec.device.name} ${rec.cid} to ${rec.to} (${rec.messageId}, ${rec.attempts} attempts)`;
      if (rec.sentStep !== undefined) {
        answered++;
        if (atRecipient.length !== 1)
          violation(
            `${what}: answered by sent, but ${atRecipient.length} times in the recipient's inbox`,
          );
        if (atSender.length !== 1)
          violation(
            `${what}: answered by sent, but ${atSender.length} times in the sender's inbox`,
          );
        if (atRecipient.length === 1) {
          const receipts = receiptsOf(rec.device.user, `${rec.messageId}|${rec.to}`);
          if (receipts.length !== 1)
            violation(`${what}: ${receipts.length} delivered receipts after every device acked it`);
        }
      } else {
        abandoned++;
        if (atRecipient.length > 1 || atSender.length > 1)
          violation(
            `${what}: never answered, yet ${atRecipient.length}/${atSender.length} times in the recipient's/sender's inbox`,
          );
        if (atRecipient.length !== atSender.length)
          violation(
            `${what}: never answered; ${atRecipient.length} in the recipient's inbox but ${atSender.length} in the sender's (one produce)`,
          );
      }
      if (rec.sentIds.size > 1)
        violation(`${what}: sent answers with different messageIds ${[...rec.sentIds].join(',')}`);
    }
    // Order: a answered before b was first sent (same device, same recipient) comes first.
    let orderPairs = 0;
    for (const d of devices) {
      const recs = [...d.sends.values()].filter((r) => r.sentStep !== undefined);
      const byTo = new Map<string, SendRec[]>();
      for (const r of recs) byTo.set(r.to, [...(byTo.get(r.to) ?? []), r]);
      for (const [to, list] of byTo) {
        for (const inboxOwner of [to, d.user]) {
          const pos = new Map(list.map((r) => [r.cid, seqOf(inboxOwner, r.messageId)[0] ?? -1]));
          const sortedBySent = [...list].sort((a, b) => a.sentStep! - b.sentStep!);
          const sortedByFirst = [...list].sort((a, b) => a.firstStep - b.firstStep);
          // For each b, every a answered before b's first send must come before b.
          let bad = 0;
          let i = 0;
          let maxPosBefore = -1;
          let maxCid = '';
          for (const b of sortedByFirst) {
            while (i < sortedBySent.length && sortedBySent[i]!.sentStep! < b.firstStep) {
              const p = pos.get(sortedBySent[i]!.cid)!;
              if (p > maxPosBefore) {
                maxPosBefore = p;
                maxCid = sortedBySent[i]!.cid;
              }
              i++;
            }
            orderPairs++;
            if (maxPosBefore > pos.get(b.cid)! && bad++ < 3)
              violation(
                `order: in ${inboxOwner}'s inbox, ${d.name} ${maxCid} (answered before ${b.cid} was first sent) is at seq ${maxPosBefore}, after ${b.cid} at ${pos.get(b.cid)}`,
              );
          }
        }
      }
      // Answers in frame order on each connection.
      for (const c of d.conns) {
        const n = c.answered.length;
        if (JSON.stringify(c.answered) !== JSON.stringify(c.issued.slice(0, n))) {
          const k = c.answered.findIndex((id, j) => id !== c.issued[j]);
          violation(
            `${d.name}#${c.index}: answers out of frame order at ${k}: issued ${JSON.stringify(c.issued.slice(k, k + 4))}, answered ${JSON.stringify(c.answered.slice(k, k + 4))}`,
          );
        }
      }
    }
    // Replays: above the confirmed ack, gapless; syncs: every seq above `after` up to the top then.
    for (const d of devices) {
      for (const c of d.conns) {
        const firstSync = c.syncs[0]?.at ?? c.entries.length;
        const replay = c.entries.slice(0, firstSync).map((f) => f.seq as number);
        if (replay.length > 0) {
          if (replay[0]! <= c.ackConfirmedAtOpen)
            violation(
              `${d.name}#${c.index}: after ready, seq ${replay[0]} came again though its ack up to ${c.ackConfirmedAtOpen} was confirmed before the reconnect`,
            );
          // The device may ack what it saw on its previous connection right after `ready`, and
          // that ack may be applied before the replay: its bound is the ack sent by then.
          if (d.kind !== 'holder' && replay[0]! > (c.ackSentAtFirstEntry ?? c.ackSentAtOpen) + 1) {
            const later = c.entries
              .map((f) => f.seq as number)
              .filter((q) => q > c.ackSentAtOpen && q < replay[0]!);
            violation(
              `${d.name}#${c.index}: after ready, the first seq is ${replay[0]} but the device had acked only up to ${c.ackSentAtFirstEntry} (at open ${c.ackSentAtOpen}, confirmed ${c.ackConfirmedAtOpen}); opened at ${c.openedAt} ms in life ${c.openedAtLife}, first entries at ${c.times.slice(0, 3).join(',')} ms: seqs ${replay.slice(0, 5).join(',')}...${replay[replay.length - 1]} (${replay.length}); of the skipped seqs ${later.length} came later on it; syncs ${JSON.stringify(c.syncs)}; previous conn ${c.index > 0 ? `#${c.index - 1} last seq ${d.conns[c.index - 1]!.entries.at(-1)?.seq} life ${d.conns[c.index - 1]!.openedAtLife}` : 'none'}`,
            );
          }
          for (let k = 1; k < replay.length; k++)
            if (replay[k] !== replay[k - 1]! + 1) {
              violation(
                `${d.name}#${c.index}: entries after ready not consecutive: ${replay[k - 1]} then ${replay[k]} (k=${k})`,
              );
              break;
            }
        }
        for (const s of c.syncs) {
          const got = new Set(c.entries.slice(s.at).map((f) => f.seq as number));
          const lacking: number[] = [];
          for (let q = s.after + 1; q <= s.top; q++) if (!got.has(q)) lacking.push(q);
          if (
            lacking.length > 0 &&
            c !== d.current &&
            c.ws.readyState !== WebSocket.OPEN &&
            lacking.length === s.top - s.after
          )
            continue; // the connection died before any answer: a kill
          if (lacking.length > 0 && (c === d.current || c.entries.length > s.at))
            note(
              `${d.name}#${c.index}: sync after ${s.after} (top ${s.top}) lacks ${lacking.length} seqs (${lacking.slice(0, 10).join(',')}); connection ${c.ws.readyState === WebSocket.OPEN ? 'open' : 'closed'}`,
            );
          if (lacking.length > 0 && c.ws.readyState === WebSocket.OPEN)
            violation(
              `${d.name}#${c.index}: sync after ${s.after} answered without seqs ${lacking.slice(0, 10).join(',')} on a connection still open`,
            );
        }
      }
    }
    const totalEntries = [...inboxes.entries()]
      .filter(([k]) => !k.includes('#'))
      .reduce((n, [, m]) => n + (m as Map<number, Seen>).size, 0);
    note(
      `checked: ${kills} kills, ${server.life} lives, ${checkedMessages} sends (${answered} answered by sent, ${abandoned} never answered), ${totalEntries} inbox entries, ${orderPairs} order checks, ${devices.reduce((n, d) => n + d.conns.length, 0)} connections`,
    );
    const errors = server.errorLines;
    note(`error-level log lines: ${errors.length}`);
    for (const e of errors.slice(0, 30)) note(`  life ${e.life}: ${e.line.slice(0, 600)}`);
    assert.deepEqual(violations, [], `seed ${SEED}: ${violations.length} violations`);
  });
});
