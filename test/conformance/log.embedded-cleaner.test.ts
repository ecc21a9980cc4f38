/**
 * The embedded log's cleaner running while a reader scans a compacted topic (readPartitions:
 * stores restoring from their changelogs, global tables loading). A scan is one RocksDB iterator,
 * one snapshot: when it read each slice on its own, the cleaner could remove a key's old value
 * and its tombstone between two slices, after the reader had taken the value: a restored store
 * kept a deleted key, and a loaded table lacked a live one. Found by a review (session 18).
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { MIN_CLEANABLE_DIRTY_RATIO } from '../../log/embedded/cleaner.ts';
import { GlobalTable } from '../../processors/runtime/global-table.ts';
import { changelogTopic, StreamsRuntime } from '../../processors/runtime/runtime.ts';
import { StateDb } from '../../state/state-db.ts';
import { countingTopology } from '../support/counting.ts';
import { eventually, text, withEmbeddedLog } from '../support/log-helpers.ts';

const DAY = 24 * 60 * 60 * 1000;

/** k=v1, 1500 other keys, then k's tombstone: two days old, as after a process was down. */
async function fill(log: EmbeddedLog, topic: string, key = 'k', value = 'v1') {
  const producer = await log.producer();
  const old = Date.now() - 2 * DAY;
  await producer.send([
    { topic, key: Buffer.from(key), value: Buffer.from(value), timestamp: old },
    ...Array.from({ length: 1500 }, (_, i) => ({
      topic,
      key: Buffer.from(`filler-${i}`),
      value: Buffer.from('x'),
      timestamp: old,
    })),
    { topic, key: Buffer.from(key), value: null, timestamp: old },
  ]);
  await producer.close();
}

describe('embedded log: the cleaner racing a reader of a compacted topic', function () {
  this.timeout(60_000);

  it('readPartitions hands a deleted key’s tombstone too, when the cleaner runs mid-scan', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([
        { topic: 'table', partitions: 1, config: { 'cleanup.policy': 'compact' } },
      ]);
      await fill(log, 'table');
      const table = new Map<string, string | null>();
      let slices = 0;
      for await (const batch of log.readPartitions('table', [{ partition: 0, from: 0 }])) {
        for (const r of batch.records) {
          if (r.value === null) table.delete(text(r.key)!);
          else table.set(text(r.key)!, text(r.value));
        }
        // The periodic cleaner fires between two slices of the scan.
        if (++slices === 1) await log.clean();
      }
      assert.equal(table.get('k'), undefined, 'k was deleted, but the reader still holds it');
    }));

  it('a store restored from its changelog while the cleaner runs does not keep a deleted key', async () => {
    const root = await mkdtemp(join(tmpdir(), 'kchat-restore-'));
    const log = await EmbeddedLog.open({ dataDir: join(root, 'log'), cleanerIntervalMs: 0 });
    const stateDb = await StateDb.open(join(root, 'state'));
    const APP = 'count';
    try {
      await log.admin.createTopics([
        { topic: 'words', partitions: 1 },
        { topic: 'counts', partitions: 1 },
        {
          topic: changelogTopic(APP, 'counts'),
          partitions: 1,
          config: { 'cleanup.policy': 'compact' },
        },
      ]);
      // The changelog as a previous owner left it: k counted to 5, then deleted (2 days ago).
      await fill(log, changelogTopic(APP, 'counts'), 'k', '5');
      // The cleaner fires while the restore reads (its first run after a restart).
      const original = log.readPartitions.bind(log);
      log.readPartitions = async function* (topic, starts) {
        let slices = 0;
        for await (const batch of original(topic, starts)) {
          yield batch;
          if (++slices === 1) await log.clean();
        }
      };
      const producer = await log.producer();
      await producer.send([{ topic: 'words', key: Buffer.from('k'), value: Buffer.from('w') }]);
      await producer.close();
      const runtime = new StreamsRuntime(countingTopology('words', 'counts'), {
        applicationId: APP,
        log,
        stateDb,
      });
      await runtime.start();
      await eventually(
        async () => (await log.admin.committedOffsets(APP, 'words'))[0]!.offset === 1,
        20_000,
        'the word committed',
      );
      await runtime.close();
      const counts: string[] = [];
      for await (const batch of original('counts', [{ partition: 0, from: 0 }]))
        counts.push(...batch.records.map((r) => text(r.value)!));
      assert.deepEqual(counts, ['1'], 'k was deleted: its next count is 1');
    } finally {
      await log.close();
      await stateDb.close();
      await rm(root, { recursive: true, force: true });
    }
  });

  it('a global table loaded while the cleaner runs has every live key once start() resolves', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([
        { topic: 'gateways', partitions: 1, config: { 'cleanup.policy': 'compact' } },
      ]);
      const producer = await log.producer();
      await producer.send([
        ...Array.from({ length: 1500 }, (_, i) => ({
          topic: 'gateways',
          key: Buffer.from(`other-${i}`),
          value: Buffer.from('x'),
        })),
        { topic: 'gateways', key: Buffer.from('g'), value: Buffer.from('beat-1') },
      ]);
      // Between two slices of the load, g's next heartbeat arrives and the cleaner runs: beat-1,
      // not yet read, is superseded and goes; beat-2 is past the end the load reads to.
      const original = log.readPartitions.bind(log);
      log.readPartitions = async function* (topic, starts) {
        let slices = 0;
        for await (const batch of original(topic, starts)) {
          yield batch;
          if (topic === 'gateways' && ++slices === 1) {
            await producer.send([
              { topic: 'gateways', key: Buffer.from('g'), value: Buffer.from('beat-2') },
            ]);
            assert.ok(
              (await log.clean()).some((r) => r.removed > 0),
              'the cleaner removed beat-1',
            );
          }
        }
      };
      const table = new GlobalTable<string>(log, 'gateways', { decode: (v) => v.toString() });
      try {
        await table.start();
        assert.equal(table.get('g'), 'beat-1', 'g is in the loaded table when start() resolves');
        await eventually(async () => table.get('g') === 'beat-2', 5_000, 'the newer beat');
      } finally {
        await table.close();
        await producer.close();
      }
    }));
});

