/**
 * The chat benchmark.
 *
 *   npm run bench -- chat [--pairs P] [--window W] [--seconds S] [--warmup S] [--idle N]
 *                         [--shapes relay,embedded,kafka,kafka-split] [--profile DIR]
 *
 * For each shape, a server process and a load generator in its own process (bench/chat/load.ts):
 * P pairs of users, each sender keeping at most W messages in flight until its recipient has
 * them, ~100-byte bodies, a warm-up and then S measured seconds. Shapes:
 * - relay: bench/chat/relay.ts, a bare `ws` relay (no auth, no log, no durability): the ceiling
 *   a Node WebSocket path reaches on this machine, and the baseline of every ratio;
 * - embedded: `npm start`'s process on the embedded log;
 * - kafka: the same process on Apache Kafka (KAFKA_BROKERS; SCHEMA_REGISTRY_URL when set);
 * - kafka-split: on Kafka too, the same process and a second one running `processor users`: the
 *   users actor's tasks are shared between them, as in the distributed deployment (a role scales
 *   by adding processes), so that the Node side has two main threads. CPU is the sum of both.
 * It prints delivered messages/s and its ratio to the relay, latency from send to receipt at the
 * recipient, `sent` latency, lost and duplicated messages, the server's and the load
 * generator's CPU use, and the server's RSS per idle connection: 2N connections that only wait,
 * each its own user, opened N at a time; the larger of the two rounds' growth per connection.
 * Defaults: P=50, W=16, 20 s after 5 s of warm-up, N=5000. --profile DIR writes each server's
 * CPU profile (node --cpu-prof) and prints where its time went.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { closeSync, openSync } from 'node:fs';
import { mkdtemp, readdir, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import type { LoadConfig, LoadResult } from './chat/load.ts';
import { summarizeProfile } from './profile.ts';
import { freePort } from '../test/support/process.ts';

export type ShapeName = 'relay' | 'embedded' | 'kafka' | 'kafka-split';
const onKafka = (shape: ShapeName) => shape === 'kafka' || shape === 'kafka-split';

interface Server {
  child: ChildProcess;
  url: string;
  stop(): Promise<void>;
}

/** A shape's processes: the first serves the clients; all of them are measured. */
interface Shape {
  servers: Server[];
  /** The JWT_SECRET they share: the load generator signs its idle users' tokens with it. */
  jwtSecret: string;
  stop(): Promise<void>;
}

export async function startShape(
  shape: ShapeName,
  dataDir: string,
  profileDir?: string,
): Promise<Shape> {
  const jwtSecret = randomBytes(32).toString('base64url');
  const servers = [await startServer(shape, [], join(dataDir, 'all'), jwtSecret, profileDir)];
  const stop = () => Promise.all(servers.map((s) => s.stop())).then(() => undefined);
  try {
    if (shape === 'kafka-split')
      servers.push(
        await startServer(
          shape,
          ['processor', 'users'],
          join(dataDir, 'users'),
          jwtSecret,
          profileDir,
        ),
      );
  } catch (error) {
    await stop();
    throw error;
  }
  return { servers, jwtSecret, stop };
}

