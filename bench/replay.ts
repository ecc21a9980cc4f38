/**
 * The replay benchmark: what a device back after a long absence costs.
 *
 *   npm run bench -- replay [--entries N] [--bytes B] [--deflate true|false]
 *                           [--shapes embedded,kafka]
 *
 * For each shape, `npm start`'s process (bench/chat.ts starts it), and in this process two
 * users: alice sends bob N messages with bodies of about B bytes while bob's only device is
 * away, then bob's device connects and reads them, acking every 100 as a client does. The
 * baseline is the same N messages delivered live, in the same run: bob's device connected
 * while alice sends them (at most 64 in flight). It prints, for both, entries per second and
 * MB per second from the first frame to the last, and for the replay whether the connection
 * stayed open and how many parts its gateway asked for (replays go out in parts:
 * processors/users/decider.ts). Defaults: N=3,000, B=8,000 (24 MB, 24 times a connection's
 * send buffer).
 */
import { randomBytes } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { WebSocket } from 'ws';
import { startShape, type ShapeName } from './chat.ts';
import { metric, metricLines, register } from '../test/support/chat-client.ts';

type Frame = { type: string; seq?: number; id?: string; code?: string };

/** A client that counts the inbox entries it reads, acking every 100. */
class Device {
  entries = 0;
  top = 0;
  firstAt = 0;
  lastAt = 0;
  closedWith: number | undefined;
  private readonly waiters = new Set<() => void>();

  private constructor(readonly ws: WebSocket) {
    ws.on('message', (data) => {
      const frame = JSON.parse(data.toString()) as Frame;
      if (frame.type === 'message' || frame.type === 'receipt') {
        if (this.entries === 0) this.firstAt = performance.now();
        this.lastAt = performance.now();
        this.entries++;
        this.top = Math.max(this.top, frame.seq!);
        if (this.entries % 100 === 0) ws.send(JSON.stringify({ type: 'ack', upTo: this.top }));
      }
      this.frames.push(frame);
      for (const wake of this.waiters) wake();
    });
    ws.on('close', (code) => {
      this.closedWith = code;
      for (const wake of this.waiters) wake();
    });
  }

  readonly frames: Frame[] = [];

  static async open(url: string, token: string, deviceId: string, deflate = true): Promise<Device> {
    const ws = new WebSocket(`${url.replace('http', 'ws')}/v1/ws?deviceId=${deviceId}`, {
      headers: { authorization: `Bearer ${token}` },
      // permessage-deflate offered, as browsers do (`--deflate false` not to).
      perMessageDeflate: deflate,
    });
    const device = new Device(ws);
    await device.until(() => device.frames.some((f) => f.type === 'ready'), 30_000, 'ready');
    return device;
  }

  /** Resolves once `done` holds, or the connection closed; rejects after `timeoutMs`. */
  until(done: () => boolean, timeoutMs: number, what = 'a frame'): Promise<void> {
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(check);
        reject(new Error(`waited ${timeoutMs} ms for ${what}`));
      }, timeoutMs);
      const check = () => {
        if (!done() && this.closedWith === undefined) return;
        clearTimeout(timer);
        this.waiters.delete(check);
        resolve();
      };
      this.waiters.add(check);
      check();
    });
  }

  async close(): Promise<void> {
    if (this.closedWith !== undefined) return;
    this.ws.close();
    await this.until(() => false, 10_000).catch(() => undefined);
  }
}

/** Sends `count` messages of about `bytes` bytes, at most 64 waiting for `sent`. */
async function sendAll(sender: Device, to: string, count: number, bytes: number, tag: string) {
  const text = 'x'.repeat(bytes);
  const sent = () => sender.frames.filter((f) => f.type === 'sent').length;
  const before = sent();
  for (let i = 0; i < count; i++) {
    await sender.until(() => i - (sent() - before) < 64, 60_000, 'sent');
    sender.ws.send(JSON.stringify({ type: 'send', id: `${tag}-${i}`, to, body: { i, text } }));
  }
  await sender.until(() => sent() - before >= count, 120_000, 'the last sent');
  if (sender.closedWith !== undefined)
    throw new Error(`the sender was closed (${sender.closedWith})`);
  const refused = sender.frames.find((f) => f.type === 'error');
  if (refused) throw new Error(`a send was refused: ${JSON.stringify(refused)}`);
}

interface Figures {
  entries: number;
  seconds: number;
  closedWith?: number;
}

const parts = (url: string) => metric(url, 'kchat_gateway_replay_parts_asked_total');

