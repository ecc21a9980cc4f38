/**
 * The stream-processing runtime's behaviour, on the embedded log (runtime.embedded.test.ts)
 * and on Kafka (test/kafka/runtime.kafka.test.ts): the counting topology's output and state
 * are exactly what one clean run gives, whatever crashes, moves and restarts come between.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import type { Log } from '../../log/port.ts';
import { StateDb } from '../../state/state-db.ts';
import {
  StreamsRuntime,
  changelogTopic,
  deadLetterTopic,
} from '../../processors/runtime/runtime.ts';
import { CoPartitioningError, RetriableError } from '../../processors/runtime/errors.ts';
import { GlobalTable } from '../../processors/runtime/global-table.ts';
import {
  Topology,
  type Processor,
  type ProcessorContext,
  type Record as StreamRecord,
} from '../../processors/runtime/topology.ts';
import { countingTopology, POISON } from '../support/counting.ts';
import { eventually, text, uniqueName } from '../support/log-helpers.ts';
import { partitionFor } from '../../log/partitioner.ts';

export interface RuntimeShape {
  name: string;
  /** Opens the log in this process (on the embedded shape, no child may hold it meanwhile). */
  open(): Promise<Log>;
  close(log: Log): Promise<void>;
  /** The environment that points a child process at the same log. */
  childEnv(): Record<string, string>;
  settleMs: number;
  /** Whether this process may write to the log while a child runs on it (not embedded). */
  shared: boolean;
}

const PARTITIONS = 12;
const KEYS = 40;

async function produceWords(
  log: Log,
  topic: string,
  count: number,
  from = 0,
  /** A pause after each 1,000 records: input that keeps arriving while an app runs. */
  pauseMs = 0,
): Promise<Map<string, number>> {
  const producer = await log.producer();
  const perKey = new Map<string, number>();
  for (let start = from; start < from + count; start += 1000) {
    const records = [];
    for (let i = start; i < Math.min(from + count, start + 1000); i++) {
      const key = `k${i % KEYS}`;
      perKey.set(key, (perKey.get(key) ?? 0) + 1);
      records.push({ topic, key: Buffer.from(key), value: Buffer.from(`w${i}`) });
    }
    await producer.send(records);
    if (pauseMs > 0) await new Promise((r) => setTimeout(r, pauseMs));
  }
  await producer.close();
  return perKey;
}

/** Reads a whole topic: per key, the values in offset order. */
async function readAll(log: Log, topic: string): Promise<Map<string, string[]>> {
  const marks = await log.admin.watermarks(topic);
  const byKey = new Map<string, string[]>();
  for await (const batch of log.readPartitions(
    topic,
    marks.map((m) => ({ partition: m.partition, from: 0 })),
  )) {
    for (const r of batch.records) {
      const key = text(r.key)!;
      byKey.set(key, [...(byKey.get(key) ?? []), text(r.value)!]);
    }
  }
  return byKey;
}

/** One-partition input and output topics, the values written to the input under key k. */
async function seedInput(log: Log, input: string, output: string, values: string[]) {
  await log.admin.createTopics([
    { topic: input, partitions: 1 },
    { topic: output, partitions: 1 },
  ]);
  const producer = await log.producer();
  await producer.send(
    values.map((value) => ({ topic: input, key: Buffer.from('k'), value: Buffer.from(value) })),
  );
  await producer.close();
}

async function deadLetters(log: Log, applicationId: string) {
  const marks = await log.admin.watermarks(deadLetterTopic(applicationId));
  const dead = [];
  for await (const batch of log.readPartitions(
    deadLetterTopic(applicationId),
    marks.map((m) => ({ partition: m.partition, from: 0 })),
  ))
    dead.push(...batch.records);
  return dead;
}

/** Passes every record on. */
class Forward implements Processor<string, string> {
  private context!: ProcessorContext<string>;

  init(context: ProcessorContext<string>): void {
    this.context = context;
  }

  process(record: StreamRecord<string>): Promise<void> {
    return this.context.forward(record);
  }
}

