/**
 * The Kafka adapter's edges against a real broker, each where it once broke the port's promise
 * (found by a review helper, session 18): a send grouped with a failing one, 'latest' with a
 * committed offset, members subscribing to different topics, the request bound of small records.
 */
import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import type { LogRecord, Producer, TopicPartition } from '../../log/port.ts';
import { KafkaLog } from '../../log/kafka/kafka-log.ts';

const brokers = () => process.env.KAFKA_BROKERS!.split(',');
const uid = (what: string) => `kadapt-${what}-${randomUUID().slice(0, 8)}`;
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
async function eventually(check: () => boolean, ms: number, what: string) {
  const until = Date.now() + ms;
  while (!check()) {
    if (Date.now() > until) throw new Error(`timed out waiting for ${what}`);
    await sleep(100);
  }
}

/** Every committed record of a partition, from 0 to the end (bounded). */
async function readAll(log: KafkaLog, topic: string, partition: number): Promise<LogRecord[]> {
  const out: LogRecord[] = [];
  for await (const batch of log.readPartitions(topic, [{ partition, from: 0 }]))
    out.push(...batch.records);
  return out;
}

describe('kafka adapter: producer group commit', function () {
  this.timeout(90_000);
  let log: KafkaLog;
  before(() => (log = new KafkaLog({ brokers: brokers(), clientId: 'rvk' })));
  after(() => log.close());

  /** Fails the n-th kafkajs sendBatch call of a producer (1-based) without sending it. */
  function failNth(producer: Producer, n: number) {
    const inner = (producer as unknown as { producer: { sendBatch: (...a: unknown[]) => unknown } })
      .producer;
    const original = inner.sendBatch.bind(inner);
    let calls = 0;
    inner.sendBatch = (...args: unknown[]) => {
      calls++;
      if (calls === n)
        return Promise.reject(
          Object.assign(new Error('injected: request timed out'), { retriable: true }),
        );
      return original(...args);
    };
    return () => calls;
  }

  it('a send whose records were all written resolves, even when a larger send grouped with it fails', async () => {
    const topic = uid('group');
    await log.admin.createTopics([{ topic, partitions: 1 }]);
    const producer = await log.producer();
    const calls = failNth(producer, 2);
    // Two callers in one event-loop turn: the small send and a 600 KiB one go out as one group,
    // split into two requests at 512 KiB; the second request fails.
    const small = producer.send([
      { topic, partition: 0, key: Buffer.from('a'), value: Buffer.from('small') },
    ]);
    const large = producer.send([
      { topic, partition: 0, key: Buffer.from('b'), value: Buffer.alloc(600 * 1024, 1) },
    ]);
    const [smallOutcome, largeOutcome] = await Promise.allSettled([small, large]);
    assert.equal(calls(), 2, 'two requests');
    assert.equal(largeOutcome.status, 'rejected', 'the large send failed');
    const written = (await readAll(log, topic, 0)).map((r) => r.key!.toString());
    assert.deepEqual(written, ['a'], "the small send's record is durable in the log");
    // The small caller was told it failed: it sends again and the record is duplicated.
    assert.equal(
      smallOutcome.status,
      'fulfilled',
      `the small send was rejected (${(smallOutcome as PromiseRejectedResult).reason?.message}) although its record is at offset 0`,
    );
    await producer.close();
  });
});

describe('kafka adapter: consumer starting from the end with a committed offset', function () {
  this.timeout(90_000);
  let log: KafkaLog;
  before(() => (log = new KafkaLog({ brokers: brokers(), clientId: 'rvk' })));
  after(() => log.close());

  it("starts a partition that has a committed offset at that offset (port: 'latest' is only for no committed offset; the embedded log does so)", async () => {
    const topic = uid('latest-committed');
    const groupId = uid('g');
    await log.admin.createTopics([{ topic, partitions: 1 }]);
    const producer = await log.producer();
    await producer.send(
      [0, 1, 2, 3, 4].map((i) => ({ topic, partition: 0, key: null, value: Buffer.from(`r${i}`) })),
    );
    await producer.close();
    // The group has committed offset 2: records 2, 3, 4 are still to read.
    const tx = await log.producer({ transactionalId: uid('tx') });
    const t = await tx.transaction();
    await t.sendOffsets(groupId, [{ topic, partition: 0, offset: 2 }]);
    await t.commit();
    await tx.close();
    for (let i = 0; i < 50; i++) {
      if ((await log.admin.committedOffsets(groupId, topic))[0]?.offset === 2) break;
      await sleep(100);
    }
    assert.equal((await log.admin.committedOffsets(groupId, topic))[0]?.offset, 2);

    const consumer = log.consumer({ groupId, startFrom: 'latest' });
    const read: string[] = [];
    let assigned: TopicPartition[] | undefined;
    await consumer.subscribe([topic]);
    await consumer.run({
      onAssignment: (a) => void (assigned = a),
      eachBatch: async (batch) => void read.push(...batch.records.map((r) => r.value!.toString())),
    });
    try {
      await eventually(() => (assigned?.length ?? 0) > 0, 30_000, 'the assignment');
      for (let i = 0; i < 50 && read.length < 3; i++) await sleep(100);
      assert.deepEqual(read, ['r2', 'r3', 'r4'], 'read from the committed offset');
    } finally {
      await consumer.close();
    }
  });
});

