/**
 * The storage engine of the embedded log: topics and partitions in one RocksDB database,
 * appended to with group commit.
 *
 * Appends that arrive while a write is in flight are gathered and written together in the
 * next RocksDB write batch, so durability costs one write (one fsync with `syncWrites`) per
 * group, not per record. A unit of appends (a produce call, or a transaction's records and
 * consumer offsets) always lands inside one batch: it is atomic. Records become readable only
 * once their batch is written, which is what gives transactions read-committed visibility.
 */
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import { RocksLevel } from '@nxtedition/rocksdb';
import type { CleanupPolicy, LogRecord, TopicPartitionOffset, TopicSpec } from '../port.ts';
import { LogClosedError, LogError, UnknownTopicError } from '../errors.ts';
import { decodeRecord, encodeRecord } from './record-format.ts';
import * as keys from './keys.ts';

/** Operations per slice when a write batch is built, between which the event loop may turn. */
const BATCH_SLICE = 2000;
/** Records per read of a scan (the cleaner's, readPartitions', time lookups'). */
const SCAN_SLICE = 1000;
/**
 * This binding writes a batch synchronously on the main thread, so a write group is bounded:
 * units are added until it holds this many bytes (a single unit is never split: it is atomic).
 */
const MAX_GROUP_BYTES = 4 * 1024 * 1024;
/** Kafka's default `delete.retention.ms`: one day. */
const DEFAULT_DELETE_RETENTION_MS = 86_400_000;
/** Kafka's default `retention.ms` for delete-policy topics: seven days. */
const DEFAULT_RETENTION_MS = 604_800_000;

export interface TopicMeta {
  partitions: number;
  cleanupPolicy: CleanupPolicy;
  /** -1: kept forever. */
  retentionMs: number;
  /** How long a tombstone stays in a compacted topic once it is the latest record of its key. */
  deleteRetentionMs: number;
  createdAt: number;
}

interface PartitionState {
  /** The offset the next appended record gets. */
  next: number;
  /** Every offset below this one is durable and readable. */
  end: number;
  /** The cleaner's last compaction of it since the log opened: see `cleaned`. */
  cleaned?: Cleaned;
}

/** A compaction: the end it cleaned up to, and how many records it left below it. */
export interface Cleaned {
  through: number;
  kept: number;
}

interface Topic {
  meta: TopicMeta;
  partitions: PartitionState[];
}

export interface AppendRecord {
  topic: string;
  partition: number;
  /** Assigned by `append`. */
  offset?: number;
  encoded: Buffer;
}

/** Everything in a unit is written in one batch, or not at all. */
export interface AppendUnit {
  records: AppendRecord[];
  offsets?: { groupId: string; offsets: TopicPartitionOffset[] };
}

interface Pending {
  unit: AppendUnit;
  resolve: () => void;
  reject: (error: unknown) => void;
}

export interface PartitionStoreOptions {
  /** fsync every write batch (survives power loss, not only a killed process). */
  syncWrites?: boolean;
}

export class PartitionStore {
  private readonly db: RocksLevel<string, Buffer>;
  private readonly topics = new Map<string, Topic>();
  private pending: Pending[] = [];
  private writing = false;
  private failure: unknown = undefined;
  private closed = false;
  private readonly appendListeners = new Set<(topic: string) => void>();
  /** Write batches issued so far: with `records`, shows how well appends are grouped. */
  writeBatches = 0;
  recordsWritten = 0;

  private constructor(
    readonly directory: string,
    private readonly options: PartitionStoreOptions,
  ) {
    this.db = new RocksLevel<string, Buffer>(directory, {
      keyEncoding: 'utf8',
      valueEncoding: 'buffer',
    });
  }

  static async open(
    directory: string,
    options: PartitionStoreOptions = {},
  ): Promise<PartitionStore> {
    const store = new PartitionStore(directory, options);
    try {
      await store.db.open({ createIfMissing: true });
    } catch (error) {
      // RocksDB's LOCK: another process (a second `npm start` on one DATA_DIR) has it open.
      if ((error as { cause?: { code?: string } }).cause?.code === 'LEVEL_LOCKED')
        throw new LogError(`${directory} is in use by another process`, { cause: error });
      throw error;
    }
    await store.load();
    return store;
  }