function assertExactCounts(
  output: Map<string, string[]>,
  expected: Map<string, number>,
  what: string,
) {
  for (const [key, n] of expected) {
    const counts = (output.get(key) ?? []).map(Number);
    assert.deepEqual(
      counts,
      Array.from({ length: n }, (_, i) => i + 1),
      `${what}: key ${key} should count 1..${n} once each`,
    );
  }
}

interface Child {
  exited: Promise<number | null>;
  /** Resolves once the app has committed this many times (task commits). */
  commits(n: number): Promise<void>;
  kill(signal: NodeJS.Signals): void;
}

async function startApp(env: Record<string, string>): Promise<Child> {
  const child = spawn(process.execPath, ['--import', 'tsx', 'test/support/counting-app.ts'], {
    env: { ...process.env, ...env },
    stdio: ['ignore', 'pipe', 'inherit'],
  });
  const exited = new Promise<number | null>((resolve) => child.on('exit', (code) => resolve(code)));
  let commits = 0;
  const waiters: Array<{ n: number; resolve: () => void }> = [];
  const running = new Promise<void>((resolve, reject) => {
    createInterface({ input: child.stdout! }).on('line', (line) => {
      if (line === 'running') resolve();
      if (line === 'commit') {
        commits++;
        for (const w of waiters.filter((w) => commits >= w.n)) w.resolve();
      }
    });
    void exited.then((code) =>
      reject(new Error(`counting app exited with ${code} before running`)),
    );
  });
  await running;
  return {
    exited,
    commits: (n) =>
      new Promise<void>((resolve) => {
        if (commits >= n) resolve();
        else waiters.push({ n, resolve });
        void exited.then(() => resolve());
      }),
    kill: (signal) => child.kill(signal),
  };
}

/** Forwards each record (failing 'flaky' twice, retriably) and a tick every 100 ms. */
class FlakyTicker implements Processor<string, string> {
  private context!: ProcessorContext<string>;
  constructor(private readonly fail: () => number) {}
  init(context: ProcessorContext<string>): void {
    this.context = context;
    context.schedule(100, 'WALL_CLOCK_TIME', (now) =>
      context.forward({ key: 'tick', value: 'tick', timestamp: now }),
    );
  }
  async process(record: StreamRecord<string>): Promise<void> {
    if (record.value === 'flaky' && this.fail() < 2)
      throw new RetriableError('briefly unavailable');
    await this.context.forward(record);
  }
}

