/**
 * The chat benchmark's load generator, in its own process (bench/chat.ts starts it):
 *
 *   node --import tsx bench/chat/load.ts '<json LoadConfig>'
 *
 * 1. Users: 2P accounts registered over REST (chat), or names (relay).
 * 2. Idle connections: the server's RSS as 2N connections that only wait open, N at a time.
 * 3. Load: P senders, each to its own recipient, each keeping at most W messages in flight (in
 *    flight until its recipient has it) with ~100-byte bodies; warm-up, then a measured window,
 *    then a drain. Both sides ack their inbox as clients do (cumulative, every 32 entries or 50 ms).
 * Prints one JSON line: LoadResult.
 */
import { readFileSync } from 'node:fs';
import { WebSocket } from 'ws';
import { TokenService } from '../../api/tokens.ts';

export interface LoadConfig {
  url: string;
  kind: 'chat' | 'relay';
  pairs: number;
  window: number;
  warmupS: number;
  seconds: number;
  idle: number;
  bodyBytes: number;
  /** The shape's server processes: the first serves the clients (its RSS per idle connection). */
  serverPids: number[];
  /** Every server process's /metrics: the work counters are summed over them. */
  metricsUrls: string[];
  /** The server's JWT secret: idle connections are users of their own, with tokens made here. */
  jwtSecret?: string;
}

export interface LoadResult {
  delivered: number;
  seconds: number;
  perSecond: number;
  latencyMs: { p50: number; p99: number; max: number };
  sentLatencyMs: { p50: number; p99: number; max: number };
  /** Acknowledged by `sent` but never received by the recipient, even after a sync. */
  lost: number;
  /** Held in the recipient's inbox twice (two seqs); a replay of one seq is no duplicate. */
  duplicated: number;
  /** `sync` frames a device sent for gaps in the seqs it received live (one may fill several). */
  syncs: number;
  /**
   * Acknowledged messages the recipient had not received live by the end of the drain, but got
   * from the final sync (or its reconnect's replay): held in the inbox, missed on the wire.
   */
  recoveredAtEnd: number;
  errors: Record<string, number>;
  idle: number;
  rssPerIdleKiB: number;
  serverRssMiB: number;
  /** The server's CPU use in the measured window, in % of one core, and the load generator's. */
  serverCpuPercent: number;
  loadCpuPercent: number;
  /** The server's work counters over the measured window, per delivered message (chat only). */
  perMessage?: Record<string, number>;
  /** Mean ms each stage of a record's path took, in the measured window (chat only). */
  stageMeanMs?: Record<string, number>;
}

const config = JSON.parse(process.argv[2]!) as LoadConfig;
const run = Math.random().toString(36).slice(2, 8);
const wsUrl = `${config.url.replace('http', 'ws')}/v1/ws`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
const progress = (text: string) => process.stderr.write(`  [load] ${text}\n`);

type Frame = { type: string; [field: string]: unknown };

/** Counters of the server's /metrics that say how much work a message costs. */
const WORK_COUNTERS = {
  'records processed by the users actor': 'kchat_streams_records_processed_total',
  'task commits': 'kchat_streams_commits_total',
  'log records written': 'kchat_log_records_written',
  'log write batches': 'kchat_log_write_batches',
} as const;

/**
 * Histograms of how long a record took over a stage of its path: from the gateway's write to
 * the users actor's processing (of a record the users actor wrote itself: from that write), and
 * from the users actor's write of a delivery to the gateway's, and the users actor's task commits
 * that the second stage waits for. The window's mean is the
 * difference of their sums over the difference of their counts.
 */
const STAGE_LATENCIES = {
  'log to users actor': 'kchat_streams_record_latency_seconds',
  'users actor to gateway delivery': 'kchat_gateway_delivery_latency_seconds',
  // Inside the stage before: a task's commit, which its deliveries wait for (read committed).
  'of which a task commit': 'kchat_streams_commit_seconds',
} as const;