describe('kafka adapter: group whose members subscribe to different topics (a rolling deploy adding a source)', function () {
  this.timeout(120_000);
  let log: KafkaLog;
  before(() => (log = new KafkaLog({ brokers: brokers(), clientId: 'rvk' })));
  after(() => log.close());

  it('gives a member the partitions of a topic only it subscribes to, for its own task numbers (as the embedded log does)', async () => {
    const t1 = uid('t1');
    const t2 = uid('t2');
    const groupId = uid('g');
    await log.admin.createTopics([
      { topic: t1, partitions: 2 },
      { topic: t2, partitions: 2 },
    ]);
    const assignments = { a: [] as TopicPartition[][], b: [] as TopicPartition[][] };
    const readByB: string[] = [];
    // a: the old version, sources [t1]; it joins first and leads the group.
    const a = log.consumer({ groupId, sessionTimeoutMs: 6000 });
    await a.subscribe([t1]);
    await a.run({ onAssignment: (x) => void assignments.a.push(x), eachBatch: async () => {} });
    await eventually(() => assignments.a.at(-1)?.length === 2, 30_000, 'a alone has t1');
    // b: the new version, sources [t1, t2].
    const b = log.consumer({ groupId, sessionTimeoutMs: 6000 });
    await b.subscribe([t1, t2]);
    await b.run({
      onAssignment: (x) => void assignments.b.push(x),
      eachBatch: async (batch) =>
        void readByB.push(
          ...batch.records.map((r) => `${r.topic === t2 ? 't2' : 't1'}/${r.partition}`),
        ),
    });
    try {
      await eventually(
        () => (assignments.b.at(-1)?.length ?? 0) > 0 && assignments.a.at(-1)?.length === 1,
        40_000,
        'one task each',
      );
      const bTasks = [...new Set(assignments.b.at(-1)!.map((tp) => tp.partition))];
      const producer = await log.producer();
      await producer.send(
        [0, 1].map((p) => ({ topic: t2, partition: p, key: null, value: Buffer.from('x') })),
      );
      await producer.close();
      for (let i = 0; i < 80 && !readByB.some((r) => r.startsWith('t2')); i++) await sleep(100);
      assert.deepEqual(
        {
          assignment: assignments.b
            .at(-1)!
            .map((tp) => `${tp.topic === t2 ? 't2' : 't1'}/${tp.partition}`)
            .sort(),
          read: readByB.filter((r) => r.startsWith('t2')),
        },
        {
          assignment: bTasks.flatMap((p) => [`t1/${p}`, `t2/${p}`]).sort(),
          read: bTasks.map((p) => `t2/${p}`),
        },
        "b owns t2's partition of its task and reads it",
      );
    } finally {
      await Promise.all([a.close(), b.close()]);
    }
  });
});

describe('kafka adapter: the request bound counts the framing of each record', function () {
  this.timeout(150_000);
  let log: KafkaLog;
  before(() => (log = new KafkaLog({ brokers: brokers(), clientId: 'rvk' })));
  after(() => log.close());

  // 90,000 tombstones of 3-byte keys: 270 KB of payload, one request by inRequests' count, but
  // about 1.2 MB of record batch on the wire (each record's own framing is ~10 bytes), over the
  // broker's message.max.bytes (1 MiB). kafkajs retries MESSAGE_TOO_LARGE for ~90 s, then fails.
  it('takes one send of many small records (90,000 tombstones with 3-byte keys)', async () => {
    const topic = uid('small');
    await log.admin.createTopics([{ topic, partitions: 1 }]);
    const producer = await log.producer();
    const records = Array.from({ length: 90_000 }, (_, i) => ({
      topic,
      partition: 0,
      key: Buffer.from(i.toString(36).padStart(3, '0')),
      value: null,
    }));
    try {
      const metadata = await producer.send(records);
      assert.equal(metadata.length, records.length);
    } finally {
      await producer.close();
    }
  });
});
