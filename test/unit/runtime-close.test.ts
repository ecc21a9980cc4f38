/** The runtime's close, called twice: the second call waits for the first. */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { StreamsRuntime } from '../../processors/runtime/runtime.ts';
import { StateDb } from '../../state/state-db.ts';
import { countingTopology } from '../support/counting.ts';
import { eventually } from '../support/log-helpers.ts';

describe('stream-processing runtime: close called twice', function () {
  this.timeout(30_000);

  it('answers the second call once every task is closed, so the log can be closed after it', async () => {
    const root = await mkdtemp(join(tmpdir(), 'kchat-close-twice-'));
    const log = await EmbeddedLog.open({ dataDir: join(root, 'log'), cleanerIntervalMs: 0 });
    const stateDb = await StateDb.open(join(root, 'state'));
    try {
      await log.admin.createTopics([
        { topic: 'words', partitions: 4 },
        { topic: 'counts', partitions: 4 },
      ]);
      const runtime = new StreamsRuntime(countingTopology('words', 'counts'), {
        applicationId: 'count',
        log,
        stateDb,
      });
      await runtime.start();
      await eventually(() => runtime.activeTasks().length === 4, 20_000, 'every task open');
      const first = runtime.close();
      await runtime.close();
      assert.deepEqual(runtime.activeTasks(), [], 'no task is still closing');
      await first;
    } finally {
      await log.close();
      await stateDb.close();
      await rm(root, { recursive: true, force: true });
    }
  });
});
