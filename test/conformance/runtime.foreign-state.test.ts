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
import { StreamsRuntime } from '../../processors/runtime/runtime.ts';
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
});