/** Records the users actor has processed, in every process of the shape. */
async function processedByUsers(urls: string[]): Promise<number> {
  let sum = 0;
  for (const url of urls)
    sum += await metric(url, 'kchat_streams_records_processed_total', { application: 'users' });
  return sum;
}

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      entries: { type: 'string', default: '3000' },
      bytes: { type: 'string', default: '8000' },
      deflate: { type: 'string', default: 'true' },
      shapes: { type: 'string' },
    },
  });
  const count = Number(values.entries);
  const bytes = Number(values.bytes);
  const deflate = values.deflate !== 'false';
  const shapes = (values.shapes?.split(',') ?? [
    'embedded',
    ...(process.env.KAFKA_BROKERS ? ['kafka'] : []),
  ]) as ShapeName[];
  const rows: string[] = [];
  for (const shape of shapes) {
    console.error(`\n${shape}:`);
    const dataDir = await mkdtemp(join(tmpdir(), `kchat-bench-replay-${shape}-`));
    const { servers, stop } = await startShape(shape, dataDir);
    const { url } = servers[0]!;
    try {
      const run = randomBytes(3).toString('hex');
      const [alice, bob] = [`alice-${run}`, `bob-${run}`];
      const tokens = { alice: await register(url, alice), bob: await register(url, bob) };
      const sender = await Device.open(url, tokens.alice, 'phone');
      // The gateway knows bob once the accounts table has him.
      for (let attempt = 0; ; attempt++) {
        sender.ws.send(JSON.stringify({ type: 'send', id: `probe-${attempt}`, to: bob, body: 0 }));
        await sender.until(
          () => sender.frames.some((f) => f.id === `probe-${attempt}`),
          10_000,
          'the answer to a probe',
        );
        if (sender.frames.some((f) => f.id === `probe-${attempt}` && f.type === 'sent')) break;
        if (attempt > 100) throw new Error(`${bob} stayed unknown`);
        await new Promise((r) => setTimeout(r, 100));
      }
      const figures = async (device: Device, from: number): Promise<Figures> => {
        // Progress every 5 s; a minute without a new entry is a stall, not a slow run.
        for (let last = -1, still = 0; device.entries < count && device.closedWith === undefined;) {
          await device.until(() => device.entries >= count, 5_000).catch(() => undefined);
          console.error(
            `  [replay]   ${device.entries} of ${count} entries, top seq ${device.top}`,
          );
          still = device.entries === last ? still + 5 : 0;
          last = device.entries;
          if (still >= 60) {
            // What the processes say about it, for whoever reads the failure.
            for (const { url } of servers) {
              const lines = await metricLines(url, /^kchat_(users|gateway)_/);
              console.error(`  [replay] ${url}/metrics:\n    ${lines.join('\n    ')}`);
            }
            throw new Error(`no entry for a minute: ${device.entries} of ${count}`);
          }
        }
        return {
          entries: device.entries,
          seconds: (device.lastAt - from) / 1000,
          closedWith: device.closedWith,
        };
      };

      console.error(`  [replay] live: ${count} messages of ${bytes} bytes to a device online`);
      const online = await Device.open(url, tokens.bob, 'phone', deflate);
      await online.until(() => online.entries >= 1, 10_000, 'the probe');
      online.entries = 0;
      const liveStart = performance.now();
      await sendAll(sender, bob, count, bytes, 'live');
      const live = await figures(online, liveStart);
      online.ws.send(JSON.stringify({ type: 'ack', upTo: online.top }));
      await new Promise((r) => setTimeout(r, 500));
      await online.close();

      console.error(`  [replay] away: ${count} more while the device is away, then it connects`);
      const urls = servers.map((s) => s.url);
      const processedBefore = await processedByUsers(urls);
      await sendAll(sender, bob, count, bytes, 'away');
      // `sent` says the copies are in the log; until the users actor has appended them (bob's
      // and alice's), bob's CONNECTED could overtake them and they would go out live.
      const appended = processedBefore + 2 * count;
      for (let waited = 0, now = processedBefore; now < appended; waited += 100) {
        if (waited % 5_000 === 0)
          console.error(`  [replay] the users actor: ${now - processedBefore} of ${2 * count}`);
        if (waited > 120_000) throw new Error('the users actor did not append the copies');
        await new Promise((r) => setTimeout(r, 100));
        now = await processedByUsers(urls);
      }
      const partsBefore = await parts(url);
      const replayStart = performance.now();
      const back = await Device.open(url, tokens.bob, 'phone', deflate);
      const replay = await figures(back, replayStart);
      const asked = (await parts(url)) - partsBefore;
      await back.close();
      await sender.close();

      const mb = (f: Figures) => (f.entries * bytes) / 1e6 / f.seconds;
      const perS = (f: Figures) => f.entries / f.seconds;
      rows.push(
        `| ${shape}, live (baseline) | ${live.entries} | ${perS(live).toFixed(0)} | ${mb(live).toFixed(1)} | 1.00 | - | - |`,
        `| ${shape}, replay | ${replay.entries} | ${perS(replay).toFixed(0)} | ${mb(replay).toFixed(1)} | ${(perS(replay) / perS(live)).toFixed(2)} | ${replay.closedWith === undefined ? 'yes' : `no (${replay.closedWith})`} | ${asked} |`,
      );
    } finally {
      await stop();
      await rm(dataDir, { recursive: true, force: true });
    }
  }
  console.log(
    `\nN=${count} messages, bodies of ${bytes} bytes, permessage-deflate ${deflate ? 'offered' : 'not offered'}; the replay's time from its connect to its last entry, live from the first send to the last entry\n`,
  );
  console.log(
    '| shape | entries read | entries/s | MB/s | vs live | connection stayed open | parts asked for |',
  );
  console.log('| --- | ---: | ---: | ---: | ---: | --- | ---: |');
  for (const row of rows) console.log(row);
}