async function startServer(
  shape: ShapeName,
  role: string[],
  dataDir: string,
  jwtSecret: string,
  profileDir?: string,
): Promise<Server> {
  const port = await freePort();
  const env: NodeJS.ProcessEnv = {
    ...process.env,
    PORT: String(port),
    HOST: '127.0.0.1',
    DATA_DIR: dataDir,
    LOG_LEVEL: process.env.BENCH_LOG_LEVEL ?? 'warn',
    RATE_LIMIT_PER_S: '1000000',
    // Its load generator registers every user, 10,100 by default, from one address.
    REGISTRATIONS_PER_HOUR: '0',
    GATEWAY_ID: `bench-${randomBytes(3).toString('hex')}`,
    JWT_SECRET: jwtSecret,
  };
  if (!onKafka(shape)) delete env.KAFKA_BROKERS;
  if (!onKafka(shape)) delete env.SCHEMA_REGISTRY_URL;
  const script = shape === 'relay' ? 'bench/chat/relay.ts' : 'app/main.ts';
  const profile = profileDir
    ? ['--cpu-prof', `--cpu-prof-dir=${join(profileDir, shape, role.join('-') || 'all')}`]
    : [];
  // BENCH_LOG_DIR keeps each process's log (its stdout) there, for a run that needs reading.
  const logDir = process.env.BENCH_LOG_DIR;
  const log = logDir
    ? openSync(join(logDir, `${shape}-${role.join('-') || 'all'}-${port}.log`), 'w')
    : 'ignore';
  const child = spawn(process.execPath, ['--import', 'tsx', ...profile, script, ...role], {
    env,
    stdio: ['ignore', log, 'pipe'],
  });
  if (typeof log === 'number') closeSync(log);
  let errors = '';
  child.stderr!.on('data', (d) => (errors = (errors + d).slice(-4000)));
  const exited = new Promise<void>((r) => child.once('exit', () => r()));
  const url = `http://127.0.0.1:${port}`;
  // SIGTERM, and SIGKILL if it is still there after 15 s (it promises to exit within 10).
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill('SIGTERM');
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<boolean>((r) => (timer = setTimeout(() => r(true), 15_000)));
    if (await Promise.race([exited.then(() => false), late])) {
      console.error(`  ${shape} server did not exit within 15 s of SIGTERM: killed`);
      child.kill('SIGKILL');
      await exited;
    }
    clearTimeout(timer);
  };
  const deadline = Date.now() + 120_000;
  try {
    for (;;) {
      if (child.exitCode !== null) throw new Error(`${shape} server exited: ${errors}`);
      // Ready, not only alive: a users processor restores its stores before it serves.
      const ok = await fetch(`${url}/readyz`, { signal: AbortSignal.timeout(5_000) }).then(
        (r) => r.ok,
        () => false,
      );
      if (ok) break;
      if (Date.now() > deadline) throw new Error(`${shape} server did not start: ${errors}`);
      await new Promise((r) => setTimeout(r, 200));
    }
  } catch (error) {
    await stop();
    throw error;
  }
  return { child, url, stop };
}

async function runLoad(config: LoadConfig): Promise<LoadResult> {
  const child = spawn(
    process.execPath,
    ['--import', 'tsx', 'bench/chat/load.ts', JSON.stringify(config)],
    {
      stdio: ['ignore', 'pipe', 'inherit'],
    },
  );
  let output = '';
  child.stdout!.on('data', (d) => (output += d));
  // Its own waits are bounded; this bounds the whole, generously: registration, idle rounds,
  // the settling wait (120 s), the probe (60 s), the window, the drain and the final sync.
  const limitMs =
    1000 * (config.warmupS + config.seconds) + 600_000 + 20 * (2 * config.idle + 2 * config.pairs);
  const timer = setTimeout(() => child.kill('SIGKILL'), limitMs);
  const code = await new Promise<number | null>((r) => child.once('exit', r));
  clearTimeout(timer);
  if (code !== 0) throw new Error(`the load generator exited with ${code}`);
  return JSON.parse(output.trim().split('\n').at(-1)!) as LoadResult;
}

