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

describe('kafka consumer during a slow assignment', function () {
  this.timeout(120_000);

  it('owns no partition once a heartbeat says the group rebalances, while onAssignment still runs', async () => {
    const kafka = new KafkaLog({
      brokers: process.env.KAFKA_BROKERS!.split(','),
      clientId: 'slow',
    });
    const topic = `slow-${randomUUID()}`;
    const groupId = `slow-${randomUUID()}`;
    await kafka.admin.createTopics([{ topic, partitions: 4 }]);
    const producer = await kafka.producer();
    for (let p = 0; p < 4; p++)
      await producer.send([
        { topic, partition: p, key: Buffer.from('k'), value: Buffer.from('v') },
      ]);
    await producer.close();
    // a's first assignment takes as long as the test says (tasks restoring their stores), and
    // its batches wait for it: kafkajs cannot rejoin meanwhile.
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let slowStarted!: () => void;
    const slow = new Promise<void>((resolve) => (slowStarted = resolve));
    let calls = 0;
    const a = kafka.consumer({ groupId, sessionTimeoutMs: 6_000 });
    const b = kafka.consumer({ groupId, sessionTimeoutMs: 6_000 });
    try {
      await a.subscribe([topic]);
      await a.run({
        onAssignment: async () => {
          if (calls++ > 0) return;
          slowStarted();
          await released;
        },
        eachBatch: async () => undefined,
      });
      await slow;
      assert.equal(a.assignment().length, 4, 'a has every partition while it opens them');
      await b.subscribe([topic]);
      const bRunning = b.run({ eachBatch: async () => undefined });
      // The group rebalances for b and waits for a, whose heartbeats are answered that it
      // rebalances: a stops counting the old assignment as its own, though it is still opening it.
      const deadline = Date.now() + 20_000;
      while (a.assignment().length > 0 && Date.now() < deadline)
        await new Promise((resolve) => setTimeout(resolve, 200));
      assert.deepEqual(a.assignment(), [], 'a owns nothing while the group rebalances');
      release();
      await bRunning;
      // a rejoins once its batch is done: the group splits the partitions.
      const settled = Date.now() + 60_000;
      while (a.assignment().length + b.assignment().length !== 4 && Date.now() < settled)
        await new Promise((resolve) => setTimeout(resolve, 200));
      assert.equal(a.assignment().length, 2, 'a, after rejoining');
      assert.equal(b.assignment().length, 2, 'b');
    } finally {
      release();
      await Promise.all([a.close(), b.close()]);
      await kafka.close();
    }
  });
});

describe('kafka consumer evicted from its group', function () {
  this.timeout(180_000);

  it('hands an empty assignment before the one it gets under a new member id', async () => {
    const kafka = new KafkaLog({
      brokers: process.env.KAFKA_BROKERS!.split(','),
      clientId: 'evict',
    });
    const topic = `evict-${randomUUID()}`;
    const groupId = `evict-${randomUUID()}`;
    await kafka.admin.createTopics([{ topic, partitions: 4 }]);
    const producer = await kafka.producer();
    for (let p = 0; p < 4; p++)
      await producer.send([
        { topic, partition: p, key: Buffer.from('k'), value: Buffer.from('v') },
      ]);
    await producer.close();
    // a's first assignment takes longer than the group waits for it to rejoin (the rebalance
    // timeout, 30 s) once b joins: the group goes on without a, which must join again.
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    let slowStarted!: () => void;
    const slow = new Promise<void>((resolve) => (slowStarted = resolve));
    const calls: number[][] = [];
    const a = kafka.consumer({ groupId, sessionTimeoutMs: 6_000 });
    const b = kafka.consumer({ groupId, sessionTimeoutMs: 6_000 });
    try {
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
      await b.subscribe([topic]);
      void b.run({ eachBatch: async () => undefined });
      const deadline = Date.now() + 60_000;
      while (b.assignment().length < 4 && Date.now() < deadline)
        await new Promise((resolve) => setTimeout(resolve, 500));
      assert.equal(b.assignment().length, 4, 'b has every partition: a was evicted');
      release();
      const settled = Date.now() + 60_000;
      while (a.assignment().length !== 2 && Date.now() < settled)
        await new Promise((resolve) => setTimeout(resolve, 200));
      await new Promise((resolve) => setTimeout(resolve, 500)); // its onAssignment calls
      assert.deepEqual(
        calls.map((c) => c.length),
        [4, 0, 2],
        `a's assignments: ${JSON.stringify(calls)}`,
      );
    } finally {
      release();
      await Promise.all([a.close(), b.close()]);
      await kafka.close();
    }
  });
});
