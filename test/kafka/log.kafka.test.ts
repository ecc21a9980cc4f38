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