/**
 * Each work counter's value, and each stage histogram's `_sum` and `_count` (summed over
 * labels and servers); undefined for the relay or a failed scrape.
 */
async function workCounters(): Promise<Record<string, number> | undefined> {
  if (config.kind !== 'chat') return undefined;
  const texts = await Promise.all(
    config.metricsUrls.map((url) =>
      fetch(url, { signal: AbortSignal.timeout(10_000) })
        .then((r) => r.text())
        .catch(() => undefined),
    ),
  );
  if (texts.includes(undefined)) return undefined;
  const text = texts.join('\n');
  const values: Record<string, number> = {};
  const series = {
    ...WORK_COUNTERS,
    ...Object.fromEntries(
      Object.entries(STAGE_LATENCIES).flatMap(([label, name]) => [
        [`${label} sum`, `${name}_sum`],
        [`${label} count`, `${name}_count`],
      ]),
    ),
  };
  for (const [label, name] of Object.entries(series)) {
    const pattern = new RegExp(`^${name}(?:\\{[^}]*\\})? (\\S+)$`, 'gm');
    const samples = [...text.matchAll(pattern)];
    // The log's counters exist on the embedded log only.
    if (samples.length > 0) values[label] = samples.reduce((sum, m) => sum + Number(m[1]), 0);
  }
  return values;
}

/** CPU seconds (user + system) a process has used: /proc/<pid>/stat fields 14 and 15. */
function cpuSeconds(pid: number): number {
  const stat = readFileSync(`/proc/${pid}/stat`, 'utf8');
  const fields = stat.slice(stat.lastIndexOf(')') + 2).split(' ');
  return (Number(fields[11]) + Number(fields[12])) / 100; // clock ticks: 100 a second on Linux
}

function rssKiB(pid: number): number {
  const status = readFileSync(`/proc/${pid}/status`, 'utf8');
  return Number(/VmRSS:\s+(\d+)/.exec(status)![1]);
}

async function register(username: string): Promise<string> {
  for (let attempt = 0; ; attempt++) {
    const response = await fetch(`${config.url}/v1/auth/register`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ username, password: 'benchmark password' }),
      signal: AbortSignal.timeout(10_000),
    });
    if (response.status === 201)
      return ((await response.json()) as { accessToken: string }).accessToken;
    if (attempt > 20) throw new Error(`register ${username}: ${response.status}`);
    await sleep(200);
  }
}

/**
 * Opens a connection and waits for `ready` (at most 30 s). `onFrame`, when given, sees every
 * frame from the first: a reconnect's replay can arrive in the same read as its `ready`.
 */
async function connect(
  user: string,
  token: string | undefined,
  deviceId: string,
  onFrame?: (data: WebSocket.RawData) => void,
) {
  const query = config.kind === 'relay' ? `user=${user}` : `deviceId=${deviceId}`;
  const ws = new WebSocket(`${wsUrl}?${query}`, {
    headers: token ? { authorization: `Bearer ${token}` } : {},
    perMessageDeflate: false,
  });
  if (onFrame) ws.on('message', onFrame);
  await new Promise<void>((resolve, reject) => {
    const timer = setTimeout(() => {
      ws.terminate();
      reject(new Error(`${user}: no ready within 30 s`));
    }, 30_000);
    const fail = (error: Error) => {
      clearTimeout(timer);
      reject(error);
    };
    ws.on('message', function first(data) {
      if ((JSON.parse(data.toString()) as Frame).type === 'ready') {
        clearTimeout(timer);
        ws.off('message', first);
        resolve();
      }
    });
    ws.once('error', fail);
    ws.once('close', () => fail(new Error(`${user} closed before ready`)));
  });
  // Later errors end in 'close', which the caller watches; unhandled they would crash.
  ws.on('error', () => {});
  return ws;
}

async function inBatches<T>(items: T[], size: number, work: (item: T) => Promise<void>) {
  for (let i = 0; i < items.length; i += size)
    await Promise.all(items.slice(i, i + size).map(work));
}

