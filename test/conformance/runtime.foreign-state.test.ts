/**
 * README, the runtime: each store restores "from the local checkpoint when there is one, from
 * the start when the local state is gone" -- and, says runtime.ts, when the local state "does
 * not belong to this changelog": a checkpoint past the changelog's end (the changelog topic was
 * deleted and made again, the cluster replaced, an application reset) means the local store
 * holds state the changelog does not, and it must be dropped, not used.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { changelogTopic, StreamsRuntime } from '../../processors/runtime/runtime.ts';
import { StateDb } from '../../state/state-db.ts';
import { countingTopology } from '../support/counting.ts';
import { eventually, text } from '../support/log-helpers.ts';

const APP = 'count';
const INPUT = 'words';
const OUTPUT = 'counts';

/** A fresh log holding `words` under key k; runs the counting app on `stateDb` over it. */
async function countOn(logDir: string, stateDb: StateDb, words: string[]): Promise<string[]> {
  const log = await EmbeddedLog.open({ dataDir: logDir, cleanerIntervalMs: 0 });
  try {
    await log.admin.createTopics([
      { topic: INPUT, partitions: 1 },
      { topic: OUTPUT, partitions: 1 },
    ]);
    const producer = await log.producer();
    await producer.send(
      words.map((w) => ({ topic: INPUT, key: Buffer.from('k'), value: Buffer.from(w) })),
    );
    await producer.close();
    const runtime = new StreamsRuntime(countingTopology(INPUT, OUTPUT), {
      applicationId: APP,
      log,
      stateDb,
    });
    await runtime.start();
    await eventually(
      async () => (await log.admin.committedOffsets(APP, INPUT))[0]!.offset === words.length,
      20_000,
      `${words.length} records committed`,
    );
    await runtime.close();
    const counts: string[] = [];
    for await (const batch of log.readPartitions(OUTPUT, [{ partition: 0, from: 0 }]))
      counts.push(...batch.records.map((r) => text(r.value)!));
    return counts;
  } finally {
    await log.close();
  }
}

