import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import type { TopicPartition } from '../../log/port.ts';
import { KafkaLog } from '../../log/kafka/kafka-log.ts';
import { logConformance } from '../conformance/log.suite.ts';

let log: KafkaLog;

logConformance(
  `kafka (${process.env.KAFKA_BROKERS})`,
  async () => {
    log = new KafkaLog({ brokers: process.env.KAFKA_BROKERS!.split(','), clientId: 'conformance' });
    return { log, settleMs: 15000 };
  },
  async () => {
    await log.close();
  },
);

describe('kafka consumer starting from the end', function () {
  this.timeout(60_000);

  it('still hands its assignment over, and reads, when finding the ends fails', async () => {
    const kafka = new KafkaLog({
      brokers: process.env.KAFKA_BROKERS!.split(','),
      clientId: 'placing',
    });
    const topic = `placing-${randomUUID()}`;
    await kafka.admin.createTopics([{ topic, partitions: 2 }]);
    kafka.admin.watermarks = () => Promise.reject(new Error('the broker is unreachable'));
    const consumer = kafka.consumer({ groupId: `placing-${randomUUID()}`, startFrom: 'latest' });
    try {
      await consumer.subscribe([topic]);
      const read: string[] = [];
      let assigned!: (assignment: TopicPartition[]) => void;
      const assignment = new Promise<TopicPartition[]>((resolve) => (assigned = resolve));
      await consumer.run({
        onAssignment: assigned,
        eachBatch: async (batch) => {
          for (const r of batch.records) read.push(r.value!.toString());
        },
      });
      assert.equal((await assignment).length, 2, 'the assignment, handed over');
      // kafkajs places a partition without a committed offset at its end when it first fetches:
      // a record sent before that is behind the place, so one goes every 500 ms until one is read.
      const producer = await kafka.producer();
      for (let i = 0; i < 60 && read.length === 0; i++) {
        await producer.send([{ topic, key: Buffer.from('k'), value: Buffer.from(`after ${i}`) }]);
        await new Promise((resolve) => setTimeout(resolve, 500));
      }
      await producer.close();
      assert.ok(read.length > 0, 'records sent after the assignment are read');
    } finally {
      await consumer.close();
      await kafka.close();
    }
  });
});

/**
 * Two members of one group on a topic of four partitions, a record in each. a runs at once,
 * and its first onAssignment is held until `release()` (a task restoring its stores): its
 * batches wait for it, so kafkajs cannot rejoin meanwhile. b joins when the test says.
 */
async function slowFirstAssignment(name: string) {
  const kafka = new KafkaLog({ brokers: process.env.KAFKA_BROKERS!.split(','), clientId: name });
  const topic = `${name}-${randomUUID()}`;
  const groupId = `${name}-${randomUUID()}`;
  await kafka.admin.createTopics([{ topic, partitions: 4 }]);
  const producer = await kafka.producer();
  for (let p = 0; p < 4; p++)
    await producer.send([{ topic, partition: p, key: Buffer.from('k'), value: Buffer.from('v') }]);
  await producer.close();
  let release!: () => void;
  const released = new Promise<void>((resolve) => (release = resolve));
  let slowStarted!: () => void;
  const slow = new Promise<void>((resolve) => (slowStarted = resolve));
  /** The partitions of each assignment a was handed, in turn. */
  const calls: number[][] = [];
  const a = kafka.consumer({ groupId, sessionTimeoutMs: 6_000 });
  const b = kafka.consumer({ groupId, sessionTimeoutMs: 6_000 });
  await a.subscribe([topic]);
  await a.run({
    onAssignment: async (assignment) => {
      calls.push(assignment.map((tp) => tp.partition).sort());
      if (calls.length > 1) return;
      slowStarted();
      await released;
    },
    eachBatch: async () => undefined,
  });
  await slow;
  return {
    a,
    b,
    calls,
    release: () => release(),
    joinB: async () => {
      await b.subscribe([topic]);
      return b.run({ eachBatch: async () => undefined });
    },
    close: async () => {
      release();
      await Promise.all([a.close(), b.close()]);
      await kafka.close();
    },
  };
}

/** Waits (polling, at most `ms`) until `done()`. */
async function until(done: () => boolean, ms: number, every = 200): Promise<void> {
  const deadline = Date.now() + ms;
  while (!done() && Date.now() < deadline) await new Promise((r) => setTimeout(r, every));
}

describe('kafka consumer during a slow assignment', function () {
  this.timeout(120_000);

  it('owns no partition once a heartbeat says the group rebalances, while onAssignment still runs', async () => {
    const group = await slowFirstAssignment('slow');
    const { a, b } = group;
    try {
      assert.equal(a.assignment().length, 4, 'a has every partition while it opens them');
      const bRunning = group.joinB();
      // The group rebalances for b and waits for a, whose heartbeats are answered that it
      // rebalances: a stops counting the old assignment as its own, though it is still opening it.
      await until(() => a.assignment().length === 0, 20_000);
      assert.deepEqual(a.assignment(), [], 'a owns nothing while the group rebalances');
      group.release();
      await bRunning;
      // a rejoins once its batch is done: the group splits the partitions.
      await until(() => a.assignment().length + b.assignment().length === 4, 60_000);
      assert.equal(a.assignment().length, 2, 'a, after rejoining');
      assert.equal(b.assignment().length, 2, 'b');
    } finally {
      await group.close();
    }
  });
});

describe('kafka consumer evicted from its group', function () {
  this.timeout(180_000);

  it('hands an empty assignment before the one it gets under a new member id', async () => {
    // a's first assignment takes longer than the group waits for it to rejoin (the rebalance
    // timeout, 30 s) once b joins: the group goes on without a, which must join again.
    const group = await slowFirstAssignment('evict');
    const { a, b, calls } = group;
    try {
      void group.joinB();
      await until(() => b.assignment().length === 4, 60_000, 500);
      assert.equal(b.assignment().length, 4, 'b has every partition: a was evicted');
      group.release();
      await until(() => a.assignment().length === 2, 60_000);
      await new Promise((resolve) => setTimeout(resolve, 500)); // its onAssignment calls
      assert.deepEqual(
        calls.map((c) => c.length),
        [4, 0, 2],
        `a's assignments: ${JSON.stringify(calls)}`,
      );
    } finally {
      await group.close();
    }
  });
});