function percentiles(values: number[]) {
  const sorted = Float64Array.from(values).sort();
  const at = (q: number) =>
    sorted.length ? sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))]! : NaN;
  return { p50: at(0.5), p99: at(0.99), max: sorted.length ? sorted[sorted.length - 1]! : NaN };
}

// 1. Users.
const senders = Array.from({ length: config.pairs }, (_, i) => `s${i}-${run}`);
const recipients = Array.from({ length: config.pairs }, (_, i) => `r${i}-${run}`);
const tokens = new Map<string, string | undefined>();
if (config.kind === 'chat') {
  progress(`registering ${2 * config.pairs} users`);
  await inBatches(
    [...senders, ...recipients],
    4,
    async (u) => void tokens.set(u, await register(u)),
  );
}

// 2. Idle connections: what one costs the server, opened in two rounds of N. The first also
// grows the heap for the garbage that opening connections makes (authentication, the
// CONNECTED events and their processing), which RSS keeps.
const idle: WebSocket[] = [];
const idleTokens = config.jwtSecret ? new TokenService({ secret: config.jwtSecret }) : undefined;
const openIdle = (round: number) =>
  inBatches(
    Array.from({ length: config.idle }, (_, i) => i + round * config.idle),
    50,
    async (i) => {
      const user = `idle${i}-${run}`;
      const token = (await idleTokens?.issueAccessToken(user))?.accessToken;
      idle.push(await connect(user, token, 'phone'));
    },
  );
const rss = [rssKiB(config.serverPids[0]!)];
for (let round = 0; round < 2 && config.idle > 0; round++) {
  await openIdle(round);
  await sleep(3000);
  rss.push(rssKiB(config.serverPids[0]!));
}
// The table shows the larger of the two rounds: a collection during the second can make it
// look cheaper than it is.
const perRound = [1, 2].map((i) => (rss[i]! - rss[i - 1]!) / config.idle);
const rssPerIdleKiB = config.idle > 0 ? Math.max(...perRound) : NaN;
if (config.idle > 0)
  progress(
    `idle connections: server RSS ${rss.join(' → ')} KiB at 0, ${config.idle} and ${2 * config.idle}: ${perRound.map((k) => k.toFixed(1)).join(' and ')} KiB each`,
  );
for (const ws of idle) ws.close();
await sleep(1000);
if (config.idle > 0) await quiet();

/**
 * Waits until the users actor has worked through the idle clients' records (a CONNECTED, a
 * Sync and a DISCONNECTED each): its processed count still for 2 s, at most 120 s. Else on
 * Kafka that backlog is still processed during the measurement, ahead of the messages on the
 * same partitions (its p99 went from about 0.7 s to 4.2 s).
 */
async function quiet(): Promise<void> {
  const processed = async () =>
    (await workCounters())?.['records processed by the users actor'] ?? 0;
  const deadline = Date.now() + 120_000;
  let last = await processed();
  let still = 0;
  while (still < 4 && Date.now() < deadline) {
    await sleep(500);
    const now = await processed();
    still = now === last ? still + 1 : 0;
    if (now !== last) progress(`users actor: ${now} records processed, waiting for it to settle`);
    last = now;
  }
}

// 3. Load.
const pad = 'x'.repeat(Math.max(0, config.bodyBytes - 60));
type Pair = {
  index: number;
  out: WebSocket;
  in: WebSocket;
  next: number;
  inFlight: Map<number, number>; // n → sent at, until the recipient has it (or it is refused)
  /** Message number → the seq it came with. */
  received: Map<number, number>;
  acknowledged: Set<number>;
  /** n → sent at, until its `sent` (or error) arrives, whether or not it was delivered first. */
  sentAt: Map<number, number>;
  /** What each side has seen of its inbox and acked, as a client does. */
  outSeq: Seqs;
  inSeq: Seqs;
};
/**
 * A device's view of its inbox, as a client keeps it: everything up to `contiguous` received,
 * `ahead` the seqs above a gap. It acks only what is contiguous, and a gap that lasts
 * GAP_SYNC_MS makes it ask for the rest with `sync`.
 */
