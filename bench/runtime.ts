/**
 * The runtime benchmark.
 *
 *   npm run bench -- runtime [--records N] [--restore N] [--rate R] [--seconds S] [--commit-ms MS]
 *
 * 1. Throughput: records/s through the counting topology (one store read and one write per
 *    record, 12 partitions), exactly-once and at-least-once, against a baseline in the same
 *    run: a bare consumer that produces each record on and commits offsets, with no runtime.
 * 2. Restore: records/s restoring a store from a changelog of --restore entries.
 * 3. Latency: p50/p99 from produce to the output topic at --rate records/s for --seconds.
 * On the embedded log, and on Kafka as well when KAFKA_BROKERS is set.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { parseArgs } from 'node:util';
import type { Log } from '../log/port.ts';
import { EmbeddedLog } from '../log/embedded/embedded-log.ts';
import { KafkaLog } from '../log/kafka/kafka-log.ts';
import { StateDb } from '../state/state-db.ts';
import {
  StreamsRuntime,
  changelogTopic,
  type ProcessingGuarantee,
} from '../processors/runtime/runtime.ts';
import { countingTopology } from '../test/support/counting.ts';

const PARTITIONS = 12;
const KEYS = 10_000;

interface Shape {
  name: string;
  open(): Promise<Log>;
  cleanup(): Promise<void>;
}

const stamp = () => `${Date.now()}-${Math.floor(Math.random() * 1e6)}`;

async function fill(log: Log, topic: string, count: number, label: string): Promise<void> {
  const producer = await log.producer();
  const started = Date.now();
  let last = started;
  for (let from = 0; from < count; from += 5000) {
    const records = [];
    for (let i = from; i < Math.min(count, from + 5000); i++) {
      records.push({ topic, key: Buffer.from(`k${i % KEYS}`), value: Buffer.from(`w${i}`) });
    }
    await producer.send(records);
    if (Date.now() - last > 1000) {
      last = Date.now();
      process.stderr.write(`\r  ${label}: ${from + records.length}/${count}   `);
    }
  }
  process.stderr.write('\n');
  await producer.close();
}

/** An input and an output topic, the input filled with `records` records. */
async function openTopics(
  shape: Shape,
  records: number,
): Promise<{ log: Log; input: string; output: string }> {
  const log = await shape.open();
  const input = `bench-in-${stamp()}`;
  const output = `bench-out-${stamp()}`;
  await log.admin.createTopics([
    { topic: input, partitions: PARTITIONS },
    { topic: output, partitions: PARTITIONS },
  ]);
  if (records > 0) await fill(log, input, records, 'input');
  return { log, input, output };
}

async function waitCommitted(
  log: Log,
  group: string,
  topic: string,
  count: number,
  seconds: number,
): Promise<boolean> {
  const deadline = Date.now() + seconds * 1000;
  while (Date.now() < deadline) {
    const committed = await log.admin.committedOffsets(group, topic);
    const done = committed.reduce((n, o) => n + Math.max(0, o.offset), 0);
    process.stderr.write(`\r  processed: ${done}/${count}   `);
    if (done >= count) {
      process.stderr.write('\n');
      return true;
    }
    await new Promise((r) => setTimeout(r, 200));
  }
  process.stderr.write('\n');
  return false;
}

async function runtimeThroughput(
  shape: Shape,
  guarantee: ProcessingGuarantee,
  records: number,
  commitMs: number,
  seconds: number,
) {
  const { log, input, output } = await openTopics(shape, records);
  const dir = await mkdtemp(join(tmpdir(), 'kchat-bench-state-'));
  const stateDb = await StateDb.open(dir);
  const app = `bench-${guarantee}-${stamp()}`;
  const runtime = new StreamsRuntime(countingTopology(input, output), {
    applicationId: app,
    log,
    stateDb,
    guarantee,
    commitIntervalMs: commitMs,
  });
  const started = performance.now();
  await runtime.start();
  const complete = await waitCommitted(log, app, input, records, seconds);
  const perSecond = records / ((performance.now() - started) / 1000);
  await runtime.close();
  await stateDb.close();
  await rm(dir, { recursive: true, force: true });
  await log.close();
  return { perSecond: complete ? perSecond : NaN };
}

