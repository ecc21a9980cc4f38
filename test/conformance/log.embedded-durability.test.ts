/**
 * What only the embedded log has to prove (Kafka proves it on its own): durability across
 * kill -9, group commit, compaction and retention by the cleaner, and an event loop that keeps
 * turning while a large batch is written.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { createInterface } from 'node:readline';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { eventually, text, withEmbeddedLog } from '../support/log-helpers.ts';

describe('embedded log', () => {
  it('keeps every acknowledged record when its process is killed with SIGKILL mid-write', async function () {
    this.timeout(60000);
    const dir = await mkdtemp(join(tmpdir(), 'kchat-kill-'));
    try {
      for (let attempt = 0; attempt < 3; attempt++) {
        const acknowledged = new Map<number, number>(); // partition -> highest acked offset
        const child = spawn(
          process.execPath,
          ['--import', 'tsx', 'test/support/log-writer.ts', dir, 'durable'],
          {
            stdio: ['ignore', 'pipe', 'inherit'],
          },
        );
        let lines = 0;
        const killedAfter = 30 + attempt * 40 + Math.floor(Math.random() * 40);
        await new Promise<void>((resolve, reject) => {
          child.on('error', reject);
          child.on('exit', () => resolve());
          createInterface({ input: child.stdout! }).on('line', (line) => {
            if (line === 'ready') return;
            for (const entry of line.split(' ')) {
              const [p, o] = entry.split(':').map(Number) as [number, number];
              acknowledged.set(p, Math.max(acknowledged.get(p) ?? -1, o));
            }
            if (++lines === killedAfter) child.kill('SIGKILL');
          });
        });
        assert.equal(child.signalCode, 'SIGKILL');
        assert.ok(acknowledged.size > 0, 'the writer acknowledged records before it was killed');

        const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
        const marks = await log.admin.watermarks('durable');
        for (const [partition, offset] of acknowledged) {
          const high = marks[partition]!.high;
          assert.ok(
            high > offset,
            `partition ${partition}: acked offset ${offset} but high watermark ${high}`,
          );
          // Every offset below the high watermark is readable: no holes.
          let expected = 0;
          for await (const records of log.store.scan('durable', partition)) {
            for (const r of records) assert.equal(r.offset, expected++);
          }
          assert.equal(expected, high);
        }
        await log.close();
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('writes appends that arrive in one turn of the event loop as one batch', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([{ topic: 'grouped', partitions: 3 }]);
      const producer = await log.producer();
      const before = log.store.writeBatches;
      await Promise.all(
        Array.from({ length: 200 }, (_, i) =>
          producer.send([{ topic: 'grouped', key: Buffer.from(`k${i}`), value: Buffer.from('v') }]),
        ),
      );
      const batches = log.store.writeBatches - before;
      assert.ok(batches <= 2, `200 sends in one turn took ${batches} write batches`);
      const total = (await log.admin.watermarks('grouped')).reduce((n, w) => n + w.high, 0);
      assert.equal(total, 200);
    }));

  it('keeps only the latest value of each key in a compacted topic, and drops old tombstones', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([
        {
          topic: 'table',
          partitions: 1,
          config: { 'cleanup.policy': 'compact', 'delete.retention.ms': '1000' },
        },
      ]);
      const producer = await log.producer();
      const now = Date.now();
      await producer.send([
        { topic: 'table', key: Buffer.from('a'), value: Buffer.from('a1'), timestamp: now - 5000 },
        { topic: 'table', key: Buffer.from('b'), value: Buffer.from('b1'), timestamp: now - 5000 },
        { topic: 'table', key: Buffer.from('a'), value: Buffer.from('a2'), timestamp: now - 5000 },
        { topic: 'table', key: Buffer.from('c'), value: Buffer.from('c1'), timestamp: now - 5000 },
        { topic: 'table', key: Buffer.from('c'), value: null, timestamp: now - 5000 }, // old tombstone
        { topic: 'table', key: Buffer.from('b'), value: null, timestamp: now }, // fresh tombstone
      ]);
      const [result] = await log.clean(now);
      assert.equal(result!.removed, 4);
      const left = await log.store.read('table', 0, 0, 100);
      assert.deepEqual(
        left.map((r) => [r.offset, text(r.key), text(r.value)]),
        [
          [2, 'a', 'a2'],
          [5, 'b', null],
        ],
      );
      assert.deepEqual(await log.admin.watermarks('table'), [{ partition: 0, low: 2, high: 6 }]);
      // Offsets go on from the high watermark after compaction.
      const [next] = await producer.send([
        { topic: 'table', key: Buffer.from('d'), value: Buffer.from('d1') },
      ]);
      assert.equal(next!.offset, 6);
    }));

  it('keeps every record appended to a compacted topic while the cleaner runs', async function () {
    this.timeout(60_000);
    await withEmbeddedLog(async (log) => {
      await log.admin.createTopics([
        { topic: 'table', partitions: 1, config: { 'cleanup.policy': 'compact' } },
      ]);
      const producer = await log.producer();
      // Enough that the cleaner's scans take many turns of the event loop.
      for (let b = 0; b < 20; b++)
        await producer.send(
          Array.from({ length: 1000 }, (_, i) => ({
            topic: 'table',
            key: Buffer.from(`k${i % 100}`),
            value: Buffer.from(`v${b}-${i}`),
          })),
        );
      const expected = new Map<string, string>();
      for (let i = 0; i < 100; i++) expected.set(`k${i}`, `v19-${900 + i}`);
      // While it cleans, new keys and new values of old keys, with pauses as real traffic has.
      let cleaning = true;
      const cleaned = log.clean().finally(() => (cleaning = false));
      let n = 0;
      const deadline = Date.now() + 15_000;
      for (; cleaning && n < 10_000 && Date.now() < deadline; n++) {
        const key = n % 2 === 0 ? `late${n}` : `k${n % 100}`;
        await producer.send([
          { topic: 'table', key: Buffer.from(key), value: Buffer.from(`late-${n}`) },
        ]);
        expected.set(key, `late-${n}`);
        await new Promise((resolve) => setTimeout(resolve, 2));
      }
      await cleaned;
      assert.ok(n > 0, 'appends raced the cleaner');
      const latest = new Map<string, string>();
      for (const r of await log.store.read('table', 0, 0, 100_000))
        latest.set(text(r.key)!, text(r.value)!);
      const lost = [...expected].filter(([k, v]) => latest.get(k) !== v);
      assert.deepEqual(
        lost.slice(0, 5).map(([k, v]) => `${k}: ${v} expected, ${latest.get(k)} kept`),
        [],
        `${lost.length} of ${expected.size} keys lost their latest value (${n} appends raced)`,
      );
    });
  });

  it('hands nothing read before a seek that came while the read was on its way', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([{ topic: 't', partitions: 1 }]);
      const producer = await log.producer();
      await producer.send(
        Array.from({ length: 50 }, (_, i) => ({
          topic: 't',
          key: null,
          value: Buffer.from(`${i}`),
        })),
      );
      const consumer = log.consumer({ groupId: 'g', maxBatchSize: 10 });
      // The third read is slow, and a seek back to 0 comes meanwhile (the runtime's revive).
      const read = log.store.read.bind(log.store);
      let reads = 0;
      log.store.read = async (...args) => {
        const records = await read(...args);
        if (++reads === 3) {
          consumer.seek({ topic: 't', partition: 0, offset: 0 });
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
        return records;
      };
      const starts: number[] = [];
      await consumer.subscribe(['t']);
      await consumer.run({
        eachBatch: async (batch) => void starts.push(batch.records[0]!.offset),
      });
      await eventually(() => starts.includes(40), 5_000, 'the end');
      await consumer.close();
      // What was read from 20 before the seek is neither handed nor moves the position.
      assert.deepEqual(starts, [0, 10, 0, 10, 20, 30, 40]);
    }));

  it('hands nothing a partition read ahead before a seek that came while another was handled', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([{ topic: 't', partitions: 2 }]);
      const producer = await log.producer();
      for (const partition of [0, 1])
        await producer.send(
          Array.from({ length: 30 }, (_, i) => ({
            topic: 't',
            partition,
            key: null,
            value: Buffer.from(`${i}`),
          })),
        );
      const consumer = log.consumer({ groupId: 'g', maxBatchSize: 10 });
      // The other partition's read is under way (read ahead) while the first batch is handled,
      // and the handler moves that partition on (as the runtime's revive moves a task's).
      const starts = new Map<number, number[]>();
      await consumer.subscribe(['t']);
      await consumer.run({
        eachBatch: async (batch) => {
          if (starts.size === 0)
            consumer.seek({ topic: 't', partition: 1 - batch.partition, offset: 5 });
          const list = starts.get(batch.partition) ?? [];
          starts.set(batch.partition, [...list, batch.records[0]!.offset]);
          await new Promise((resolve) => setTimeout(resolve, 10));
        },
      });
      await eventually(
        () => [...starts.values()].every((s) => s.at(-1)! >= 20) && starts.size === 2,
        5_000,
        'both ends',
      );
      await consumer.close();
      const [first, other] = [...starts.keys()];
      assert.deepEqual(starts.get(first!), [0, 10, 20]);
      assert.deepEqual(starts.get(other!), [5, 15, 25]);
    }));

  it('lets a new transactional producer read nothing before a commit its fence overtook', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([
        { topic: 'in', partitions: 1 },
        { topic: 'busy', partitions: 1 },
        { topic: 'changelog', partitions: 1, config: { 'cleanup.policy': 'compact' } },
      ]);
      const old = await log.producer({ transactionalId: 'app-0' });
      const transaction = await old.transaction();
      await transaction.send([
        { topic: 'changelog', key: Buffer.from('k'), value: Buffer.from('1') },
      ]);
      await transaction.sendOffsets('app', [{ topic: 'in', partition: 0, offset: 10 }]);
      // A large write of another producer under way: the commit waits behind it.
      const other = await log.producer();
      const busy = other.send(
        Array.from({ length: 20_000 }, (_, i) => ({
          topic: 'busy',
          key: null,
          value: Buffer.alloc(200, i % 256),
        })),
      );
      const store = log.store as unknown as { writing: boolean };
      for (let i = 0; i < 10_000 && !store.writing; i++)
        await new Promise((resolve) => setImmediate(resolve));
      assert.ok(store.writing, 'a write group is under way');
      const outcome = transaction.commit().then(
        () => 'committed',
        (error: Error) => error.name,
      );
      // The new owner, as the runtime opens a task: fence, restore to the end, read offsets.
      await log.producer({ transactionalId: 'app-0' });
      const restoredTo = (await log.admin.watermarks('changelog'))[0]!.high;
      const committed = (await log.admin.committedOffsets('app', 'in'))[0]!.offset;
      await busy;
      // The old commit is either wholly visible to the new owner or not there at all.
      assert.deepEqual(
        { outcome: await outcome, restoredTo, committed },
        (await outcome) === 'committed'
          ? { outcome: 'committed', restoredTo: 1, committed: 10 }
          : { outcome: await outcome, restoredTo: 0, committed: -1 },
      );
    }));

  it('forgets the consumers that closed', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([{ topic: 't', partitions: 2 }]);
      const held = () => (log as unknown as { consumers: Set<unknown> }).consumers.size;
      for (let i = 0; i < 5; i++) {
        const consumer = log.consumer({ groupId: `g${i % 2}` });
        await consumer.subscribe(['t']);
        await consumer.run({ eachBatch: async () => undefined });
        await consumer.close();
      }
      const open = log.consumer({ groupId: 'g0' });
      assert.equal(held(), 1);
      await open.close();
      assert.equal(held(), 0);
    }));

  it('gives a consumer new to its group the records appended while it starts', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([{ topic: 't', partitions: 4 }]);
      const producer = await log.producer();
      for (let round = 1; round <= 10; round++) {
        let seen = 0;
        const consumer = log.consumer({ groupId: `new${round}` });
        await consumer.subscribe(['t']);
        await consumer.run({ eachBatch: async (batch) => void (seen += batch.records.length) });
        // Sent while it looks up where each partition starts: none may start past them.
        await producer.send(
          [0, 1, 2, 3].map((partition) => ({ topic: 't', partition, key: null, value: null })),
        );
        await eventually(() => seen === 4 * round, 5_000, `round ${round}: all ${4 * round}`);
        await consumer.close();
      }
    }));

  it('goes on rebalancing a group after a topic it subscribed to was deleted', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([
        { topic: 'kept', partitions: 2 },
        { topic: 'gone', partitions: 2 },
      ]);
      const seen: string[] = [];
      const eachBatch = async (batch: { records: { value: Buffer | null }[] }) =>
        void seen.push(...batch.records.map((r) => text(r.value)!));
      const first = log.consumer({ groupId: 'g' });
      await first.subscribe(['kept', 'gone']);
      await first.run({ eachBatch });
      await log.admin.deleteTopics(['gone']);
      // A member joins: the rebalance leaves out what is gone, and resumes everyone.
      const second = log.consumer({ groupId: 'g' });
      await second.subscribe(['kept']);
      await second.run({ eachBatch });
      const producer = await log.producer();
      await producer.send(
        [0, 1].map((partition) => ({
          topic: 'kept',
          partition,
          key: null,
          value: Buffer.from(`p${partition}`),
        })),
      );
      await eventually(() => seen.length === 2, 5_000, 'both partitions consumed');
      await Promise.all([first.close(), second.close()]);
    }));

  it('drops records older than retention.ms from a delete-policy topic', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([
        { topic: 'events', partitions: 1, config: { 'retention.ms': '60000' } },
      ]);
      const producer = await log.producer();
      const now = Date.now();
      await producer.send(
        [now - 120_000, now - 90_000, now - 30_000, now].map((timestamp, i) => ({
          topic: 'events',
          key: null,
          partition: 0,
          value: Buffer.from(`e${i}`),
          timestamp,
        })),
      );
      await log.clean(now);
      assert.deepEqual(await log.admin.watermarks('events'), [{ partition: 0, low: 2, high: 4 }]);
    }));

  it('lets the event loop turn while a batch of 50,000 records is prepared and written', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([{ topic: 'bulk', partitions: 12 }]);
      const producer = await log.producer();
      let ticks = 0;
      const timer = setInterval(() => ticks++, 1);
      const value = Buffer.alloc(100, 1);
      const records = Array.from({ length: 50_000 }, (_, i) => ({
        topic: 'bulk',
        key: Buffer.from(`k${i}`),
        value,
      }));
      // If encoding did not yield, no timer could fire before it returned. (The RocksDB write
      // itself is synchronous in this binding; write groups are bounded in bytes instead.)
      await log.prepare(records);
      assert.ok(ticks > 0, 'a 1 ms timer ran while 50,000 records were encoded');
      await producer.send(records);
      clearInterval(timer);
      const total = (await log.admin.watermarks('bulk')).reduce((n, w) => n + w.high, 0);
      assert.equal(total, 50_000);
    }));

  it('refuses illegal topic names, bad partition counts and out-of-range partitions', () =>
    withEmbeddedLog(async (log) => {
      await assert.rejects(
        () => log.admin.createTopics([{ topic: 'bad/name', partitions: 1 }]),
        /illegal topic name/,
      );
      await assert.rejects(
        () => log.admin.createTopics([{ topic: 'zero', partitions: 0 }]),
        /positive integer/,
      );
      await log.admin.createTopics([{ topic: 'small', partitions: 2 }]);
      const producer = await log.producer();
      await assert.rejects(
        () => producer.send([{ topic: 'small', key: null, value: null, partition: 2 }]),
        /no partition 2/,
      );
      await assert.rejects(
        () => producer.send([{ topic: 'missing', key: null, value: null }]),
        /unknown topic/,
      );
    }));
});