type Seqs = {
  ws: WebSocket;
  contiguous: number;
  ahead: Set<number>;
  acked: number;
  gapSince: number | undefined;
};
const GAP_SYNC_MS = 1000;
const seqs = (ws: WebSocket): Seqs => ({
  ws,
  contiguous: 0,
  ahead: new Set(),
  acked: 0,
  gapSince: undefined,
});
const pairs: Pair[] = [];
await inBatches(
  Array.from({ length: config.pairs }, (_, i) => i),
  10,
  async (i) => {
    const out = await connect(senders[i]!, tokens.get(senders[i]!), 'bench');
    const inbound = await connect(recipients[i]!, tokens.get(recipients[i]!), 'bench');
    pairs[i] = {
      index: i,
      out,
      in: inbound,
      next: 1,
      inFlight: new Map(),
      received: new Map(),
      acknowledged: new Set(),
      sentAt: new Map(),
      outSeq: seqs(out),
      inSeq: seqs(inbound),
    };
  },
);

let phase: 'probe' | 'warmup' | 'measure' | 'drain' | 'final' = 'probe';
let measureStarted = 0;
let measureEnded = 0;
let delivered = 0;
let duplicated = 0;
let syncs = 0;
let recoveredAtEnd = 0;
/** Connections of the pairs that closed before the end (the server closed them). */
let closed = 0;
const latencies: number[] = [];
const sentLatencies: number[] = [];
const errors: Record<string, number> = {};
/** Messages first sent in the measured window: n ≥ this per pair. */
const measuredFrom: number[] = [];

function pump(pair: Pair): void {
  while (pair.inFlight.size < config.window && (phase === 'warmup' || phase === 'measure')) {
    const n = pair.next++;
    const now = Date.now();
    pair.inFlight.set(n, now);
    pair.sentAt.set(n, now);
    pair.out.send(
      JSON.stringify({
        type: 'send',
        id: `b${n}`,
        to: recipients[pair.index],
        body: { n, t: now, pad },
      }),
    );
  }
}

const countError = (code: unknown) => {
  errors[String(code)] = (errors[String(code)] ?? 0) + 1;
};

function onSenderFrame(pair: Pair, data: WebSocket.RawData): void {
  const frame = JSON.parse(data.toString()) as Frame;
  // The sender's own copies and its receipts are entries of its inbox: acked like any.
  if (typeof frame.seq === 'number') seen(pair.outSeq, frame.seq);
  if (frame.id === 'probe') return;
  // Every refused frame counts, those without an id (an ack, a sync) too.
  if (frame.type === 'error') countError(frame.code);
  if (typeof frame.id !== 'string' || !frame.id.startsWith('b')) return;
  const n = Number(frame.id.slice(1));
  if (frame.type === 'sent') {
    pair.acknowledged.add(n);
    // From the send, even when the recipient had the message before its `sent` came back.
    const at = pair.sentAt.get(n);
    pair.sentAt.delete(n);
    if (at !== undefined && n >= (measuredFrom[pair.index] ?? Infinity))
      sentLatencies.push(Date.now() - at);
  } else if (frame.type === 'error') {
    pair.sentAt.delete(n);
    if (pair.inFlight.delete(n)) pump(pair); // refused, not accepted: not in flight any more
  }
}