  private async load(): Promise<void> {
    for await (const [key, value] of this.db.iterator(keys.TOPICS)) {
      const name = key.slice(2);
      const meta = JSON.parse(value.toString('utf8')) as TopicMeta;
      const partitions: PartitionState[] = [];
      for (let p = 0; p < meta.partitions; p++) {
        const hw = await this.get(keys.highWatermarkKey(name, p));
        const next = hw === undefined ? 0 : Number(hw.toString('utf8'));
        partitions.push({ next, end: next });
      }
      this.topics.set(name, { meta, partitions });
    }
  }

  // ---- topics ----

  topicNames(): string[] {
    return [...this.topics.keys()];
  }

  meta(topic: string): TopicMeta | undefined {
    return this.topics.get(topic)?.meta;
  }

  async createTopic(spec: TopicSpec): Promise<void> {
    this.checkOpen();
    if (this.topics.has(spec.topic)) return;
    const config = spec.config ?? {};
    const meta: TopicMeta = {
      partitions: spec.partitions,
      cleanupPolicy: config['cleanup.policy'] ?? 'delete',
      retentionMs: Number(config['retention.ms'] ?? DEFAULT_RETENTION_MS),
      deleteRetentionMs: Number(config['delete.retention.ms'] ?? DEFAULT_DELETE_RETENTION_MS),
      createdAt: Date.now(),
    };
    const partitions = Array.from({ length: meta.partitions }, () => ({ next: 0, end: 0 }));
    this.topics.set(spec.topic, { meta, partitions });
    await this.db.put(keys.topicKey(spec.topic), Buffer.from(JSON.stringify(meta)), {
      sync: this.options.syncWrites,
    } as never);
  }

  async setRetention(topic: string, retentionMs: number): Promise<void> {
    this.checkOpen();
    const state = this.topics.get(topic);
    if (!state) throw new UnknownTopicError(topic);
    state.meta = { ...state.meta, retentionMs };
    await this.db.put(keys.topicKey(topic), Buffer.from(JSON.stringify(state.meta)), {
      sync: this.options.syncWrites,
    } as never);
  }

  async deleteTopic(topic: string): Promise<void> {
    this.checkOpen();
    if (!this.topics.delete(topic)) return;
    await this.db.del(keys.topicKey(topic));
    await this.db.clear(keys.topicRecords(topic));
    await this.db.clear({ gte: `h/${topic}/`, lt: `h/${topic}0` });
  }

  partitionCount(topic: string): number {
    return this.topic(topic).meta.partitions;
  }

  /** The durable end (high watermark) of a partition. */
  end(topic: string, partition: number): number {
    return this.partition(topic, partition).end;
  }

  /** The last compaction of the partition since the log opened, if any. */
  cleaned(topic: string, partition: number): Cleaned | undefined {
    return this.partition(topic, partition).cleaned;
  }

  setCleaned(topic: string, partition: number, cleaned: Cleaned): void {
    this.partition(topic, partition).cleaned = cleaned;
  }

  async lowWatermark(topic: string, partition: number): Promise<number> {
    // The end as it is now, not after the read: records appended meanwhile lie at or above it,
    // and answering the later end for an empty range would skip them.
    const end = this.partition(topic, partition).end;
    const iterator = this.db.keys({ ...keys.recordRange(topic, partition, 0, end), limit: 1 });
    try {
      const first: string | undefined = await iterator.next();
      return first === undefined ? end : keys.offsetOfRecordKey(first);
    } finally {
      await iterator.close();
    }
  }

  /**
   * Why the store refuses every append from now on (a write failed: the disk is full, or
   * failing), or undefined while it writes. Only a restart clears it: for liveness probes.
   */
  get failedBecause(): string | undefined {
    if (this.failure === undefined) return undefined;
    const cause = this.failure instanceof Error ? this.failure.message : String(this.failure);
    return `the embedded log failed to write and refuses further appends: ${cause}`;
  }