/** The same records consumed and produced on, offsets committed, no runtime, no state. */
async function bareBaseline(shape: Shape, records: number, seconds: number) {
  const { log, input, output } = await openTopics(shape, records);
  const group = `bench-bare-${stamp()}`;
  const consumer = log.consumer({ groupId: group });
  const producer = await log.producer();
  await consumer.subscribe([input]);
  const started = performance.now();
  await consumer.run({
    eachBatch: async (batch) => {
      await producer.send(
        batch.records.map((r) => ({ topic: output, key: r.key, value: r.value })),
      );
      const last = batch.records[batch.records.length - 1]!;
      await consumer.commit([
        { topic: input, partition: batch.partition, offset: last.offset + 1 },
      ]);
    },
  });
  const complete = await waitCommitted(log, group, input, records, seconds);
  const perSecond = records / ((performance.now() - started) / 1000);
  await consumer.close();
  await producer.close();
  await log.close();
  return { perSecond: complete ? perSecond : NaN };
}

async function restore(shape: Shape, entries: number, seconds: number) {
  const log = await shape.open();
  const app = `bench-restore-${stamp()}`;
  const input = `bench-in-${stamp()}`;
  await log.admin.createTopics([
    { topic: input, partitions: PARTITIONS },
    {
      topic: changelogTopic(app, 'counts'),
      partitions: PARTITIONS,
      config: { 'cleanup.policy': 'compact' },
    },
  ]);
  // A changelog as the counting store writes it: key -> count, as text.
  const producer = await log.producer();
  let last = Date.now();
  for (let from = 0; from < entries; from += 5000) {
    const records = [];
    for (let i = from; i < Math.min(entries, from + 5000); i++) {
      records.push({
        topic: changelogTopic(app, 'counts'),
        key: Buffer.from(`k${i}`),
        value: Buffer.from(String(i)),
      });
    }
    await producer.send(records);
    if (Date.now() - last > 1000) {
      last = Date.now();
      process.stderr.write(`\r  changelog: ${from + records.length}/${entries}   `);
    }
  }
  process.stderr.write('\n');
  await producer.close();
  const dir = await mkdtemp(join(tmpdir(), 'kchat-bench-state-'));
  const stateDb = await StateDb.open(dir);
  const runtime = new StreamsRuntime(countingTopology(input, `bench-out-${stamp()}`), {
    applicationId: app,
    log,
    stateDb,
  });
  const started = performance.now();
  await runtime.start();
  const deadline = Date.now() + seconds * 1000;
  while (runtime.activeTasks().length < PARTITIONS && Date.now() < deadline)
    await new Promise((r) => setTimeout(r, 50));
  const ms = performance.now() - started;
  const restored = runtime.activeTasks().length === PARTITIONS;
  await runtime.close();
  await stateDb.close();
  await rm(dir, { recursive: true, force: true });
  await log.close();
  return { perSecond: restored ? entries / (ms / 1000) : NaN, ms };
}