function onRecipientFrame(pair: Pair, data: WebSocket.RawData): void {
  const frame = JSON.parse(data.toString()) as Frame;
  if (typeof frame.seq === 'number') seen(pair.inSeq, frame.seq); // every entry, the probe too
  if (frame.type === 'error') countError(frame.code);
  if (frame.type !== 'message') return;
  const body = frame.body as { n?: number; t?: number };
  if (typeof body.n !== 'number') return;
  if (pair.received.has(body.n)) {
    // A second inbox entry; the same seq again is a replay. The relay has no seqs and no
    // replays: any second copy is a duplicate there.
    if (frame.seq === undefined || pair.received.get(body.n) !== frame.seq) duplicated++;
    return;
  }
  pair.received.set(body.n, frame.seq as number);
  // Throughput: what arrives in the measured window; latency: every message sent in it.
  if (phase === 'measure') delivered++;
  if (phase === 'final') recoveredAtEnd++;
  if (body.n >= (measuredFrom[pair.index] ?? Infinity)) latencies.push(Date.now() - body.t!);
  pair.inFlight.delete(body.n);
  pump(pair);
}

function watch(pair: Pair): void {
  for (const ws of [pair.out, pair.in]) ws.once('close', () => closed++); // the load closes none before it has its result
}

for (const pair of pairs) {
  pair.out.on('message', (data) => onSenderFrame(pair, data));
  pair.in.on('message', (data) => onRecipientFrame(pair, data));
  watch(pair);
}

function seen(device: Seqs, seq: number): void {
  if (seq <= device.contiguous) return; // a replay
  device.ahead.add(seq);
  while (device.ahead.delete(device.contiguous + 1)) device.contiguous++;
  device.gapSince = device.ahead.size > 0 ? (device.gapSince ?? Date.now()) : undefined;
  if (config.kind === 'chat' && device.contiguous - device.acked >= 32) ack(device);
}

function ack(device: Seqs): void {
  if (device.contiguous <= device.acked) return;
  device.acked = device.contiguous;
  device.ws.send(JSON.stringify({ type: 'ack', upTo: device.contiguous }));
}

function syncGap(device: Seqs): void {
  if (device.gapSince === undefined || Date.now() - device.gapSince < GAP_SYNC_MS) return;
  syncs++;
  device.gapSince = Date.now();
  device.ws.send(JSON.stringify({ type: 'sync', after: device.contiguous }));
}

const acker =
  config.kind === 'chat'
    ? setInterval(() => {
        for (const pair of pairs)
          for (const device of [pair.outSeq, pair.inSeq]) {
            ack(device);
            syncGap(device);
          }
      }, 50)
    : undefined;

// The gateway answers unknown_recipient until its accounts table has the registrations: probe
// every pair with a single message first.
if (config.kind === 'chat') {
  progress('waiting for the gateway to know every recipient');
  const deadline = Date.now() + 60_000;
  for (const pair of pairs) {
    for (;;) {
      const answered = new Promise<Frame>((resolve) => {
        const listen = (data: WebSocket.RawData) => {
          const frame = JSON.parse(data.toString()) as Frame;
          if (frame.id === 'probe') {
            pair.out.off('message', listen);
            resolve(frame);
          }
        };
        pair.out.on('message', listen);
      });
      pair.out.send(
        JSON.stringify({ type: 'send', id: 'probe', to: recipients[pair.index], body: 'probe' }),
      );
      const answer = await Promise.race([answered, sleep(10_000).then(() => undefined)]);
      if (answer?.type === 'sent') break;
      if (Date.now() > deadline) throw new Error('recipients stayed unknown');
      await sleep(200);
    }
  }
  for (const key of Object.keys(errors)) delete errors[key];
}

progress(`warm-up ${config.warmupS} s`);
phase = 'warmup';
pairs.forEach(pump);
await sleep(config.warmupS * 1000);
progress(`measuring ${config.seconds} s: ${config.pairs} pairs, ${config.window} in flight each`);
pairs.forEach((pair) => (measuredFrom[pair.index] = pair.next));
phase = 'measure';
// The work counters' window takes in their scrapes; the rate's window does not (the relay has
// no scrape: what arrives during one must not count for the chat alone).
const workBefore = await workCounters();
measureStarted = Date.now();
const deliveredBefore = delivered;
const serverCpu = () => config.serverPids.reduce((sum, pid) => sum + cpuSeconds(pid), 0);
const cpuBefore = [serverCpu(), cpuSeconds(process.pid)];
await sleep(config.seconds * 1000);
measureEnded = Date.now();
const cpuAfter = [serverCpu(), cpuSeconds(process.pid)];
const deliveredInWindow = delivered - deliveredBefore;
const workAfter = await workCounters();
const measuredDelivered = delivered;
const cpuPercent = (i: number) =>
  (100 * (cpuAfter[i]! - cpuBefore[i]!)) / ((measureEnded - measureStarted) / 1000);
