/**
 * The Kafka consumer's membership: a member whose heartbeats go unanswered for the session
 * timeout owns no partition until it joins again, and says so. A review paused the broker for
 * 90 s: afterwards kafkajs's own rejoin failed inside its loop, the member went on fetching its
 * old assignment without a member id, and the runtime, which asks the assignment whether it
 * owns a task it was fenced from, fenced the group's real owner every 10 s. This drives the
 * adapter with a stand-in for kafkajs's consumer, which emits what kafkajs would.
 */
import assert from 'node:assert/strict';
import { EventEmitter } from 'node:events';
import { KafkaLog } from '../../log/kafka/kafka-log.ts';
import type { TopicPartition } from '../../log/port.ts';

const events = {
  GROUP_JOIN: 'consumer.group_join',
  HEARTBEAT: 'consumer.heartbeat',
  CRASH: 'consumer.crash',
};

/** What KafkaLogConsumer uses of a kafkajs consumer; events go out as kafkajs sends them. */
class KafkajsConsumerStandIn {
  readonly events = events;
  private readonly emitter = new EventEmitter();
  on(event: string, listener: (e: unknown) => void) {
    this.emitter.on(event, listener);
    return () => this.emitter.off(event, listener);
  }
  emit(event: string, payload: object) {
    this.emitter.emit(event, { id: 0, type: event, timestamp: Date.now(), payload });
  }
  joined(memberId: string, partitions: number[]) {
    this.emit(events.GROUP_JOIN, { memberId, memberAssignment: { t: partitions } });
  }
  async connect() {}
  async subscribe() {}
  async run() {}
  async disconnect() {}
  seek() {}
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('Kafka consumer: membership', () => {
  it('owns nothing once no heartbeat is answered for the session timeout, until it joins again', async () => {
    const standIn = new KafkajsConsumerStandIn();
    const log = new KafkaLog({ brokers: ['127.0.0.1:1'] });
    (log as unknown as { kafka: { consumer: () => unknown } }).kafka = { consumer: () => standIn };
    const consumer = log.consumer({ groupId: 'g', sessionTimeoutMs: 300 });
    const assignments: TopicPartition[][] = [];
    await consumer.subscribe(['t']);
    await consumer.run({
      eachBatch: async () => {},
      onAssignment: async (assignment) => void assignments.push(assignment),
    });
    try {
      standIn.joined('m1', [0, 1]);
      await sleep(50);
      assert.deepEqual(
        consumer.assignment().map((tp) => tp.partition),
        [0, 1],
      );
      // Heartbeats answered: it stays a member past the session timeout.
      for (let i = 0; i < 12; i++) {
        standIn.emit(events.HEARTBEAT, { groupId: 'g', memberId: 'm1', groupGenerationId: 1 });
        await sleep(100);
      }
      assert.equal(consumer.assignment().length, 2);
      assert.equal(consumer.outOfGroupBecause(), undefined);
      // None answered any more (a broker paused, a rejoin that never completes).
      await sleep(1_500);
      assert.deepEqual(consumer.assignment(), []);
      assert.match(consumer.outOfGroupBecause() ?? '', /answered no heartbeat for \d+ s/);
      // Joined again: its new assignment is its own.
      standIn.joined('m2', [1]);
      await sleep(50);
      assert.deepEqual(
        consumer.assignment().map((tp) => tp.partition),
        [1],
      );
      assert.equal(consumer.outOfGroupBecause(), undefined);
    } finally {
      await consumer.close();
    }
  });
});
