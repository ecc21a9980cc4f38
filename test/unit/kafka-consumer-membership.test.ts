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
import type { Consumer, TopicPartition } from '../../log/port.ts';

const events = {
  GROUP_JOIN: 'consumer.group_join',
  HEARTBEAT: 'consumer.heartbeat',
  CRASH: 'consumer.crash',
  REBALANCING: 'consumer.rebalancing',
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
  /** kafkajs calls, in order. */
  readonly calls: string[] = [];
  heartbeat(memberId: string) {
    this.emit(events.HEARTBEAT, { groupId: 'g', memberId, groupGenerationId: 1 });
  }
  async connect() {}
  async subscribe() {}
  async run() {
    this.calls.push('run');
  }
  async stop() {
    this.calls.push('stop');
  }
  async disconnect() {}
  seek() {}
}

/** A KafkaLog consumer on a stand-in, its assignments as handed, closed after `test`. */
async function withConsumer(
  options: { sessionTimeoutMs: number; rebalanceTimeoutMs?: number },
  test: (
    standIn: KafkajsConsumerStandIn,
    consumer: Consumer,
    assignments: TopicPartition[][],
  ) => Promise<void>,
) {
  const standIn = new KafkajsConsumerStandIn();
  const log = new KafkaLog({ brokers: ['127.0.0.1:1'] });
  (log as unknown as { kafka: { consumer: () => unknown } }).kafka = { consumer: () => standIn };
  const consumer = log.consumer({ groupId: 'g', ...options });
  const assignments: TopicPartition[][] = [];
  await consumer.subscribe(['t']);
  await consumer.run({
    eachBatch: async () => {},
    onAssignment: async (assignment) => void assignments.push(assignment),
  });
  try {
    await test(standIn, consumer, assignments);
  } finally {
    await consumer.close();
  }
}

const partitionsOf = (consumer: Consumer) => consumer.assignment().map((tp) => tp.partition);

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

describe('Kafka consumer: membership', () => {
  it('owns nothing once no heartbeat is answered for the session timeout, until it joins again', () =>
    withConsumer({ sessionTimeoutMs: 300 }, async (standIn, consumer) => {
      standIn.joined('m1', [0, 1]);
      await sleep(50);
      assert.deepEqual(partitionsOf(consumer), [0, 1]);
      // Heartbeats answered: it stays a member past the session timeout.
      for (let i = 0; i < 12; i++) {
        standIn.heartbeat('m1');
        await sleep(100);
      }
      assert.deepEqual(partitionsOf(consumer), [0, 1]);
      assert.equal(consumer.outOfGroupBecause(), undefined);
      // None answered any more (a broker paused, a rejoin that never completes).
      await sleep(1_500);
      assert.deepEqual(consumer.assignment(), []);
      assert.match(consumer.outOfGroupBecause() ?? '', /answered no heartbeat for \d+ s/);
      // Joined again: its new assignment is its own.
      standIn.joined('m2', [1]);
      await sleep(50);
      assert.deepEqual(partitionsOf(consumer), [1]);
      assert.equal(consumer.outOfGroupBecause(), undefined);
    }));

  it('takes its assignment back when heartbeats are answered again for the same member', () =>
    withConsumer({ sessionTimeoutMs: 300 }, async (standIn, consumer, assignments) => {
      standIn.joined('m1', [0, 1]);
      await sleep(50);
      await sleep(1_500); // a coordinator slow to answer for a while, not evicting
      assert.deepEqual(consumer.assignment(), []);
      standIn.heartbeat('m1');
      await sleep(50);
      assert.deepEqual(partitionsOf(consumer), [0, 1]);
      assert.equal(consumer.outOfGroupBecause(), undefined);
      assert.equal(assignments.length, 2, 'handled again: tasks dropped meanwhile reopen');
    }));

  it('stops kafkajs and runs it again when no heartbeat comes past the rebalance timeout too', () =>
    withConsumer({ sessionTimeoutMs: 300, rebalanceTimeoutMs: 500 }, async (standIn, consumer) => {
      standIn.joined('m1', [0, 1]);
      assert.deepEqual(standIn.calls, ['run']);
      await sleep(2_200);
      assert.deepEqual(standIn.calls.slice(0, 3), ['run', 'stop', 'run']);
      standIn.joined('m2', [1]);
      await sleep(50);
      assert.deepEqual(partitionsOf(consumer), [1]);
    }));

  it('waits out a rebalance kafkajs has begun before it counts itself out of the group', () =>
    withConsumer(
      { sessionTimeoutMs: 300, rebalanceTimeoutMs: 2_000 },
      async (standIn, consumer) => {
        standIn.joined('m1', [0, 1]);
        standIn.emit(events.REBALANCING, { groupId: 'g', memberId: 'm1' });
        await sleep(1_200);
        assert.equal(consumer.outOfGroupBecause(), undefined, 'joining, for up to 2 s more');
        assert.deepEqual(standIn.calls, ['run']);
        standIn.joined('m1', [0]);
        await sleep(50);
        assert.deepEqual(partitionsOf(consumer), [0]);
      },
    ));
});