describe('stream-processing runtime: local state that does not belong to the changelog', function () {
  this.timeout(60_000);

  it('is dropped when its checkpoint lies past the changelog end, and counting starts afresh', async () => {
    const root = await mkdtemp(join(tmpdir(), 'kchat-foreign-state-'));
    const stateDb = await StateDb.open(join(root, 'state'));
    try {
      assert.deepEqual(await countOn(join(root, 'log-1'), stateDb, ['a', 'b', 'c', 'd', 'e']), [
        '1',
        '2',
        '3',
        '4',
        '5',
      ]);
      // The same local state against a new log: its changelog is empty.
      assert.deepEqual(
        await countOn(join(root, 'log-2'), stateDb, ['x', 'y']),
        ['1', '2'],
        'the counts of the old changelog are not carried over',
      );
    } finally {
      await stateDb.close();
      await rm(root, { recursive: true, force: true });
    }
  });

  it('is dropped when its checkpoint is older than the changelog keeps tombstones, and records follow it', async () => {
    // Another instance owned the task meanwhile and deleted a key; the changelog's cleaner
    // dropped the tombstone once it was older than delete.retention.ms. Restored from the old
    // checkpoint, the local store would hold the deleted key for good.
    const root = await mkdtemp(join(tmpdir(), 'kchat-old-checkpoint-'));
    const stateDb = await StateDb.open(join(root, 'state'));
    const log = await EmbeddedLog.open({ dataDir: join(root, 'log'), cleanerIntervalMs: 0 });
    const changelog = changelogTopic(APP, 'counts');
    const run = async (words: number, checkpointTrustMs?: number) => {
      const producer = await log.producer();
      const before = (await log.admin.committedOffsets(APP, INPUT))[0]?.offset ?? 0;
      await producer.send(
        Array.from({ length: words }, () => ({
          topic: INPUT,
          key: Buffer.from('k'),
          value: Buffer.from('w'),
        })),
      );
      await producer.close();
      const runtime = new StreamsRuntime(countingTopology(INPUT, OUTPUT), {
        applicationId: APP,
        log,
        stateDb,
        checkpointTrustMs,
      });
      await runtime.start();
      await eventually(
        async () =>
          (await log.admin.committedOffsets(APP, INPUT))[0]!.offset === Math.max(0, before) + words,
        20_000,
        `${words} more records committed`,
      );
      await runtime.close();
    };
    const counts = async () => {
      const all: string[] = [];
      for await (const batch of log.readPartitions(OUTPUT, [{ partition: 0, from: 0 }]))
        all.push(...batch.records.map((r) => text(r.value)!));
      return all;
    };
    try {
      await log.admin.createTopics([
        { topic: INPUT, partitions: 1 },
        { topic: OUTPUT, partitions: 1 },
      ]);
      await run(3);
      assert.deepEqual(await counts(), ['1', '2', '3']);
      // The other owner's delete, then a day and more of the cleaner.
      const other = await log.producer();
      await other.send([{ topic: changelog, key: Buffer.from('k'), value: null }]);
      await other.close();
      await log.clean(Date.now() + 2 * 24 * 60 * 60 * 1000);
      const left: string[] = [];
      for await (const batch of log.readPartitions(changelog, [{ partition: 0, from: 0 }]))
        left.push(...batch.records.map((r) => r.key!.toString()));
      assert.deepEqual(left, [], 'the changelog holds neither the count nor its tombstone');
      // Trusting no checkpoint with records after it, as one older than 12 hours is not.
      await run(1, 0);
      assert.deepEqual(await counts(), ['1', '2', '3', '1'], 'the deleted count stays deleted');
    } finally {
      await log.close();
      await stateDb.close();
      await rm(root, { recursive: true, force: true });
    }
  });

  it("keeps a running task's checkpoints current, so that a crash after a long run restores from them", async () => {
    const root = await mkdtemp(join(tmpdir(), 'kchat-touched-checkpoint-'));
    const stateDb = await StateDb.open(join(root, 'state'));
    const log = await EmbeddedLog.open({ dataDir: join(root, 'log'), cleanerIntervalMs: 0 });
    const changelog = changelogTopic(APP, 'counts');
    try {
      await log.admin.createTopics([
        { topic: INPUT, partitions: 1 },
        { topic: OUTPUT, partitions: 1 },
      ]);
      const runtime = new StreamsRuntime(countingTopology(INPUT, OUTPUT), {
        applicationId: APP,
        log,
        stateDb,
        commitIntervalMs: 20,
        checkpointTrustMs: 400,
      });
      await runtime.start();
      const producer = await log.producer();
      try {
        const openedAt = Date.now();
        await eventually(() => runtime.activeTasks().length === 1, 20_000, 'the task opened');
        const first = (await stateDb.checkpoint(changelog, 0))!;
        assert.ok(first.writtenAt! >= openedAt - 1000, 'the restore wrote a checkpoint');
        // 1.2 s of records, committed every 20 ms: three trusts' worth of running.
        for (let i = 0; i < 40; i++) {
          await producer.send([{ topic: INPUT, key: Buffer.from('k'), value: Buffer.from('w') }]);
          await new Promise((resolve) => setTimeout(resolve, 30));
        }
        await eventually(
          async () => (await log.admin.committedOffsets(APP, INPUT))[0]!.offset === 40,
          20_000,
          'every record committed',
        );
        const now = (await stateDb.checkpoint(changelog, 0))!;
        assert.equal(now.offset, first.offset, 'the same offset');
        assert.ok(
          Date.now() - now.writtenAt! < 400,
          `said current ${Date.now() - now.writtenAt!} ms ago, within the trust`,
        );
      } finally {
        await producer.close();
        await runtime.close();
      }
    } finally {
      await log.close();
      await stateDb.close();
      await rm(root, { recursive: true, force: true });
    }
  });
});
