/**
 * The embedded consumer's loop, in two races the other suites leave to timing:
 *
 * - A seek made while eachBatch runs. The runtime's revive seeks a partition back to its
 *   committed offset under the task lock, and a batch handed just before waits for that lock,
 *   then is dropped as stale (its revision is old). The seek must win over that batch's end,
 *   or the records of the dropped batch are never processed.
 * - An append that lands while the loop reads a partition whose records are all gone
 *   (compacted or expired): the wake it sends comes while the loop is not asleep, and must not
 *   be lost, or the loop sleeps past a record already there until some later append.
 */
import assert from 'node:assert/strict';
import { eventually, text, withEmbeddedLog } from '../support/log-helpers.ts';

describe('embedded consumer loop', () => {
  it('goes on from a seek made while eachBatch ran, not from the end of that batch', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([{ topic: 't', partitions: 1 }]);
      const producer = await log.producer();
      await producer.send(
        Array.from({ length: 30 }, (_, i) => ({
          topic: 't',
          key: null,
          value: Buffer.from(`${i}`),
        })),
      );
      await producer.close();
      const consumer = log.consumer({ groupId: 'g', maxBatchSize: 10 });
      const starts: number[] = [];
      let sought = false;
      await consumer.subscribe(['t']);
      await consumer.run({
        eachBatch: async (batch) => {
          starts.push(batch.records[0]!.offset);
          // The second batch is dropped, and the partition sought back to it (a revive).
          if (batch.records[0]!.offset === 10 && !sought) {
            sought = true;
            consumer.seek({ topic: 't', partition: 0, offset: 10 });
          }
        },
      });
      await eventually(() => starts.filter((s) => s === 20).length > 0, 5_000, 'the end');
      await new Promise((resolve) => setTimeout(resolve, 100));
      await consumer.close();
      assert.deepEqual(starts, [0, 10, 10, 20], 'the batch from 10 handed again after the seek');
    }));

  it('does not sleep past a record appended while it read a partition whose records are gone', () =>
    withEmbeddedLog(async (log) => {
      await log.admin.createTopics([{ topic: 't', partitions: 3 }]);
      const producer = await log.producer();
      // Partition 1 holds one record, then none: gone as compaction or retention would take it.
      await producer.send([{ topic: 't', key: null, value: Buffer.from('gone'), partition: 1 }]);
      await log.store.deleteRecords('t', 1, [0]);
      // The group's committed offset is below the end, with nothing left to read there.
      await log.store.commitOffsets('g', [{ topic: 't', partition: 1, offset: 0 }]);

      const read = log.store.read.bind(log.store);
      let raced = false;
      log.store.read = async (topic, partition, from, max) => {
        const records = await read(topic, partition, from, max);
        if (partition === 1 && !raced) {
          raced = true;
          // A record lands in the partition past the end this read was bounded by: the loop
          // moves its position to that end and finds nothing else to do in this round.
          await producer.send([{ topic: 't', key: null, value: Buffer.from('new'), partition: 1 }]);
        }
        return records;
      };
      const handed: string[] = [];
      const consumer = log.consumer({ groupId: 'g' });
      await consumer.subscribe(['t']);
      await consumer.run({
        eachBatch: async (batch) => void handed.push(...batch.records.map((r) => text(r.value)!)),
      });
      try {
        await eventually(() => raced, 5_000, 'the read of the emptied partition');
        // Nothing else is appended: only the wake of that append can bring the record.
        await eventually(() => handed.includes('new'), 3_000, 'the record appended meanwhile');
      } finally {
        await consumer.close();
        await producer.close();
      }
    }));
});