export function runtimeSuite(shape: RuntimeShape) {
  describe(`stream-processing runtime: ${shape.name}`, function () {
    this.timeout(180_000);
    let stateRoot: string;

    before(async () => {
      stateRoot = await mkdtemp(join(tmpdir(), 'kchat-state-'));
    });

    /** Runs a topology as `app` until it has committed `count` input records, then closes it. */
    /** Runs the topology until `count` records of `input` are committed (per partition: a list). */
    async function runUntilCommitted(
      log: Log,
      topology: Topology,
      app: string,
      input: string,
      count: number | number[],
    ) {
      const counts = typeof count === 'number' ? [count] : count;
      const db = await StateDb.open(join(stateRoot, app));
      const runtime = new StreamsRuntime(topology, { applicationId: app, log, stateDb: db });
      await runtime.start();
      try {
        await eventually(
          async () => {
            const committed = await log.admin.committedOffsets(app, input);
            const at = (p: number) => committed.find((c) => c.partition === p)?.offset ?? 0;
            return counts.every((n, p) => n === 0 || at(p) === n);
          },
          shape.settleMs + 20_000,
          `all ${counts.join(' + ')} records to be committed`,
        );
      } finally {
        await runtime.close();
        await db.close();
      }
    }
    after(async () => {
      await rm(stateRoot, { recursive: true, force: true });
    });

    it('counts exactly once across kill -9 at random points, then rebuilds wiped state from the changelog', async () => {
      const app = uniqueName('count');
      const input = uniqueName('words');
      const output = uniqueName('counts');
      const stateDir = join(stateRoot, app);
      let log = await shape.open();
      await log.admin.createTopics([
        { topic: input, partitions: PARTITIONS },
        { topic: output, partitions: PARTITIONS },
      ]);
      // Where the log is shared, the rest of the input arrives while the first app runs (over a
      // second or more), so that its kill lands mid-stream however fast this machine consumes.
      const backlog = await produceWords(log, input, shape.shared ? 4_000 : 20_000);
      if (!shape.shared) await shape.close(log);
      const env = {
        ...shape.childEnv(),
        STATE_DIR: stateDir,
        APP_ID: app,
        INPUT: input,
        OUTPUT: output,
      };

      const progressAtKill: number[] = [];
      let arriving: Promise<Map<string, number>> | undefined;
      for (let crash = 0; crash < 3; crash++) {
        const child = await startApp({ ...env, EXPECTED: '20000' });
        if (shape.shared) arriving ??= produceWords(log, input, 16_000, 4_000, 60);
        // Killed after a random number of task commits, with more processed but not committed.
        await child.commits(1 + Math.floor(Math.random() * 12));
        await new Promise((r) => setTimeout(r, Math.random() * 30));
        child.kill('SIGKILL');
        await child.exited;
        const probe = await shape.open();
        const committed = await probe.admin.committedOffsets(app, input);
        progressAtKill.push(committed.reduce((n, o) => n + Math.max(0, o.offset), 0));
        await shape.close(probe);
      }
      // The kills must have landed mid-stream, or this test proves nothing.
      assert.ok(
        progressAtKill.some((n) => n > 0 && n < 20_000),
        `committed input at each kill: ${progressAtKill.join(', ')}`,
      );
      const rest = (await arriving) ?? new Map<string, number>();
      if (shape.shared) await shape.close(log);
      const first = new Map([...backlog].map(([k, n]) => [k, n + (rest.get(k) ?? 0)]));
      const finish = await startApp({ ...env, EXPECTED: '20000' });
      assert.equal(await finish.exited, 0);

      log = await shape.open();
      assertExactCounts(await readAll(log, output), first, 'after three crashes');
      const changelog = await readAll(log, changelogTopic(app, 'counts'));
      for (const [key, n] of first)
        assert.equal(Number(changelog.get(key)!.at(-1)), n, `stored count of ${key}`);

      // Wipe the local state: the next run must rebuild it from the changelog before it counts on.
      await rm(stateDir, { recursive: true, force: true });
      const second = await produceWords(log, input, 2_000, 20_000);
      await shape.close(log);
      const rebuild = await startApp({ ...env, EXPECTED: '22000' });
      assert.equal(await rebuild.exited, 0);

      log = await shape.open();
      const total = new Map([...first].map(([k, n]) => [k, n + (second.get(k) ?? 0)]));
      assertExactCounts(await readAll(log, output), total, 'after the state was rebuilt');
      await shape.close(log);
    });

    for (const stage of ['sent', 'committed', 'flushed'] as const) {
      it(`counts exactly once when the process is killed at the commit stage "${stage}"`, async () => {
        const app = uniqueName('count');
        const input = uniqueName('words');
        const output = uniqueName('counts');
        let log = await shape.open();
        await log.admin.createTopics([
          { topic: input, partitions: PARTITIONS },
          { topic: output, partitions: PARTITIONS },
        ]);
        const expected = await produceWords(log, input, 5_000);
        await shape.close(log);
        const env = {
          ...shape.childEnv(),
          STATE_DIR: join(stateRoot, app),
          APP_ID: app,
          INPUT: input,
          OUTPUT: output,
          GUARANTEE: process.env.RUNTIME_TEST_GUARANTEE ?? 'exactly_once',
        };
        const crashed: boolean[] = [];
        for (const nth of [2, 7]) {
          // EXPECTED lets a run that finishes before its n-th commit exit instead of idling.
          const child = await startApp({ ...env, CRASH_AT: `${stage}:${nth}`, EXPECTED: '5000' });
          crashed.push((await child.exited) === null);
        }
        assert.ok(crashed[0], `the app killed itself at ${stage}:2`);
        const finish = await startApp({ ...env, EXPECTED: '5000' });
        assert.equal(await finish.exited, 0);
        log = await shape.open();
        try {
          assertExactCounts(await readAll(log, output), expected, `after kills at "${stage}"`);
        } finally {
          await shape.close(log);
        }
      });
    }

    it('moves tasks between two instances and back, counting exactly once', async () => {
      const app = uniqueName('count');
      const input = uniqueName('words');
      const output = uniqueName('counts');
      const log = await shape.open();
      try {
        await log.admin.createTopics([
          { topic: input, partitions: PARTITIONS },
          { topic: output, partitions: PARTITIONS },
        ]);
        const dbs = await Promise.all(
          [0, 1].map((i) => StateDb.open(join(stateRoot, `${app}-${i}`))),
        );
        const instance = (db: StateDb) =>
          new StreamsRuntime(countingTopology(input, output), {
            applicationId: app,
            log,
            stateDb: db,
            commitIntervalMs: 50,
          });
        const a = instance(dbs[0]!);
        const b = instance(dbs[1]!);
        await a.start();
        await b.start();
        await eventually(
          () =>
            a.activeTasks().length + b.activeTasks().length === PARTITIONS &&
            a.activeTasks().length > 0 &&
            b.activeTasks().length > 0,
          shape.settleMs + 30_000,
          'the tasks to be shared',
        );
        const expected = new Map<string, number>();
        const add = (m: Map<string, number>) =>
          m.forEach((n, k) => expected.set(k, (expected.get(k) ?? 0) + n));
        add(await produceWords(log, input, 5_000, 0));

        await b.close(); // mid-stream: a takes every task over
        await eventually(
          () => a.activeTasks().length === PARTITIONS,
          shape.settleMs + 30_000,
          'a to own every task',
        );
        add(await produceWords(log, input, 5_000, 5_000));

        // b starts again on its own state: tasks move back, restored from its checkpoints
        const c = instance(dbs[1]!);
        await c.start();
        await eventually(
          () => c.activeTasks().length > 0,
          shape.settleMs + 30_000,
          'c to get tasks',
        );
        add(await produceWords(log, input, 5_000, 10_000));

        await eventually(
          async () => {
            const committed = await log.admin.committedOffsets(app, input);
            return committed.reduce((n, o) => n + Math.max(0, o.offset), 0) === 15_000;
          },
          60_000,
          'every record to be committed',
        );
        await a.close();
        await c.close();
        for (const db of dbs) await db.close();
        assertExactCounts(await readAll(log, output), expected, 'after the moves');
      } finally {
        await shape.close(log);
      }
    });

    it('refuses to start when co-partitioned topics have different partition counts', async () => {
      const left = uniqueName('left');
      const right = uniqueName('right');
      const log = await shape.open();
      try {
        await log.admin.createTopics([
          { topic: left, partitions: 12 },
          { topic: right, partitions: 6 },
        ]);
        const db = await StateDb.open(join(stateRoot, uniqueName('db')));
        const runtime = new StreamsRuntime(countingTopology([left, right], uniqueName('out')), {
          applicationId: uniqueName('count'),
          log,
          stateDb: db,
        });
        await assert.rejects(
          () => runtime.start(),
          (error: unknown) =>
            error instanceof CoPartitioningError &&
            error.message.includes(`${left} (12)`) &&
            error.message.includes(`${right} (6)`),
        );
        await db.close();
      } finally {
        await shape.close(log);
      }
    });

    it('runs punctuators on wall-clock time and retries a retriable failure without a dead letter', async () => {
      const app = uniqueName('tick');
      const input = uniqueName('in');
      const output = uniqueName('out');
      const log = await shape.open();
      try {
        await log.admin.createTopics([
          { topic: input, partitions: 1 },
          { topic: output, partitions: 1 },
        ]);
        let failures = 0;
        const topology = new Topology()
          .addSource('in', { topics: [input], decode: (v) => v?.toString('utf8') ?? '' })
          .addProcessor('p', () => new FlakyTicker(() => failures++), 'in')
          .addSink('out', { topic: output, encode: (v) => Buffer.from(String(v)) }, 'p');
        const producer = await log.producer();
        await producer.send([{ topic: input, key: Buffer.from('k'), value: Buffer.from('flaky') }]);
        await producer.close();
        const db = await StateDb.open(join(stateRoot, app));
        const runtime = new StreamsRuntime(topology, { applicationId: app, log, stateDb: db });
        assert.match(runtime.notRunningBecause ?? '', /waiting for its tasks/, 'not ready');
        await runtime.start();
        await eventually(
          () => runtime.notRunningBecause === undefined,
          shape.settleMs + 30_000,
          'the runtime to report itself running (readiness)',
        );
        await eventually(
          async () => (await log.admin.committedOffsets(app, input))[0]!.offset === 1,
          shape.settleMs + 30_000,
          'the flaky record to be processed',
        );
        await new Promise((r) => setTimeout(r, 600));
        await runtime.close();
        await db.close();
        const out = await readAll(log, output);
        assert.deepEqual(out.get('k'), ['flaky'], 'processed once, after two retries');
        assert.equal(failures, 3);
        assert.ok((out.get('tick') ?? []).length >= 2, 'the punctuator ran');
        assert.equal(
          (await log.admin.watermarks(deadLetterTopic(app))).reduce((n, m) => n + m.high, 0),
          0,
        );
      } finally {
        await shape.close(log);
      }
    });

    it('loads a global table whole, follows its updates and tombstones', async () => {
      const topic = uniqueName('table');
      const log = await shape.open();
      try {
        await log.admin.createTopics([
          { topic, partitions: 3, config: { 'cleanup.policy': 'compact' } },
        ]);
        const producer = await log.producer();
        const put = (key: string, value: string | null) =>
          producer.send([
            { topic, key: Buffer.from(key), value: value === null ? null : Buffer.from(value) },
          ]);
        for (let i = 0; i < 30; i++) await put(`gw-${i}`, `v${i}`);
        await put('gw-0', 'v0-new');
        const table = new GlobalTable(log, topic, { decode: (v) => v.toString('utf8') });
        await table.start();
        assert.equal(table.size, 30, 'loaded whole before start resolves');
        assert.equal(table.get('gw-0'), 'v0-new');
        await put('gw-1', null);
        await put('gw-new', 'fresh');
        await eventually(
          () => !table.has('gw-1') && table.get('gw-new') === 'fresh',
          shape.settleMs + 20_000,
          'updates',
        );
        await table.close();
        await producer.close();
      } finally {
        await shape.close(log);
      }
    });

    it('reads a global table record again when it fails to decode for a retriable reason', async () => {
      const topic = uniqueName('table');
      const log = await shape.open();
      try {
        await log.admin.createTopics([
          { topic, partitions: 1, config: { 'cleanup.policy': 'compact' } },
        ]);
        const producer = await log.producer();
        const put = (key: string, value: string) =>
          producer.send([{ topic, key: Buffer.from(key), value: Buffer.from(value) }]);
        await put('loaded', 'v1');
        // Each value fails once, as a record does while the schema registry is unreachable;
        // a value that is bad for good is skipped.
        const failed = new Set<string>();
        const changes: string[] = [];
        const table = new GlobalTable(log, topic, {
          onChange: (key, value) => void changes.push(`${key}=${value}`),
          decode: (v) => {
            const text = v.toString('utf8');
            if (text === 'bad') throw new Error('not a value');
            if (!failed.has(text)) {
              failed.add(text);
              throw new RetriableError('the registry is unreachable');
            }
            return text;
          },
        });
        await table.start();
        assert.equal(table.get('loaded'), 'v1', 'retried while loading');
        changes.length = 0;
        await put('skipped', 'bad');
        // In one batch: a batch handed again applies only what it had not.
        await producer.send(
          ['run1', 'run2', 'run3'].map((value) => ({
            topic,
            key: Buffer.from('followed'),
            value: Buffer.from(value),
          })),
        );
        await eventually(() => table.get('followed') === 'run3', shape.settleMs + 20_000, 'run3');
        assert.equal(table.has('skipped'), false);
        assert.deepEqual(
          changes,
          ['followed=run1', 'followed=run2', 'followed=run3'],
          'in order, once',
        );
        await table.close();
        await producer.close();
      } finally {
        await shape.close(log);
      }
    });

    /**
     * The counting topology over `values`, committing every 50 ms, on a state database whose
     * writes fail while `failing` says so (given the write's checkpoint: none for a flush).
     */
    async function counting(
      values: string[],
      run: (app: {
        log: Log;
        input: string;
        output: string;
        runtime: StreamsRuntime;
      }) => Promise<void>,
      options: {
        failing?: (checkpoint: number | undefined) => boolean;
        fencedRecheckMs?: number;
      } = {},
    ) {
      const app = uniqueName('count');
      const input = uniqueName('words');
      const output = uniqueName('counts');
      const log = await shape.open();
      const db = await StateDb.open(join(stateRoot, app));
      try {
        await seedInput(log, input, output, values);
        const { failing } = options;
        if (failing) {
          const write = db.write.bind(db);
          db.write = async (store, partition, writes, checkpoint) => {
            if (failing(checkpoint)) throw new Error('No space left on device');
            return write(store, partition, writes, checkpoint);
          };
        }
        const runtime = new StreamsRuntime(countingTopology(input, output), {
          applicationId: app,
          log,
          stateDb: db,
          commitIntervalMs: 50,
          fencedRecheckMs: options.fencedRecheckMs,
        });
        await runtime.start();
        await run({ log, input, output, runtime });
        await runtime.close();
      } finally {
        await db.close();
        await shape.close(log);
      }
    }

    const sendWord = async (log: Log, input: string, word: string) => {
      const producer = await log.producer();
      await producer.send([{ topic: input, key: Buffer.from('k'), value: Buffer.from(word) }]);
      await producer.close();
    };

    it('says it is not ready while its stores cannot be written', async () => {
      let broken = false;
      await counting(
        ['a'],
        async ({ log, input, runtime }) => {
          await eventually(() => runtime.notRunningBecause === undefined, 20_000, 'ready');
          broken = true; // the disk fills up: every flush, and every restore of a revival, fails
          await sendWord(log, input, 'b');
          await eventually(
            () => /store flush failed/.test(runtime.notRunningBecause ?? ''),
            shape.settleMs + 20_000,
            'not ready, saying why',
          );
          broken = false;
          await eventually(() => runtime.notRunningBecause === undefined, 20_000, 'ready again');
        },
        { failing: () => broken },
      );
    });

    it("opens a fenced task again when its partition is still this instance's, and counts on exactly once", async () => {
      // Another instance opened the task in a generation this one missed (evicted for a while)
      // and let it go since: the group gives the partition here, and no rebalance will come.
      await counting(
        ['a'],
        async ({ log, input, output, runtime }) => {
          const counted = async (count: number) =>
            eventually(
              async () => (await readAll(log, output)).get('k')?.length === count,
              shape.settleMs + 20_000,
              `${count} counts`,
            );
          await counted(1);
          const fencer = await log.producer({ transactionalId: `${runtime.applicationId}-0` });
          await sendWord(log, input, 'b');
          await counted(2);
          await sendWord(log, input, 'c');
          await counted(3);
          await new Promise((resolve) => setTimeout(resolve, 300));
          assert.deepEqual((await readAll(log, output)).get('k'), ['1', '2', '3']);
          await fencer.close().catch(() => undefined);
        },
        { fencedRecheckMs: 500 },
      );
    });

    it('sends nothing twice when a store write fails after the commit, and counts on', async () => {
      // The local disk fails once, as the committed writes go to RocksDB (not a restore's).
      let failed = 0;
      const failing = (checkpoint: number | undefined) =>
        checkpoint === undefined && failed++ === 0;
      await counting(
        ['a', 'b', 'c', 'd', 'e'],
        async (app) => {
          const committed = async (count: number) =>
            eventually(
              async () =>
                (await app.log.admin.committedOffsets(app.runtime.applicationId, app.input))[0]!
                  .offset === count,
              shape.settleMs + 20_000,
              `${count} records committed`,
            );
          await committed(5);
          // The task was opened again, its store caught up from the changelog: it counts on.
          await sendWord(app.log, app.input, 'f');
          await committed(6);
          assert.ok(failed > 0, 'the write failed');
          // Outputs commit with their offsets: all six are in the log, each once.
          assert.deepEqual((await readAll(app.log, app.output)).get('k'), [
            '1',
            '2',
            '3',
            '4',
            '5',
            '6',
          ]);
        },
        { failing },
      );
    });

    it('sends an undecodable record to the dead-letter topic with the reason, and goes on', async () => {
      const app = uniqueName('count');
      const input = uniqueName('words');
      const output = uniqueName('counts');
      const log = await shape.open();
      try {
        await seedInput(log, input, output, ['a', POISON, 'b']);
        await runUntilCommitted(log, countingTopology(input, output), app, input, 3);
        assert.deepEqual((await readAll(log, output)).get('k'), ['1', '2']);
        const dead = await deadLetters(log, app);
        assert.equal(dead.length, 1);
        assert.equal(text(dead[0]!.value), POISON);
        assert.equal(text(dead[0]!.headers['dlq.topic']!), input);
        assert.equal(text(dead[0]!.headers['dlq.offset']!), '1');
        assert.match(text(dead[0]!.headers['dlq.reason']!)!, /not a word/);
      } finally {
        await shape.close(log);
      }
    });

    it('dead-letters a record that is not in the partition its key hashes to, or has no key, and goes on', async () => {
      // A producer with another partitioner (librdkafka's default is CRC32) would otherwise
      // give a key a second state in a task that no other record of that key reaches.
      const app = uniqueName('count');
      const input = uniqueName('words');
      const output = uniqueName('counts');
      const log = await shape.open();
      try {
        await log.admin.createTopics([
          { topic: input, partitions: 4 },
          { topic: output, partitions: 4 },
        ]);
        const home = partitionFor(Buffer.from('k'), 4);
        const away = (home + 1) % 4;
        const producer = await log.producer();
        const word = (value: string, key: string | null, partition?: number) => ({
          topic: input,
          key: key === null ? null : Buffer.from(key),
          value: Buffer.from(value),
          ...(partition === undefined ? {} : { partition }),
        });
        await producer.send([
          word('a', 'k'),
          word('misrouted', 'k', away),
          word('keyless', null, home),
        ]);
        await producer.send([word('b', 'k')]);
        await producer.close();
        const counts = [0, 0, 0, 0];
        counts[home] = 3;
        counts[away] = 1;
        await runUntilCommitted(log, countingTopology(input, output), app, input, counts);
        assert.deepEqual((await readAll(log, output)).get('k'), ['1', '2']);
        const dead = await deadLetters(log, app);
        const reasons = new Map(
          dead.map((r) => [text(r.value), text(r.headers['dlq.reason']!)!] as const),
        );
        assert.deepEqual([...reasons.keys()].sort(), ['keyless', 'misrouted']);
        assert.match(
          reasons.get('misrouted')!,
          new RegExp(`partition ${away}, but its key hashes to ${home}`),
        );
        assert.match(reasons.get('keyless')!, /no key/);
      } finally {
        await shape.close(log);
      }
    });

    it('sends an output for a topic that does not exist to the dead-letter topic, and goes on committing', async () => {
      const app = uniqueName('route');
      const input = uniqueName('routed');
      const output = uniqueName('out');
      const missing = uniqueName('missing');
      const log = await shape.open();
      try {
        await seedInput(log, input, output, [`${output}|a`, `${missing}|b`, `${output}|c`]);
        // Each record names the topic its output goes to (as the users actor names a gateway's).
        const topology = new Topology()
          .addSource('input', { topics: [input], decode: (value) => text(value) ?? '' })
          .addProcessor('route', () => new Forward(), 'input')
          .addSink<string>(
            'output',
            {
              topic: (record) => record.value.split('|')[0]!,
              encode: (value) => Buffer.from(value.split('|')[1]!),
            },
            'route',
          );
        // The log fails once to say whether the output topic exists (a broker briefly away):
        // the record is retried, not taken for one naming a missing topic.
        const describeTopic = log.admin.describeTopic.bind(log.admin);
        let failures = 0;
        log.admin.describeTopic = async (topic) => {
          if (topic === output && failures++ === 0) throw new Error('request timed out');
          return describeTopic(topic);
        };
        await runUntilCommitted(log, topology, app, input, 3);
        assert.deepEqual((await readAll(log, output)).get('k'), ['a', 'c']);
        assert.equal(await log.admin.describeTopic(missing), undefined, 'not created');
        const dead = await deadLetters(log, app);
        assert.equal(dead.length, 1);
        assert.equal(text(dead[0]!.value), 'b');
        assert.equal(text(dead[0]!.headers['dlq.output-topic']!), missing);
        assert.match(text(dead[0]!.headers['dlq.reason']!)!, /unknown topic/);
      } finally {
        await shape.close(log);
      }
    });
  });
}
