/**
 * The log benchmark: produce and consume records/s, 1 KiB keyed records over 12 partitions.
 *
 *   npm run bench -- log [--records N] [--batch N] [--inflight N] [--seconds S]
 *
 * Shapes: a raw RocksDB write of the same records in the same batches (the ceiling of the
 * embedded log, its baseline), the embedded log with and without fsync per write batch, and
 * Apache Kafka when KAFKA_BROKERS is set. Every phase is bounded by --records and --seconds.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import { RocksLevel } from '@nxtedition/rocksdb';
import type { Log, ProducerRecord } from '../log/port.ts';
import { EmbeddedLog } from '../log/embedded/embedded-log.ts';
import { KafkaLog } from '../log/kafka/kafka-log.ts';
import { storedRecord } from '../log/embedded/partition-store.ts';
import { recordKey } from '../log/embedded/keys.ts';

const PARTITIONS = 12;

interface Options {
  records: number;
  batch: number;
  inflight: number;
  seconds: number;
}

interface Figures {
  shape: string;
  produced: number;
  producePerSecond: number;
  consumePerSecond?: number;
}

const value = Buffer.alloc(1024, 'x');
const recordAt = (topic: string, i: number): ProducerRecord => ({
  topic,
  key: Buffer.from(`user-${i % 10_000}`),
  value,
});

function progress(label: string, done: number, total: number, started: number) {
  const rate = done / ((performance.now() - started) / 1000);
  process.stderr.write(`\r  ${label}: ${done}/${total} (${Math.round(rate)} records/s)   `);
}

async function produce(
  log: Log,
  topic: string,
  o: Options,
): Promise<{ count: number; perSecond: number }> {
  const producer = await log.producer();
  const started = performance.now();
  const deadline = started + o.seconds * 1000;
  let next = 0;
  let done = 0;
  let lastReport = started;
  const worker = async () => {
    while (next < o.records && performance.now() < deadline) {
      const from = next;
      next = Math.min(o.records, next + o.batch);
      const records: ProducerRecord[] = [];
      for (let i = from; i < next; i++) records.push(recordAt(topic, i));
      await producer.send(records);
      done += records.length;
      if (performance.now() - lastReport > 1000) {
        lastReport = performance.now();
        progress('produce', done, o.records, started);
      }
    }
  };
  await Promise.all(Array.from({ length: o.inflight }, worker));
  const perSecond = done / ((performance.now() - started) / 1000);
  process.stderr.write('\n');
  await producer.close();
  return { count: done, perSecond };
}

async function consume(log: Log, topic: string, count: number, o: Options): Promise<number> {
  const consumer = log.consumer({ groupId: `bench-${Date.now()}`, maxBatchSize: 2000 });
  await consumer.subscribe([topic]);
  let seen = 0;
  let started = 0;
  let lastReport = 0;
  let finish!: () => void;
  const finished = new Promise<void>((resolve) => (finish = resolve));
  await consumer.run({
    eachBatch: async (batch) => {
      if (started === 0) started = performance.now();
      seen += batch.records.length;
      if (performance.now() - lastReport > 1000) {
        lastReport = performance.now();
        progress('consume', seen, count, started);
      }
      if (seen >= count) finish();
    },
  });
  const timeout = setTimeout(finish, o.seconds * 1000);
  await finished;
  clearTimeout(timeout);
  const perSecond = seen / ((performance.now() - started) / 1000);
  process.stderr.write('\n');
  await consumer.close();
  return perSecond;
}

async function rawRocksDb(o: Options): Promise<Figures> {
  const dir = await mkdtemp(join(tmpdir(), 'kchat-bench-raw-'));
  const db = new RocksLevel<string, Buffer>(dir, { keyEncoding: 'utf8', valueEncoding: 'buffer' });
  await db.open({ createIfMissing: true });
  const started = performance.now();
  const deadline = started + o.seconds * 1000;
  const offsets = new Array<number>(PARTITIONS).fill(0);
  let next = 0;
  // The same sends, the same number in flight, each one write batch: what the embedded log
  // would cost with no log of its own (no offsets, no high watermarks, no group commit).
  const worker = async () => {
    while (next < o.records && performance.now() < deadline) {
      const from = next;
      next = Math.min(o.records, next + o.batch);
      const batch = db.batch();
      for (let i = from; i < next; i++) {
        const p = i % PARTITIONS;
        batch.put(
          recordKey('raw', p, offsets[p]!++),
          storedRecord({ key: Buffer.from(`user-${i % 10_000}`), value }),
        );
      }
      await batch.write();
    }
  };
  await Promise.all(Array.from({ length: o.inflight }, worker));
  const done = Math.min(next, o.records);
  const perSecond = done / ((performance.now() - started) / 1000);
  await db.close();
  await rm(dir, { recursive: true, force: true });
  return {
    shape: 'raw RocksDB batch writes (baseline)',
    produced: done,
    producePerSecond: perSecond,
  };
}

async function embedded(o: Options, syncWrites: boolean): Promise<Figures> {
  const dir = await mkdtemp(join(tmpdir(), 'kchat-bench-log-'));
  const log = await EmbeddedLog.open({ dataDir: dir, syncWrites, cleanerIntervalMs: 0 });
  await log.admin.createTopics([{ topic: 'bench', partitions: PARTITIONS }]);
  const batchesBefore = log.store.writeBatches;
  const { count, perSecond } = await produce(log, 'bench', o);
  const writeBatches = log.store.writeBatches - batchesBefore;
  const consumePerSecond = await consume(log, 'bench', count, o);
  await log.close();
  await rm(dir, { recursive: true, force: true });
  console.log(
    `  (embedded${syncWrites ? ', fsync' : ''}: ${count} records in ${writeBatches} write batches)`,
  );
  return {
    shape: `embedded log${syncWrites ? ' (SYNC_WRITES=true)' : ''}`,
    produced: count,
    producePerSecond: perSecond,
    consumePerSecond,
  };
}

async function kafka(o: Options, brokers: string): Promise<Figures> {
  const log = new KafkaLog({ brokers: brokers.split(','), clientId: 'bench' });
  const topic = `bench-${Date.now()}`;
  await log.admin.createTopics([{ topic, partitions: PARTITIONS }]);
  const { count, perSecond } = await produce(log, topic, o);
  const consumePerSecond = await consume(log, topic, count, o);
  await log.admin.deleteTopics([topic]);
  await log.close();
  return {
    shape: `kafka (${brokers})`,
    produced: count,
    producePerSecond: perSecond,
    consumePerSecond,
  };
}

const median = (values: number[]) =>
  [...values].sort((a, b) => a - b)[Math.floor(values.length / 2)]!;

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      records: { type: 'string', default: '100000' },
      batch: { type: 'string', default: '500' },
      inflight: { type: 'string', default: '4' },
      seconds: { type: 'string', default: '60' },
      rounds: { type: 'string', default: '3' },
    },
  });
  const o: Options = {
    records: Number(values.records),
    batch: Number(values.batch),
    inflight: Number(values.inflight),
    seconds: Number(values.seconds),
  };
  const rounds = Number(values.rounds);
  console.log(
    `# ${o.records} records of 1 KiB, keyed, ${PARTITIONS} partitions; sends of ${o.batch} records, ${o.inflight} in flight`,
  );
  console.log(
    `# ${rounds} rounds, shapes alternating within each round; the median is reported (the first runs pay JIT and RocksDB warm-up)`,
  );
  const shapes: Array<[string, () => Promise<Figures>]> = [
    ['raw RocksDB', () => rawRocksDb(o)],
    ['embedded log', () => embedded(o, false)],
    ['embedded log, SYNC_WRITES=true', () => embedded(o, true)],
  ];
  const kafkaBrokers = process.env.KAFKA_BROKERS;
  if (kafkaBrokers) shapes.push(['kafka', () => kafka(o, kafkaBrokers)]);
  else console.log('(KAFKA_BROKERS unset: no Kafka figures)');
  const runs = new Map<string, Figures[]>();
  for (let round = 1; round <= rounds; round++) {
    for (const [label, measure] of shapes) {
      console.log(`round ${round}/${rounds}: ${label}`);
      const figures = await measure();
      runs.set(label, [...(runs.get(label) ?? []), figures]);
    }
  }
  const summary = [...runs.values()].map((list) => ({
    shape: list[0]!.shape,
    produced: list[0]!.produced,
    producePerSecond: median(list.map((f) => f.producePerSecond)),
    all: list.map((f) => Math.round(f.producePerSecond)).join(' / '),
    consumePerSecond:
      list[0]!.consumePerSecond === undefined
        ? undefined
        : median(list.map((f) => f.consumePerSecond!)),
  }));
  const baseline = summary[0]!.producePerSecond;
  console.log(
    '\n| shape | records | produce records/s (median) | each round | vs baseline | consume records/s (median) |',
  );
  console.log('| --- | ---: | ---: | --- | ---: | ---: |');
  for (const r of summary) {
    console.log(
      `| ${r.shape} | ${r.produced} | ${Math.round(r.producePerSecond)} | ${r.all} | ${(r.producePerSecond / baseline).toFixed(2)} | ${r.consumePerSecond === undefined ? '-' : Math.round(r.consumePerSecond)} |`,
    );
  }
}