  // ---- appends ----

  /**
   * Assigns offsets to the unit's records at once (so that units are ordered as they are
   * appended) and resolves when the unit is durable.
   */
  append(unit: AppendUnit): Promise<void> {
    if (this.closed) return Promise.reject(new LogClosedError());
    if (this.failure !== undefined) return Promise.reject(this.failed());
    for (const record of unit.records) {
      record.offset = this.partition(record.topic, record.partition).next++;
    }
    return new Promise<void>((resolve, reject) => {
      this.pending.push({ unit, resolve, reject });
      if (!this.writing) {
        this.writing = true;
        // Let everything appended in this turn of the event loop join the batch.
        setImmediate(() => void this.writeGroups());
      }
    });
  }

  private async writeGroups(): Promise<void> {
    while (this.pending.length > 0) {
      let bytes = 0;
      let count = 0;
      while (count < this.pending.length && (count === 0 || bytes < MAX_GROUP_BYTES)) {
        for (const record of this.pending[count]!.unit.records) bytes += record.encoded.length;
        count++;
      }
      const group = this.pending.slice(0, count);
      this.pending = this.pending.slice(count);
      try {
        await this.writeGroup(group);
      } catch (error) {
        // A failed write leaves offsets assigned that were never stored: the log can no
        // longer promise gapless order, so it refuses every later append.
        this.failure = error;
        for (const item of [...group, ...this.pending]) item.reject(this.failed());
        this.pending = [];
        break;
      }
      for (const item of group) item.resolve();
    }
    this.writing = false;
  }

  private async writeGroup(group: Pending[]): Promise<void> {
    const batch = this.db.batch();
    const highWatermarks = new Map<string, { topic: string; partition: number; next: number }>();
    let operations = 0;
    for (const { unit } of group) {
      for (const record of unit.records) {
        batch.put(keys.recordKey(record.topic, record.partition, record.offset!), record.encoded);
        const id = `${record.topic}/${record.partition}`;
        highWatermarks.set(id, {
          topic: record.topic,
          partition: record.partition,
          next: record.offset! + 1,
        });
        if (++operations % BATCH_SLICE === 0) await yieldToEventLoop();
      }
      if (unit.offsets) {
        for (const o of unit.offsets.offsets) {
          batch.put(
            keys.offsetKey(unit.offsets.groupId, o.topic, o.partition),
            Buffer.from(String(o.offset)),
          );
        }
      }
    }
    for (const hw of highWatermarks.values()) {
      batch.put(keys.highWatermarkKey(hw.topic, hw.partition), Buffer.from(String(hw.next)));
    }
    await batch.write({ sync: this.options.syncWrites } as never);
    this.writeBatches++;
    const touched = new Set<string>();
    for (const hw of highWatermarks.values()) {
      const state = this.topics.get(hw.topic)?.partitions[hw.partition];
      if (state) state.end = Math.max(state.end, hw.next);
      touched.add(hw.topic);
    }
    for (const { unit } of group) this.recordsWritten += unit.records.length;
    for (const topic of touched) for (const listener of this.appendListeners) listener(topic);
  }

  /** Called with the topic's name whenever records become readable in it. */
  onAppend(listener: (topic: string) => void): () => void {
    this.appendListeners.add(listener);
    return () => this.appendListeners.delete(listener);
  }

  // ---- reads ----

  /** Up to `max` durable records of a partition from offset `from` on. */
  async read(topic: string, partition: number, from: number, max: number): Promise<LogRecord[]> {
    this.checkOpen();
    const end = this.partition(topic, partition).end;
    if (from >= end) return [];
    const iterator = this.db.iterator({
      ...keys.recordRange(topic, partition, from, end),
      limit: max,
    });
    try {
      return (await iterator.nextv(max)).map(([key, value]) =>
        storedToRecord(topic, partition, key, value),
      );
    } finally {
      await iterator.close();
    }
  }

