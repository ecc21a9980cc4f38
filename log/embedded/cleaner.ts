/**
 * The embedded log's cleaner, Kafka's log cleaner in miniature: compacted topics keep only the
 * latest record of each key (and drop a latest tombstone once it is older than
 * `delete.retention.ms`); other topics drop records older than `retention.ms`.
 *
 * Unlike Kafka, which never cleans the active segment, this cleans up to the partition's end:
 * a reader of a compacted topic must not count on seeing superseded values in either log.
 */
import type { PartitionStore } from './partition-store.ts';

export interface CleanResult {
  topic: string;
  partition: number;
  removed: number;
}

export async function cleanPartition(
  store: PartitionStore,
  topic: string,
  partition: number,
  now = Date.now(),
): Promise<CleanResult> {
  const meta = store.meta(topic);
  if (!meta) return { topic, partition, removed: 0 };
  const doomed: number[] = [];
  if (meta.cleanupPolicy === 'compact') {
    // First pass: the latest offset of every key. Second pass: everything superseded. Both
    // stop at the end as it was before the first: a record appended meanwhile was never seen
    // as the latest of its key, and would go while the value it replaced stayed.
    const end = store.end(topic, partition);
    const latest = new Map<string, number>();
    for await (const records of store.scan(topic, partition, { to: end })) {
      for (const r of records) if (r.key) latest.set(r.key.toString('base64'), r.offset);
    }
    for await (const records of store.scan(topic, partition, { to: end })) {
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

export async function cleanAll(store: PartitionStore, now = Date.now()): Promise<CleanResult[]> {
  const results: CleanResult[] = [];
  for (const topic of store.topicNames()) {
    const meta = store.meta(topic);
    if (!meta || (meta.cleanupPolicy !== 'compact' && meta.retentionMs < 0)) continue;
    for (let p = 0; p < meta.partitions; p++)
      results.push(await cleanPartition(store, topic, p, now));
  }
  return results;
}