async function latency(shape: Shape, rate: number, seconds: number, commitMs: number) {
  const { log, input, output } = await openTopics(shape, 0);
  const dir = await mkdtemp(join(tmpdir(), 'kchat-bench-state-'));
  const stateDb = await StateDb.open(dir);
  const runtime = new StreamsRuntime(countingTopology(input, output), {
    applicationId: `bench-latency-${stamp()}`,
    log,
    stateDb,
    commitIntervalMs: commitMs,
  });
  await runtime.start();
  const latencies: number[] = [];
  const reader = log.consumer({ groupId: `bench-reader-${stamp()}`, startFrom: 'latest' });
  await reader.subscribe([output]);
  await reader.run({
    eachBatch: async (batch) => {
      const now = Date.now();
      for (const r of batch.records) latencies.push(now - r.timestamp);
    },
  });
  await new Promise((r) => setTimeout(r, 1000)); // let both groups settle
  const producer = await log.producer();
  const total = rate * seconds;
  const started = Date.now();
  for (let i = 0; i < total; i++) {
    // Paced: record i leaves at started + i / rate.
    const due = started + (i * 1000) / rate;
    const wait = due - Date.now();
    if (wait > 0) await new Promise((r) => setTimeout(r, wait));
    void producer.send([
      {
        topic: input,
        key: Buffer.from(`k${i % KEYS}`),
        value: Buffer.from(`w${i}`),
        timestamp: Date.now(),
      },
    ]);
  }
  const deadline = Date.now() + 10_000;
  while (latencies.length < total && Date.now() < deadline)
    await new Promise((r) => setTimeout(r, 50));
  await producer.close();
  await reader.close();
  await runtime.close();
  await stateDb.close();
  await rm(dir, { recursive: true, force: true });
  await log.close();
  const sorted = [...latencies].sort((a, b) => a - b);
  const at = (q: number) =>
    sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))] ?? NaN;
  return {
    received: latencies.length,
    sent: total,
    p50: at(0.5),
    p99: at(0.99),
    max: sorted.at(-1) ?? NaN,
  };
}

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      records: { type: 'string', default: '100000' },
      restore: { type: 'string', default: '1000000' },
      rate: { type: 'string', default: '500' },
      seconds: { type: 'string', default: '10' },
      'commit-ms': { type: 'string', default: '100' },
      timeout: { type: 'string', default: '300' },
    },
  });
  const records = Number(values.records);
  const timeout = Number(values.timeout);
  const commitMs = Number(values['commit-ms']);
  const shapes: Shape[] = [];
  let dir = '';
  shapes.push({
    name: 'embedded',
    open: async () => {
      dir ||= await mkdtemp(join(tmpdir(), 'kchat-bench-log-'));
      return EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    },
    cleanup: async () => {
      await rm(dir, { recursive: true, force: true });
      dir = '';
    },
  });
  const brokers = process.env.KAFKA_BROKERS;
  if (brokers) {
    shapes.push({
      name: `kafka (${brokers})`,
      open: async () => new KafkaLog({ brokers: brokers.split(','), clientId: 'bench' }),
      cleanup: async () => undefined,
    });
  } else console.log('(KAFKA_BROKERS unset: no Kafka figures)');
  console.log(
    `# ${records} records over ${PARTITIONS} partitions and ${KEYS} keys; commit interval ${commitMs} ms`,
  );

  const rows: string[] = [];
  for (const shape of shapes) {
    console.log(`\n## ${shape.name}`);
    console.log('baseline: bare consume -> produce -> commit');
    const bare = await bareBaseline(shape, records, timeout);
    console.log('runtime, exactly-once');
    const eos = await runtimeThroughput(shape, 'exactly_once', records, commitMs, timeout);
    console.log('runtime, at-least-once');
    const alos = await runtimeThroughput(shape, 'at_least_once', records, commitMs, timeout);
    console.log(`restore from a changelog of ${values.restore} entries`);
    const restored = await restore(shape, Number(values.restore), timeout);
    console.log(`latency at ${values.rate} records/s for ${values.seconds} s`);
    const lat = await latency(shape, Number(values.rate), Number(values.seconds), commitMs);
    await shape.cleanup();
    const r = (n: number) => (Number.isNaN(n) ? 'timed out' : String(Math.round(n)));
    rows.push(
      `| ${shape.name} | ${r(bare.perSecond)} | ${r(eos.perSecond)} (${(eos.perSecond / bare.perSecond).toFixed(2)}) | ${r(alos.perSecond)} (${(alos.perSecond / bare.perSecond).toFixed(2)}) | ${r(restored.perSecond)} | ${lat.p50} / ${lat.p99} / ${lat.max} ms (${lat.received}/${lat.sent}) |`,
    );
  }
  console.log(
    '\n| shape | baseline records/s | exactly-once records/s (vs baseline) | at-least-once records/s (vs baseline) | restore records/s | latency p50 / p99 / max |',
  );
  console.log('| --- | ---: | ---: | ---: | ---: | --- |');
  for (const row of rows) console.log(row);
}