  /**
   * Iterates a partition's durable records in slices of SCAN_SLICE, for scans (the cleaner's,
   * readPartitions', time lookups'), from `from` up to, not including, `to` (default: the end).
   * One RocksDB iterator, so one snapshot: the scan sees the partition as it was when it began,
   * up to the end it had then. Slices read one by one would not: a restore reading a compacted
   * changelog could take a key's old value in one slice, and find its tombstone gone from the
   * next (the cleaner removing both meanwhile), and keep a deleted key.
   */
  async *scan(
    topic: string,
    partition: number,
    { from = 0, to = Infinity }: { from?: number; to?: number } = {},
  ): AsyncGenerator<LogRecord[]> {
    this.checkOpen();
    const end = Math.min(to, this.partition(topic, partition).end);
    if (from >= end) return;
    const iterator = this.db.iterator(keys.recordRange(topic, partition, from, end));
    try {
      for (;;) {
        const entries = await iterator.nextv(SCAN_SLICE);
        if (entries.length === 0) return;
        yield entries.map(([key, value]) => storedToRecord(topic, partition, key, value));
      }
    } finally {
      await iterator.close();
    }
  }

  async deleteRecords(topic: string, partition: number, offsets: number[]): Promise<void> {
    for (let i = 0; i < offsets.length; i += BATCH_SLICE) {
      const batch = this.db.batch();
      for (const offset of offsets.slice(i, i + BATCH_SLICE))
        batch.del(keys.recordKey(topic, partition, offset));
      await batch.write();
    }
  }

  // ---- consumer group offsets ----

  async committedOffset(groupId: string, topic: string, partition: number): Promise<number> {
    const value = await this.get(keys.offsetKey(groupId, topic, partition));
    return value === undefined ? -1 : Number(value.toString('utf8'));
  }

  async commitOffsets(groupId: string, offsets: TopicPartitionOffset[]): Promise<void> {
    for (const o of offsets) this.partition(o.topic, o.partition);
    await this.append({ records: [], offsets: { groupId, offsets } });
  }

  // ---- lifecycle ----

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    while (this.writing) await yieldToEventLoop();
    await this.db.close();
  }

  get isClosed(): boolean {
    return this.closed;
  }

  /** abstract-level 1.x rejects a missing key with code LEVEL_NOT_FOUND; here it is undefined. */
  private async get(key: string): Promise<Buffer | undefined> {
    try {
      return await this.db.get(key);
    } catch (error) {
      if ((error as { code?: string }).code === 'LEVEL_NOT_FOUND') return undefined;
      throw error;
    }
  }

  private topic(topic: string): Topic {
    const found = this.topics.get(topic);
    if (!found) throw new UnknownTopicError(topic);
    return found;
  }

  private partition(topic: string, partition: number): PartitionState {
    const state = this.topic(topic).partitions[partition];
    if (!state) throw new LogError(`topic "${topic}" has no partition ${partition}`);
    return state;
  }

  private checkOpen(): void {
    if (this.closed) throw new LogClosedError();
  }

  private failed(): LogError {
    return new LogError('the embedded log failed to write and refuses further appends', {
      cause: this.failure,
    });
  }
}

const storedToRecord = (topic: string, partition: number, key: string, value: Buffer) => ({
  topic,
  partition,
  offset: keys.offsetOfRecordKey(key),
  ...decodeRecord(value),
});

/** Encodes a record for `append`, with its timestamp and headers normalised. */
export function storedRecord(record: {
  key: Buffer | null;
  value: Buffer | null;
  headers?: Record<string, Buffer | string>;
  timestamp?: number;
}): Buffer {
  const headers: Record<string, Buffer> = {};
  for (const [name, value] of Object.entries(record.headers ?? {})) {
    headers[name] = typeof value === 'string' ? Buffer.from(value, 'utf8') : value;
  }
  return encodeRecord({
    timestamp: record.timestamp ?? Date.now(),
    key: record.key,
    value: record.value,
    headers,
  });
}
