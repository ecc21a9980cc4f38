/**
 * The log port's conformance suite: every adapter must pass it unchanged.
 * `test/conformance/log.embedded.test.ts` runs it on the embedded log,
 * `test/kafka/log.kafka.test.ts` on Apache Kafka.
 */
import assert from 'node:assert/strict';
import type { Log, LogRecord, TopicPartition } from '../../log/port.ts';
import { ProducerFencedError } from '../../log/errors.ts';
import { partitionFor } from '../../log/partitioner.ts';
import { collect, eventually, text, uniqueName, type Collector } from '../support/log-helpers.ts';

export interface LogFixture {
  log: Log;
  /** Time allowed for a consumer group to settle (Kafka joins take seconds). */
  settleMs: number;
}

export function logConformance(
  adapter: string,
  open: () => Promise<LogFixture>,
  close: () => Promise<void>,
) {
  describe(`log port conformance: ${adapter}`, function () {
    let log: Log;
    let settleMs: number;

    before(async () => {
      ({ log, settleMs } = await open());
    });
    after(close);

    it('creates topics idempotently with partition count and cleanup policy', async () => {
      const plain = uniqueName('plain');
      const compacted = uniqueName('compacted');
      await log.admin.createTopics([
        { topic: plain, partitions: 3 },
        { topic: compacted, partitions: 2, config: { 'cleanup.policy': 'compact' } },
      ]);
      await log.admin.createTopics([{ topic: plain, partitions: 3 }]);
      assert.deepEqual(await log.admin.describeTopic(plain), {
        topic: plain,
        partitions: 3,
        cleanupPolicy: 'delete',
        retentionMs: 604_800_000, // Kafka's default, seven days
      });
      assert.deepEqual(await log.admin.describeTopic(compacted), {
        topic: compacted,
        partitions: 2,
        cleanupPolicy: 'compact',
        retentionMs: 604_800_000,
      });
      assert.equal(await log.admin.describeTopic(uniqueName('missing')), undefined);
      const topics = await log.admin.listTopics();
      assert.ok(topics.includes(plain) && topics.includes(compacted));
    });

    it("sets a topic's retention, keeping its other configs", async () => {
      const topic = uniqueName('retention');
      await log.admin.createTopics([
        { topic, partitions: 1, config: { 'retention.ms': '86400000' } },
      ]);
      assert.equal((await log.admin.describeTopic(topic))?.retentionMs, 86_400_000);
      await log.admin.setRetention(topic, 3_600_000, 600_000);
      assert.deepEqual(await log.admin.describeTopic(topic), {
        topic,
        partitions: 1,
        cleanupPolicy: 'delete',
        retentionMs: 3_600_000,
      });
      const compacted = uniqueName('retention-compacted');
      await log.admin.createTopics([
        { topic: compacted, partitions: 1, config: { 'cleanup.policy': 'compact' } },
      ]);
      await log.admin.setRetention(compacted, 3_600_000);
      assert.equal((await log.admin.describeTopic(compacted))?.cleanupPolicy, 'compact');
    });

    it('partitions keyed records with the Java murmur2 and keeps keys, values, headers, timestamps', async () => {
      const topic = uniqueName('keyed');
      await log.admin.createTopics([{ topic, partitions: 12 }]);
      const producer = await log.producer();
      const at = Date.now() - 5000;
      const users = Array.from({ length: 30 }, (_, i) => `user-${i}`);
      const metadata = await producer.send(
        users.map((user, i) => ({
          topic,
          key: Buffer.from(user),
          value: Buffer.from(`hello ${i}`),
          headers: { 'content-type': 'text/plain', trace: Buffer.from([1, 2, 3]) },
          timestamp: at + i,
        })),
      );
      metadata.forEach((m, i) =>
        assert.equal(m.partition, partitionFor(Buffer.from(users[i]!), 12)),
      );
      const tombstone = await producer.send([{ topic, key: Buffer.from('user-0'), value: null }]);
      assert.equal(tombstone[0]!.partition, metadata[0]!.partition);
      await producer.close();

      const c = await collect(log, uniqueName('g'), [topic]);
      await eventually(() => c.records.length === 31, settleMs + 10000, '31 records');
      await c.stop();
      for (const r of c.records.filter((r) => r.value !== null)) {
        const i = Number(text(r.value)!.split(' ')[1]);
        assert.equal(text(r.key), users[i]);
        assert.equal(r.partition, partitionFor(Buffer.from(users[i]!), 12));
        assert.equal(r.timestamp, at + i);
        assert.equal(text(r.headers['content-type']!), 'text/plain');
        assert.deepEqual([...r.headers.trace!], [1, 2, 3]);
      }
      assert.equal(c.records.filter((r) => r.value === null).length, 1);
      // Per partition, offsets strictly increase in the order records were handed over.
      const lastOffset = new Map<number, number>();
      for (const r of c.records) {
        assert.ok((lastOffset.get(r.partition) ?? -1) < r.offset);
        lastOffset.set(r.partition, r.offset);
      }
    });

    it('commits group offsets, and a new member resumes after them', async () => {
      const topic = uniqueName('resume');
      const group = uniqueName('g');
      await log.admin.createTopics([{ topic, partitions: 2 }]);
      const producer = await log.producer();
      await producer.send(
        [0, 1, 2, 3].map((i) => ({
          topic,
          key: null,
          value: Buffer.from(`a${i}`),
          partition: i % 2,
        })),
      );
      const first = await collect(log, group, [topic], { commit: true });
      await eventually(() => first.records.length === 4, settleMs + 10000, 'first 4');
      await eventually(
        async () => (await log.admin.committedOffsets(group, topic)).every((o) => o.offset === 2),
        10000,
        'commits',
      );
      await first.stop();
      await producer.send(
        [4, 5].map((i) => ({ topic, key: null, value: Buffer.from(`a${i}`), partition: i % 2 })),
      );
      const second = await collect(log, group, [topic], { commit: true });
      await eventually(() => second.records.length === 2, settleMs + 10000, 'the 2 new records');
      await new Promise((r) => setTimeout(r, 300));
      assert.deepEqual(second.records.map((r) => text(r.value)).sort(), ['a4', 'a5']);
      await second.stop();
      await producer.close();
      assert.deepEqual(
        (await log.admin.committedOffsets(uniqueName('never'), topic)).map((o) => o.offset),
        [-1, -1],
      );
    });

    it('assigns partition p of every subscribed topic to the same member, and rebalances when one leaves', async () => {
      const left = uniqueName('left');
      const right = uniqueName('right');
      const group = uniqueName('g');
      await log.admin.createTopics([
        { topic: left, partitions: 4 },
        { topic: right, partitions: 4 },
      ]);
      const a = await collect(log, group, [left, right]);
      const b = await collect(log, group, [left, right]);
      const settled = () => {
        const pa = a.consumer.assignment();
        const pb = b.consumer.assignment();
        return pa.length > 0 && pb.length > 0 && pa.length + pb.length === 8;
      };
      await eventually(settled, settleMs + 20000, 'both members assigned');
      for (const member of [a, b]) {
        const assignment = member.consumer.assignment();
        const numbers = (topic: string) =>
          assignment
            .filter((tp) => tp.topic === topic)
            .map((tp) => tp.partition)
            .sort();
        assert.deepEqual(numbers(left), numbers(right), 'co-partitioned');
      }
      const all = [...a.consumer.assignment(), ...b.consumer.assignment()].map(
        (tp) => `${tp.topic}/${tp.partition}`,
      );
      assert.equal(new Set(all).size, 8, 'disjoint and complete');

      // Records produced to b's partitions reach b, and reach a once b has left.
      const producer = await log.producer();
      await b.stop();
      await eventually(
        () => a.consumer.assignment().length === 8,
        settleMs + 20000,
        'a takes over',
      );
      await producer.send(
        [0, 1, 2, 3].map((p) => ({
          topic: right,
          key: null,
          value: Buffer.from(`r${p}`),
          partition: p,
        })),
      );
      await eventually(() => a.records.length === 4, 20000, 'a receives all partitions');
      await a.stop();
      await producer.close();
      const last = a.assignments[a.assignments.length - 1]!;
      assert.equal(last.length, 8);
    });

    it('is sticky: a member joining or leaving moves only the tasks it must', async () => {
      const topic = uniqueName('sticky');
      const group = uniqueName('g');
      await log.admin.createTopics([{ topic, partitions: 6 }]);
      const numbers = (c: Collector) =>
        c.consumer
          .assignment()
          .map((tp) => tp.partition)
          .sort((x, y) => x - y);
      const members: Collector[] = [];
      const settled = (count: number) => () =>
        members.every((m) => numbers(m).length === 6 / count) &&
        new Set(members.flatMap(numbers)).size === 6;
      for (let i = 0; i < 2; i++) members.push(await collect(log, group, [topic]));
      await eventually(settled(2), settleMs + 20000, 'two members with 3 each');
      const [a, b] = members as [Collector, Collector];
      const before = { a: numbers(a), b: numbers(b) };

      // A third member takes one task from each; a and b keep two of their own three.
      members.push(await collect(log, group, [topic]));
      await eventually(settled(3), settleMs + 20000, 'three members with 2 each');
      /** Every task number of `inner` is one of `outer`'s. */
      const within = (name: string, inner: number[], outer: number[]) =>
        assert.ok(
          inner.every((p) => outer.includes(p)),
          `${name}: ${inner.join(',')} not all within ${outer.join(',')}`,
        );
      within('a', numbers(a), before.a);
      within('b', numbers(b), before.b);
      const kept = { a: numbers(a), b: numbers(b) };

      // It leaves: a and b keep what they have, and share its two.
      await members.pop()!.stop();
      await eventually(settled(2), settleMs + 20000, 'two members again');
      within('a', kept.a, numbers(a));
      within('b', kept.b, numbers(b));
      await Promise.all(members.map((m) => m.stop()));
    });

    it('keeps the place of a consumer starting from the end through a rebalance: what it keeps, it reads on without a gap', async () => {
      const topic = uniqueName('latest');
      const group = uniqueName('g');
      await log.admin.createTopics([{ topic, partitions: 2 }]);
      const producer = await log.producer();
      const produce = (tag: string) =>
        producer.send(
          [0, 1].map((p) => ({ topic, key: null, value: Buffer.from(`${tag}${p}`), partition: p })),
        );
      let gate: Promise<void> | undefined;
      let release!: () => void;
      const member = async (received: LogRecord[], assignments: TopicPartition[][]) => {
        const consumer = log.consumer({ groupId: group, startFrom: 'latest' });
        await consumer.subscribe([topic]);
        const started = consumer.run({
          onAssignment: (assignment) => void assignments.push(assignment),
          eachBatch: async (batch) => {
            if (gate && received === a) await gate;
            received.push(...batch.records);
          },
        });
        return { consumer, started };
      };
      const a: LogRecord[] = [];
      const aAssignments: TopicPartition[][] = [];
      const first = await member(a, aAssignments);
      await first.started;
      await eventually(() => aAssignments.at(-1)?.length === 2, settleMs + 20000, 'a assigned');
      await produce('a');
      await eventually(() => a.length === 2, settleMs + 20000, 'a0 and a1');

      // a is held in a batch while c0 and c1 are written and b joins: a rebalance it takes part
      // in once the batch ends, before it reads c0 or c1.
      gate = new Promise((resolve) => (release = resolve));
      await produce('b');
      await new Promise((r) => setTimeout(r, 500));
      await produce('c');
      const b: LogRecord[] = [];
      const bAssignments: TopicPartition[][] = [];
      const second = await member(b, bAssignments);
      await new Promise((r) => setTimeout(r, 1000));
      release();
      gate = undefined;
      await second.started;
      await eventually(
        () => aAssignments.at(-1)?.length === 1 && bAssignments.at(-1)?.length === 1,
        settleMs + 30000,
        'one partition each',
      );
      await produce('d');
      const kept = aAssignments.at(-1)![0]!.partition;
      const moved = bAssignments.at(-1)![0]!.partition;
      const values = (records: LogRecord[], p: number) =>
        records.filter((r) => r.partition === p).map((r) => text(r.value));
      await eventually(
        () => values(a, kept).includes(`d${kept}`) && values(b, moved).includes(`d${moved}`),
        settleMs + 20000,
        'd0 and d1',
      );
      assert.deepEqual(
        values(a, kept),
        ['a', 'b', 'c', 'd'].map((tag) => `${tag}${kept}`),
        'the partition a kept: nothing skipped, nothing twice',
      );
      await first.consumer.close();
      await second.consumer.close();
      await producer.close();
    });

    it('makes transactional records and offsets visible together on commit, and never on abort', async () => {
      const input = uniqueName('tx-in');
      const output = uniqueName('tx-out');
      const group = uniqueName('g');
      await log.admin.createTopics([
        { topic: input, partitions: 1 },
        { topic: output, partitions: 2 },
      ]);
      const producer = await log.producer({ transactionalId: uniqueName('tx') });

      const aborted = await producer.transaction();
      await aborted.send([{ topic: output, key: Buffer.from('k'), value: Buffer.from('aborted') }]);
      await aborted.sendOffsets(group, [{ topic: input, partition: 0, offset: 99 }]);
      await aborted.abort();

      const committed = await producer.transaction();
      await committed.send([
        { topic: output, key: Buffer.from('k'), value: Buffer.from('one') },
        { topic: output, key: Buffer.from('j'), value: Buffer.from('two') },
      ]);
      await committed.sendOffsets(group, [{ topic: input, partition: 0, offset: 7 }]);
      assert.deepEqual(
        (await log.admin.committedOffsets(group, input)).map((o) => o.offset),
        [-1],
        'offsets invisible before commit',
      );
      await committed.commit();
      // On Kafka the offsets materialise when the transaction markers are written, moments
      // after commit() returns.
      await eventually(
        async () => (await log.admin.committedOffsets(group, input))[0]!.offset === 7,
        10000,
        'the committed offsets',
      );

      const reader = await collect(log, uniqueName('reader'), [output]);
      await eventually(() => reader.records.length >= 2, settleMs + 10000, 'committed records');
      await new Promise((r) => setTimeout(r, 500));
      await reader.stop();
      assert.deepEqual(reader.records.map((r) => text(r.value)).sort(), ['one', 'two']);
      await producer.close();
    });

    it('fences an older producer with the same transactional id', async () => {
      const topic = uniqueName('fence');
      await log.admin.createTopics([{ topic, partitions: 1 }]);
      const id = uniqueName('tx');
      const old = await log.producer({ transactionalId: id });
      const tx = await old.transaction();
      await tx.send([{ topic, key: null, value: Buffer.from('zombie') }]);
      const newer = await log.producer({ transactionalId: id });
      await assert.rejects(
        () => tx.commit(),
        (e: unknown) => e instanceof ProducerFencedError,
      );
      const ok = await newer.transaction();
      await ok.send([{ topic, key: null, value: Buffer.from('alive') }]);
      await ok.commit();
      const reader = await collect(log, uniqueName('reader'), [topic]);
      await eventually(() => reader.records.length >= 1, settleMs + 10000, 'the live record');
      await new Promise((r) => setTimeout(r, 300));
      await reader.stop();
      assert.deepEqual(
        reader.records.map((r) => text(r.value)),
        ['alive'],
      );
      await newer.close();
      await old.close().catch(() => undefined);
    });

    it('refuses a fenced producer its sends and offsets as fenced, not as a failure to retry', async () => {
      // The runtime drops a fenced task and leaves it to its new owner; any other failure it
      // revives the task for, whose new producer would fence the new owner in turn.
      const topic = uniqueName('fence-send');
      await log.admin.createTopics([{ topic, partitions: 1 }]);
      const id = uniqueName('tx');
      const old = await log.producer({ transactionalId: id });
      const first = await old.transaction();
      await first.send([{ topic, key: null, value: Buffer.from('before') }]);
      await first.commit();
      const newer = await log.producer({ transactionalId: id });
      const fenced = (e: unknown) => e instanceof ProducerFencedError;
      const sending = await old.transaction().catch((e: unknown) => e as Error);
      if (sending instanceof Error) assert.ok(fenced(sending), String(sending));
      else {
        await assert.rejects(
          () => sending.send([{ topic, key: null, value: Buffer.from('zombie') }]),
          fenced,
        );
        await sending.abort().catch(() => undefined);
      }
      const offsetting = await old.transaction().catch((e: unknown) => e as Error);
      if (offsetting instanceof Error) assert.ok(fenced(offsetting), String(offsetting));
      else {
        await assert.rejects(
          () => offsetting.sendOffsets(uniqueName('group'), [{ topic, partition: 0, offset: 1 }]),
          fenced,
        );
        await offsetting.abort().catch(() => undefined);
      }
      await newer.close();
      await old.close().catch(() => undefined);
    });

    it('reports watermarks, seeks to an offset, and finds offsets by timestamp for replays', async () => {
      const topic = uniqueName('seek');
      await log.admin.createTopics([{ topic, partitions: 1 }]);
      const producer = await log.producer();
      const t0 = Date.now() - 60_000;
      await producer.send(
        Array.from({ length: 10 }, (_, i) => ({
          topic,
          key: null,
          partition: 0,
          value: Buffer.from(`v${i}`),
          timestamp: t0 + i * 1000,
        })),
      );
      await producer.close();
      assert.deepEqual(await log.admin.watermarks(topic), [{ partition: 0, low: 0, high: 10 }]);
      assert.deepEqual(await log.admin.offsetsForTime(topic, t0 + 4500), [
        { topic, partition: 0, offset: 5 },
      ]);
      assert.deepEqual(await log.admin.offsetsForTime(topic, t0 - 1), [
        { topic, partition: 0, offset: 0 },
      ]);
      assert.deepEqual(await log.admin.offsetsForTime(topic, Date.now() + 60_000), [
        { topic, partition: 0, offset: 10 },
      ]);

      const consumer = log.consumer({ groupId: uniqueName('g') });
      const seen: string[] = [];
      let seeked = false;
      await consumer.subscribe([topic]);
      await consumer.run({
        eachBatch: async (batch) => {
          for (const r of batch.records) seen.push(text(r.value)!);
          if (!seeked) {
            seeked = true;
            consumer.seek({ topic, partition: 0, offset: 8 });
          }
        },
      });
      await eventually(
        () => seen.includes('v9') && seen.filter((v) => v === 'v9').length >= 1 && seeked,
        settleMs + 10000,
        'the replay',
      );
      await new Promise((r) => setTimeout(r, 300));
      await consumer.close();
      // The first batch ran from v0; after the seek, v8 and v9 were handed again.
      assert.equal(seen[0], 'v0');
      assert.deepEqual(seen.slice(-2), ['v8', 'v9']);
      assert.ok(seen.filter((v) => v === 'v8').length >= 1);
    });

    it('reads chosen partitions from chosen offsets to their end, then stops, even after transactions', async () => {
      const topic = uniqueName('read');
      await log.admin.createTopics([{ topic, partitions: 3 }]);
      const producer = await log.producer();
      await producer.send(
        [0, 1, 2].flatMap((partition) =>
          [0, 1, 2, 3].map((i) => ({
            topic,
            key: null,
            partition,
            value: Buffer.from(`p${partition}-${i}`),
          })),
        ),
      );
      await producer.close();
      // Partition 2 then ends with a committed and an aborted transaction: on Kafka its last
      // offsets are transaction markers, which no reader is handed.
      const tx = await log.producer({ transactionalId: uniqueName('tx') });
      const committed = await tx.transaction();
      await committed.send([{ topic, key: null, partition: 2, value: Buffer.from('p2-tx') }]);
      await committed.commit();
      const aborted = await tx.transaction();
      await aborted.send([{ topic, key: null, partition: 2, value: Buffer.from('p2-aborted') }]);
      await aborted.abort();
      await tx.close();

      const read: string[] = [];
      for await (const batch of log.readPartitions(topic, [
        { partition: 0, from: 1 },
        { partition: 2, from: 0 },
      ])) {
        for (const r of batch.records) read.push(text(r.value)!);
      }
      assert.deepEqual(
        read.sort(),
        ['p0-1', 'p0-2', 'p0-3', 'p2-0', 'p2-1', 'p2-2', 'p2-3', 'p2-tx'].sort(),
      );
      const none: string[] = [];
      for await (const batch of log.readPartitions(topic, [{ partition: 1, from: 4 }])) {
        for (const r of batch.records) none.push(text(r.value)!);
      }
      assert.deepEqual(none, [], 'nothing after the end');
    });

    it('takes sends and transactions larger than a broker takes in one request (3 MiB to one partition)', async () => {
      const topic = uniqueName('large');
      await log.admin.createTopics([{ topic, partitions: 1 }]);
      const records = (tag: string) =>
        Array.from({ length: 3 * 1024 }, (_, i) => ({
          topic,
          key: null,
          partition: 0,
          value: Buffer.from(`${tag}${i} `.padEnd(1024, '.')),
        }));
      const producer = await log.producer();
      const metadata = await producer.send(records('s'));
      assert.deepEqual(
        metadata.map((m) => m.offset),
        Array.from({ length: 3 * 1024 }, (_, i) => i),
        'one offset per record, in order',
      );
      await producer.close();
      const tx = await log.producer({ transactionalId: uniqueName('tx') });
      const transaction = await tx.transaction();
      await transaction.send(records('t'));
      await transaction.commit();
      await tx.close();
      // On Kafka a read-committed reader sees the transaction once its markers are written,
      // moments after commit() returns (the end readPartitions reads to is the stable offset).
      await eventually(
        async () => (await log.admin.watermarks(topic))[0]!.high >= 6 * 1024,
        10000,
        'the transaction to be visible',
      );

      const values: string[] = [];
      for await (const batch of log.readPartitions(topic, [{ partition: 0, from: 0 }]))
        for (const r of batch.records) values.push(text(r.value)!.split(' ')[0]!);
      assert.equal(
        values.length,
        6 * 1024,
        `read ${values[0]} to ${values.at(-1)}; watermarks ${JSON.stringify(await log.admin.watermarks(topic))}`,
      );
      assert.deepEqual(values.slice(0, 2), ['s0', 's1']);
      assert.deepEqual(values.slice(-2), ['t3070', 't3071']);
    });

    for (const startFrom of ['earliest', 'latest'] as const) {
      it(`hands a batch again when eachBatch throws, whatever it throws, skipping nothing (starting from ${startFrom})`, async () => {
        const topic = uniqueName('retry');
        await log.admin.createTopics([{ topic, partitions: 1 }]);
        const consumer = log.consumer({ groupId: uniqueName('g'), startFrom });
        // A bug in a handler (a TypeError), and errors a client library could take as final.
        const failures: Error[] = [
          new Error('transient'),
          new TypeError("Cannot read properties of undefined (reading 'seq')"),
          Object.assign(new Error('not retriable'), { retriable: false }),
        ];
        const handed: string[] = [];
        let assigned = false;
        await consumer.subscribe([topic]);
        await consumer.run({
          onAssignment: (assignment) => void (assigned ||= assignment.length > 0),
          eachBatch: async (batch) => {
            handed.push(batch.records.map((r) => text(r.value)).join());
            const failure = failures.shift();
            if (failure) throw failure;
          },
        });
        // Starting from the end: nothing before the first assignment is for this consumer.
        await eventually(() => assigned, settleMs + 15000, 'the assignment');
        const producer = await log.producer();
        await producer.send([{ topic, key: null, partition: 0, value: Buffer.from('x') }]);
        await producer.close();
        await eventually(() => handed.length >= 4, settleMs + 30000, 'the fourth attempt');
        assert.deepEqual(handed, ['x', 'x', 'x', 'x']);
        await consumer.close();
      });
    }
  });
}
