/**
 * The embedded log's cleaner, Kafka's log cleaner in miniature: compacted topics keep only the
 * latest record of each key (and drop a latest tombstone once it is older than
 * `delete.retention.ms`); other topics drop records older than `retention.ms`.
 *
 * Unlike Kafka, which never cleans the active segment, this cleans up to the partition's end:
 * a reader of a compacted topic must not count on seeing superseded values in either log.
 *
 * As Kafka's `min.cleanable.dirty.ratio`, the periodic cleaner compacts a partition only once
 * the records appended since its last compaction are at least MIN_CLEANABLE_DIRTY_RATIO of it:
 * a compaction reads the whole partition, and one a minute regardless cost time in proportion
 * to the state kept (a changelog of 400,000 keys, 1.8 s a minute, idle), where this costs
 * time in proportion to what is written. A tombstone past `delete.retention.ms` goes at the
 * next compaction, as on Kafka.
 */
import type { PartitionStore } from './partition-store.ts';

/** Kafka's default `min.cleanable.dirty.ratio`. */
export const MIN_CLEANABLE_DIRTY_RATIO = 0.5;

export interface CleanResult {
  topic: string;
  partition: number;
  removed: number;
}

/**
 * The share of a compacted partition appended since its last compaction: 1 when it was not
 * compacted since the log opened (how much is dirty is not known), 0 when nothing was appended.
 */
export function dirtyRatio(store: PartitionStore, topic: string, partition: number): number {
  const cleaned = store.cleaned(topic, partition);
  if (!cleaned) return 1;
  const dirty = store.end(topic, partition) - cleaned.through;
  return dirty === 0 ? 0 : dirty / (dirty + cleaned.kept);
}

/**
 * Cleans one partition. `minDirtyRatio`: a compacted partition whose dirtyRatio is under it is
 * left as it is (0: always compacted).
 */
export async function cleanPartition(
  store: PartitionStore,
  topic: string,
  partition: number,
  now = Date.now(),
  minDirtyRatio = 0,
): Promise<CleanResult> {
  const meta = store.meta(topic);
  if (!meta) return { topic, partition, removed: 0 };
  const doomed: number[] = [];
  if (meta.cleanupPolicy === 'compact') {
    if (minDirtyRatio > 0 && dirtyRatio(store, topic, partition) < minDirtyRatio)
      return { topic, partition, removed: 0 };
    // First pass: the latest offset of every key. Second pass: everything superseded. Both
    // stop at the end as it was before the first: a record appended meanwhile was never seen
    // as the latest of its key, and would go while the value it replaced stayed.
    const end = store.end(topic, partition);
    const latest = new Map<string, number>();
    for await (const records of store.scan(topic, partition, { to: end })) {
      for (const r of records) if (r.key) latest.set(r.key.toString('base64'), r.offset);
    }
    let scanned = 0;
    for await (const records of store.scan(topic, partition, { to: end })) {
      scanned += records.length;
      for (const r of records) {
        if (!r.key) {
          doomed.push(r.offset); // an unkeyed record has no place in a compacted topic
          continue;
        }
        const isLatest = latest.get(r.key.toString('base64')) === r.offset;
        if (!isLatest) doomed.push(r.offset);
        else if (r.value === null && now - r.timestamp > meta.deleteRetentionMs)
          doomed.push(r.offset);
      }
    }
    // Set before the deletion: were it to fail, what it would have removed is still there but
    // not counted as kept, and the next compaction comes a little sooner than it should.
    store.setCleaned(topic, partition, { through: end, kept: scanned - doomed.length });
  } else if (meta.retentionMs >= 0) {
    const cutoff = now - meta.retentionMs;
    scan: for await (const records of store.scan(topic, partition)) {
      for (const r of records) {
        // Like Kafka's time-based retention, stop at the first record young enough to keep.
        if (r.timestamp >= cutoff) break scan;
        doomed.push(r.offset);
      }
    }
  }
  // The end offset survives an emptied partition: it is kept apart, under the h/ key.
  await store.deleteRecords(topic, partition, doomed);
  return { topic, partition, removed: doomed.length };
}

export async function cleanAll(
  store: PartitionStore,
  now = Date.now(),
  minDirtyRatio = 0,
): Promise<CleanResult[]> {
  const results: CleanResult[] = [];
  for (const topic of store.topicNames()) {
    const meta = store.meta(topic);
    if (!meta || (meta.cleanupPolicy !== 'compact' && meta.retentionMs < 0)) continue;
    for (let p = 0; p < meta.partitions; p++)
      results.push(await cleanPartition(store, topic, p, now, minDirtyRatio));
  }
  return results;
}