const fmt = (n: number, digits = 0) =>
  Number.isFinite(n)
    ? n.toLocaleString('en-US', { maximumFractionDigits: digits, minimumFractionDigits: digits })
    : '-';

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      pairs: { type: 'string', default: '50' },
      window: { type: 'string', default: '16' },
      seconds: { type: 'string', default: '20' },
      warmup: { type: 'string', default: '5' },
      idle: { type: 'string', default: '5000' },
      shapes: { type: 'string' },
      profile: { type: 'string' },
    },
  });
  const shapes = (values.shapes?.split(',') ?? [
    'relay',
    'embedded',
    ...(process.env.KAFKA_BROKERS ? ['kafka'] : []),
  ]) as ShapeName[];
  if (shapes.some(onKafka) && !process.env.KAFKA_BROKERS)
    throw new Error('the kafka shapes need KAFKA_BROKERS');
  const profileDir = values.profile ? resolve(values.profile) : undefined;
  const results = new Map<ShapeName, LoadResult>();
  for (const shape of shapes) {
    console.error(`\n${shape}:`);
    const dataDir = await mkdtemp(join(tmpdir(), `kchat-bench-chat-${shape}-`));
    const started = await startShape(shape, dataDir, profileDir).catch(async (error: unknown) => {
      await rm(dataDir, { recursive: true, force: true });
      throw error;
    });
    const { servers, jwtSecret, stop } = started;
    const server = servers[0]!;
    try {
      results.set(
        shape,
        await runLoad({
          url: server.url,
          metricsUrls: servers.map((s) => `${s.url}/metrics`),
          kind: shape === 'relay' ? 'relay' : 'chat',
          pairs: Number(values.pairs),
          window: Number(values.window),
          warmupS: Number(values.warmup),
          seconds: Number(values.seconds),
          idle: Number(values.idle),
          bodyBytes: 100,
          serverPids: servers.map((s) => s.child.pid!),
          jwtSecret: shape === 'relay' ? undefined : jwtSecret,
        }),
      );
    } finally {
      await stop();
      await rm(dataDir, { recursive: true, force: true });
    }
  }

  const baseline = results.get('relay')?.perSecond;
  console.log(
    `\nP=${values.pairs} pairs, W=${values.window} in flight per sender, ${values.seconds} s measured after ${values.warmup} s warm-up, ~100-byte bodies; ${values.idle} idle connections\n`,
  );
  console.log(
    '| shape | delivered msg/s | vs relay | latency p50 / p99 / max ms | `sent` p50 / p99 ms | lost | duplicated | gaps synced | errors | RSS per idle connection | CPU server / load |',
  );
  console.log('| --- | ---: | ---: | --- | --- | ---: | ---: | ---: | --- | ---: | --- |');
  for (const [shape, r] of results) {
    console.log(
      `| ${shape} | ${fmt(r.perSecond)} | ${baseline ? fmt(r.perSecond / baseline, 2) : '-'} | ${fmt(r.latencyMs.p50)} / ${fmt(r.latencyMs.p99)} / ${fmt(r.latencyMs.max)} | ${fmt(r.sentLatencyMs.p50)} / ${fmt(r.sentLatencyMs.p99)} | ${r.lost} | ${r.duplicated} | ${r.syncs}${r.recoveredAtEnd ? ` (${r.recoveredAtEnd} found only by the final sync)` : ''} | ${
        Object.entries(r.errors)
          .map(([c, n]) => `${c}: ${n}`)
          .join(', ') || '-'
      } | ${fmt(r.rssPerIdleKiB, 1)} KiB | ${fmt(r.serverCpuPercent)} % / ${fmt(r.loadCpuPercent)} % |`,
    );
  }
  const work = [...results].filter(([, r]) => r.perMessage);
  if (work.length > 0) {
    console.log('\nServer work per delivered message, in the measured window:\n');
    const labels = [...new Set(work.flatMap(([, r]) => Object.keys(r.perMessage!)))];
    console.log(`| shape | ${labels.join(' | ')} |`);
    console.log(`| --- |${labels.map(() => ' ---: |').join('')}`);
    for (const [shape, r] of work)
      console.log(
        `| ${shape} | ${labels.map((l) => (l in r.perMessage! ? fmt(r.perMessage![l]!, 2) : '-')).join(' | ')} |`,
      );
  }
  const stages = [...results].filter(([, r]) => r.stageMeanMs);
  if (stages.length > 0) {
    console.log(
      "\nMean ms over each stage of a record's path (server metrics, measured window):\n",
    );
    const labels = [...new Set(stages.flatMap(([, r]) => Object.keys(r.stageMeanMs!)))];
    console.log(`| shape | ${labels.join(' | ')} |`);
    console.log(`| --- |${labels.map(() => ' ---: |').join('')}`);
    for (const [shape, r] of stages)
      console.log(
        `| ${shape} | ${labels.map((l) => (l in r.stageMeanMs! ? fmt(r.stageMeanMs![l]!, 1) : '-')).join(' | ')} |`,
      );
  }
  if (profileDir) {
    for (const shape of results.keys()) {
      for (const role of await readdir(join(profileDir, shape))) {
        const dir = join(profileDir, shape, role);
        const files = (await readdir(dir)).filter((f) => f.endsWith('.cpuprofile'));
        for (const file of files) {
          console.log(`\n${shape} server (${role}) CPU profile (${join(dir, file)}):`);
          console.log(summarizeProfile(JSON.parse(await readFile(join(dir, file), 'utf8'))));
        }
      }
    }
  }
}
