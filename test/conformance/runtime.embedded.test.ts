import assert from 'node:assert/strict';
import { rmSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Log } from '../../log/port.ts';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { StreamsRuntime } from '../../processors/runtime/runtime.ts';
import {
  Topology,
  type Processor,
  type ProcessorContext,
  type Record as StreamRecord,
} from '../../processors/runtime/topology.ts';
import { StateDb } from '../../state/state-db.ts';
import type { KeyValueStore } from '../../state/store.ts';
import { eventually, text } from '../support/log-helpers.ts';
import { runtimeSuite } from './runtime.suite.ts';

// One log directory for the whole suite, made when first opened, removed when the run ends.
let dir: string | undefined;
const logDir = async () => (dir ??= await mkdtemp(join(tmpdir(), 'kchat-runtime-log-')));
process.on('exit', () => dir && rmSync(dir, { recursive: true, force: true }));

runtimeSuite({
  name: 'embedded',
  open: async () => EmbeddedLog.open({ dataDir: await logDir(), cleanerIntervalMs: 0 }),
  close: (log: Log) => log.close(),
  childEnv: () => ({ LOG_DIR: dir! }),
  settleMs: 0,
  shared: false,
});

/** A gate the slow instance's punctuator waits on: a punctuator holding its runtime's lock. */
let gate: Promise<void> | undefined;

class SlowlyPunctuatedCount implements Processor<string, number> {
  private context!: ProcessorContext<number>;
  private counts!: KeyValueStore<number>;
  constructor(private readonly slow: boolean) {}
  init(context: ProcessorContext<number>): void {
    this.context = context;
    this.counts = context.getStateStore<number>('counts');
    context.schedule(50, 'WALL_CLOCK_TIME', async () => {
      if (this.slow) await gate;
    });
  }
  async process(record: StreamRecord<string>): Promise<void> {
    const count = ((await this.counts.get(record.key)) ?? 0) + 1;
    this.counts.put(record.key, count);
    await this.context.forward({ ...record, value: count });
  }
}

describe('stream-processing runtime: embedded, a task revoked late', function () {
  this.timeout(60_000);
  const PARTITIONS = 4;

  it('checkpoints none of the new owner’s writes, and counts exactly once when it comes back', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-handover-'));
    const log = await EmbeddedLog.open({ dataDir: join(dir, 'log'), cleanerIntervalMs: 0 });
    const dbs = [await StateDb.open(join(dir, 'a')), await StateDb.open(join(dir, 'b'))];
    const expected = new Map<string, number>();
    let release = () => {};
    const produce = async (count: number) => {
      const producer = await log.producer();
      await producer.send(
        Array.from({ length: count }, (_, i) => {
          const key = `k${i % 16}`;
          expected.set(key, (expected.get(key) ?? 0) + 1);
          return { topic: 'words', key: Buffer.from(key), value: Buffer.from(`w${i}`) };
        }),
      );
      await producer.close();
    };
    const committed = async (total: number) =>
      eventually(
        async () =>
          (await log.admin.committedOffsets('count', 'words')).reduce(
            (n, o) => n + Math.max(0, o.offset),
            0,
          ) === total,
        10_000,
        `${total} committed`,
      );
    try {
      await log.admin.createTopics([
        { topic: 'words', partitions: PARTITIONS },
        { topic: 'counts', partitions: PARTITIONS },
      ]);
      const instance = (db: StateDb, slow: boolean) =>
        new StreamsRuntime(
          new Topology()
            .addSource('input', { topics: ['words'], decode: (v) => text(v) ?? '' })
            .addProcessor('count', () => new SlowlyPunctuatedCount(slow), 'input')
            .addStateStore({ name: 'counts' }, 'count')
            .addSink(
              'output',
              { topic: 'counts', encode: (n: number) => Buffer.from(`${n}`) },
              'count',
            ),
          { applicationId: 'count', log, stateDb: db, commitIntervalMs: 50 },
        );
      const a = instance(dbs[0]!, true);
      await a.start();
      await eventually(() => a.activeTasks().length === PARTITIONS, 10_000, 'a owns every task');
      await produce(400);
      await committed(400);
      // a's punctuator hangs, holding its lock: a lets go of the tasks b takes only later.
      gate = new Promise<void>((resolve) => (release = resolve));
      await new Promise((resolve) => setTimeout(resolve, 200));
      const b = instance(dbs[1]!, false);
      await b.start();
      await eventually(() => b.activeTasks().length > 0, 10_000, 'b gets tasks');
      await produce(400);
      const taken = b.activeTasks();
      await eventually(
        async () => {
          const offsets = await log.admin.committedOffsets('count', 'words');
          const marks = await log.admin.watermarks('words');
          return taken.every((p) => offsets[p]!.offset === marks[p]!.high);
        },
        10_000,
        'b to commit what it took',
      );
      release();
      await committed(800);
      // b leaves: a takes its tasks back, restoring from its own checkpoints.
      await b.close();
      await eventually(() => a.activeTasks().length === PARTITIONS, 10_000, 'a owns all again');
      await produce(400);
      await committed(1200);
      await a.close();
      const counts = new Map<string, number[]>();
      for (const r of await readAllRecords(log, 'counts', PARTITIONS))
        counts.set(text(r.key)!, [...(counts.get(text(r.key)!) ?? []), Number(text(r.value))]);
      const wrong = [...expected].filter(([key, n]) => {
        const seen = counts.get(key) ?? [];
        return seen.length !== n || seen.some((c, i) => c !== i + 1);
      });
      assert.deepEqual(
        wrong.map(([key, n]) => `${key}: 1..${n} expected, ${counts.get(key)?.join(',')}`),
        [],
      );
    } finally {
      release();
      gate = undefined;
      await log.close().catch(() => undefined);
      for (const db of dbs) await db.close().catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
    }
  });
});

/** Every record of a topic's partitions (readPartitions stops at their ends). */
async function readAllRecords(log: Log, topic: string, partitions: number) {
  const records = [];
  const starts = Array.from({ length: partitions }, (_, partition) => ({ partition, from: 0 }));
  for await (const batch of log.readPartitions(topic, starts)) records.push(...batch.records);
  return records;
}