describe('embedded log: how often the cleaner compacts', () => {
  /** `count` records over `keys` keys (key i % keys), each a new value. */
  async function write(log: EmbeddedLog, topic: string, count: number, keys: number) {
    const producer = await log.producer();
    await producer.send(
      Array.from({ length: count }, (_, i) => ({
        topic,
        key: Buffer.from(`k${i % keys}`),
        value: Buffer.from(`v${i}`),
      })),
    );
    await producer.close();
  }

  /** Records the periodic cleaner's pass reads, and what it removes. */
  async function periodicPass(log: EmbeddedLog) {
    const scan = log.store.scan.bind(log.store);
    let read = 0;
    log.store.scan = async function* (...args: Parameters<typeof scan>) {
      for await (const records of scan(...args)) {
        read += records.length;
        yield records;
      }
    };
    try {
      const removed = (await log.clean(Date.now(), MIN_CLEANABLE_DIRTY_RATIO)).reduce(
        (sum, r) => sum + r.removed,
        0,
      );
      return { read, removed };
    } finally {
      log.store.scan = scan;
    }
  }

  it(`compacts a partition once what was written since its last compaction is ${MIN_CLEANABLE_DIRTY_RATIO} of it, and reads nothing before`, () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([
        { topic: 'changelog', partitions: 1, config: { 'cleanup.policy': 'compact' } },
      ]);
      await write(log, 'changelog', 1_000, 100);
      // Not compacted since the log opened: how much is dirty is not known.
      assert.deepEqual(await periodicPass(log), { read: 2_000, removed: 900 });
      assert.deepEqual(await periodicPass(log), { read: 0, removed: 0 }, 'nothing written');
      await write(log, 'changelog', 99, 100);
      assert.deepEqual(await periodicPass(log), { read: 0, removed: 0 }, '99 of 199');
      await write(log, 'changelog', 1, 100);
      assert.deepEqual(await periodicPass(log), { read: 400, removed: 100 }, '100 of 200');
      // A manual clean compacts whatever the ratio.
      await write(log, 'changelog', 10, 100);
      assert.equal((await log.clean())[0]!.removed, 10);
    }));
});
