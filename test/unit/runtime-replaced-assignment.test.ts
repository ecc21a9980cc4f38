/**
 * On Kafka an assignment can be replaced while the runtime still handles it: kafkajs rejoins the
 * group as soon as a heartbeat says a rebalance is under way (at once when it has no batch to
 * hand), and GROUP_JOIN then gives the newer assignment while the older one's tasks are still
 * being opened (restored). Opening, for the older assignment, a task the newer one gave to
 * another member fences that member's task: its next commit fails and its partition's records
 * wait (for FENCED_RECHECK_MS now; for good before ff6810a). The embedded log cannot replace an
 * assignment under its handler (a rebalance waits for every member to park), so its consumer
 * is wrapped here to behave as the Kafka adapter does: assignment() answers the newer one while
 * onAssignment still handles the older.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Consumer, Log, ProducerOptions, TopicPartition } from '../../log/port.ts';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { StreamsRuntime } from '../../processors/runtime/runtime.ts';
import { StateDb } from '../../state/state-db.ts';
import { countingTopology } from '../support/counting.ts';
import { eventually } from '../support/log-helpers.ts';

describe('runtime: an assignment replaced while it is handled', function () {
  this.timeout(30_000);
  let dir: string;
  before(async () => (dir = await mkdtemp(join(tmpdir(), 'kchat-replaced-'))));
  after(() => rm(dir, { recursive: true, force: true }));

  it('opens no task of a partition the newer assignment gave to another member', async () => {
    const log = await EmbeddedLog.open({ dataDir: join(dir, 'log'), cleanerIntervalMs: 0 });
    const stateDb = await StateDb.open(join(dir, 'state'));
    await log.admin.createTopics([
      { topic: 'words', partitions: 4 },
      { topic: 'counts', partitions: 4 },
    ]);
    const fencing: string[] = []; // transactional ids, in the order producers were made
    const kafkaLike = new Proxy(log, {
      get(target, name, receiver) {
        if (name === 'producer')
          return (options?: ProducerOptions) => {
            if (options?.transactionalId) fencing.push(options.transactionalId);
            return target.producer(options);
          };
        if (name === 'consumer')
          return (options: Parameters<Log['consumer']>[0]): Consumer => {
            const inner = target.consumer(options);
            let newer: TopicPartition[] | undefined;
            return {
              subscribe: (topics) => inner.subscribe(topics),
              run: (handlers) =>
                inner.run({
                  eachBatch: (batch) => handlers.eachBatch(batch),
                  onAssignment: async (assignment) => {
                    // Another member joined and took the odd partitions; this member has
                    // already joined that generation (GROUP_JOIN came), the older handler runs.
                    newer = assignment.filter((tp) => tp.partition % 2 === 0);
                    await handlers.onAssignment?.(assignment);
                  },
                }),
              seek: (to) => inner.seek(to),
              outOfGroupBecause: () => inner.outOfGroupBecause(),
              commit: (offsets) => inner.commit(offsets),
              assignment: () => newer ?? inner.assignment(),
              close: () => inner.close(),
            };
          };
        const value = Reflect.get(target, name, receiver) as unknown;
        return typeof value === 'function' ? value.bind(target) : value;
      },
    });
    const runtime = new StreamsRuntime(countingTopology('words', 'counts'), {
      applicationId: 'replaced',
      log: kafkaLike,
      stateDb,
    });
    try {
      await runtime.start();
      await eventually(() => runtime.notRunningBecause === undefined, 20_000, 'ready');
      assert.deepEqual(
        fencing.sort(),
        ['replaced-0', 'replaced-2'],
        'a producer made for an odd partition fences the member the group gave it to',
      );
    } finally {
      await runtime.close();
      await log.close();
      await stateDb.close();
    }
  });
});