phase = 'drain';
const drainDeadline = Date.now() + 15_000;
while (Date.now() < drainDeadline && pairs.some((p) => p.inFlight.size > 0)) await sleep(50);
const missing = () =>
  pairs.reduce((sum, p) => sum + [...p.acknowledged].filter((n) => !p.received.has(n)).length, 0);
// Sends that got neither `sent` nor an error: not lost (never acknowledged), but not fine.
const unanswered = pairs.reduce(
  (sum, p) => sum + [...p.inFlight.keys()].filter((n) => !p.acknowledged.has(n)).length,
  0,
);
if (unanswered > 0) errors['no answer'] = unanswered;
if (closed > 0) errors['connection closed'] = closed;
// What is still missing may be in the inbox and only missed on the wire (the last entry of a
// pair has no later seq to show its gap; a closed connection got nothing more): every recipient
// reconnects if it must, syncs after what it holds, and gets at most 10 s to answer.
phase = 'final';
if (config.kind === 'chat' && missing() > 0) {
  progress(`${missing()} acknowledged messages not received after the drain: a final sync`);
  for (const pair of pairs) {
    if (pair.in.readyState !== WebSocket.OPEN) {
      pair.in = await connect(
        recipients[pair.index]!,
        tokens.get(recipients[pair.index]!),
        'bench',
        (d) => onRecipientFrame(pair, d),
      );
      pair.inSeq.ws = pair.in;
    }
    pair.in.send(JSON.stringify({ type: 'sync', after: pair.inSeq.contiguous }));
  }
  const finalDeadline = Date.now() + 10_000;
  while (Date.now() < finalDeadline && missing() > 0) await sleep(100);
}
await sleep(500); // a duplicate would show up now
clearInterval(acker);

const lost = missing();

const result: LoadResult = {
  delivered: deliveredInWindow,
  seconds: (measureEnded - measureStarted) / 1000,
  perSecond: deliveredInWindow / ((measureEnded - measureStarted) / 1000),
  latencyMs: percentiles(latencies),
  sentLatencyMs: percentiles(sentLatencies),
  lost,
  duplicated,
  syncs,
  recoveredAtEnd,
  errors,
  idle: config.idle,
  rssPerIdleKiB,
  serverRssMiB: rssKiB(config.serverPids[0]!) / 1024,
  serverCpuPercent: cpuPercent(0),
  loadCpuPercent: cpuPercent(1),
  perMessage:
    workBefore && workAfter && measuredDelivered > 0
      ? Object.fromEntries(
          Object.keys(WORK_COUNTERS)
            .filter((label) => label in workBefore && label in workAfter)
            .map((label) => [label, (workAfter[label]! - workBefore[label]!) / measuredDelivered]),
        )
      : undefined,
  stageMeanMs:
    workBefore && workAfter
      ? Object.fromEntries(
          Object.keys(STAGE_LATENCIES).flatMap((stage) => {
            const delta = (what: string) =>
              (workAfter[`${stage} ${what}`] ?? 0) - (workBefore[`${stage} ${what}`] ?? 0);
            return delta('count') > 0 ? [[stage, (1000 * delta('sum')) / delta('count')]] : [];
          }),
        )
      : undefined,
};
for (const pair of pairs) {
  pair.out.terminate();
  pair.in.terminate();
}
console.log(JSON.stringify(result));
process.exit(0);
