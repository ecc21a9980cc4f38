/**
 * A task's view of one store: reads see the task's own uncommitted writes, which are held in
 * memory until the task commits. Only then do they reach RocksDB, and the changelog records of
 * the same commit carry them (one record per key: the latest value). So the local database
 * never holds state the changelog does not, and a crash between commits loses only writes whose
 * input will be processed again.
 *
 * Each record is processed under a savepoint: if its processing fails, its writes are undone.
 *
 * A bounded cache of committed values (least recently used out first) sits in front of RocksDB,
 * as Kafka Streams' record cache does: a read from RocksDB is a round trip through the native
 * thread pool, which dominated the cost of a record before the cache. It is the process's
 * (StoreCache, the StateDb's), shared by every task store.
 */
import { assertLimit, keyAfter, type KeyValueStore, type ScanSlice, type Serde } from './store.ts';
import type { StateDb, StateWrite } from './state-db.ts';
import type { StoreCache } from './store-cache.ts';

const DELETED = Symbol('deleted');
type Pending<V> = V | typeof DELETED;
/** Cached: the key has no value in RocksDB. */
const ABSENT = Symbol('absent');
/** What a cached entry costs beside its key and value: the map's slot and the object. */
const CACHE_ENTRY_OVERHEAD = 64;
/** Numbers the store instances of the process: each caches under its own prefix. */
let instances = 0;

export interface TaskStoreOptions {
  /** The cache to use; the StateDb's (the process's) by default. */
  cache?: StoreCache;
  /**
   * Told of a stored value that a scan could not deserialize (a changelog record that another
   * writer corrupted). A scan leaves it out and goes on, so that a walk over every key (a
   * punctuator's) is not stopped for good by one; a get or range of that key still throws, so
   * that the record being processed for it is dead-lettered rather than read as absent.
   */
  onUndecodable?: (key: string, error: unknown) => void;
}

export class TaskStore<V> implements KeyValueStore<V> {
  private pending = new Map<string, Pending<V>>();
  /** Previous pending values of the keys written since the savepoint (undefined: absent). */
  private undo: Array<[string, Pending<V> | undefined]> | undefined;
  /** Committed values only, so that a discarded commit never leaves a trace there. */
  private readonly cache: StoreCache;
  /** This instance's keys in the cache: `<instance>:`. */
  private readonly prefix = `${++instances}:`;
  private readonly onUndecodable?: (key: string, error: unknown) => void;

  constructor(
    readonly name: string,
    readonly partition: number,
    private readonly db: StateDb,
    readonly serde: Serde<V>,
    options: TaskStoreOptions = {},
  ) {
    this.cache = options.cache ?? db.cache;
    this.onUndecodable = options.onUndecodable;
  }

  async get(key: string): Promise<V | undefined> {
    const value = this.pending.get(key);
    if (value === DELETED) return undefined;
    if (value !== undefined) return value;
    const cacheKey = this.prefix + key;
    const cached = this.cache.get(cacheKey); // now the most recently used
    if (cached !== undefined) return cached.value === ABSENT ? undefined : (cached.value as V);
    const stored = await this.db.get(this.name, this.partition, key);
    const decoded = stored === undefined ? undefined : this.serde.deserialize(stored);
    // A write that reached the cache while RocksDB answered is newer than what it answered.
    if (!this.cache.has(cacheKey)) this.cache.set(cacheKey, decoded ?? ABSENT, cost(key, stored));
    return decoded;
  }

  put(key: string, value: V): void {
    this.keepForUndo(key);
    this.pending.set(key, value);
  }

  delete(key: string): void {
    this.keepForUndo(key);
    this.pending.set(key, DELETED);
  }

  async range(from: string, to: string): Promise<Array<[string, V]>> {
    return this.merge(
      await this.db.range(this.name, this.partition, from, to),
      (k) => k >= from && k < to,
    );
  }

  async all(): Promise<Array<[string, V]>> {
    return this.merge(await this.db.range(this.name, this.partition, ''), () => true);
  }

  async scan(from: string, limit: number): Promise<ScanSlice<V>> {
    assertLimit(limit);
    const stored = await this.db.range(this.name, this.partition, from, undefined, limit);
    // RocksDB may hold more past the slice's last key: uncommitted writes past it wait for the
    // next slice, which starts right after it.
    const last = stored.length === limit ? stored[stored.length - 1]![0] : undefined;
    return {
      entries: this.merge(
        stored,
        (k) => k >= from && (last === undefined || k <= last),
        this.onUndecodable ?? (() => undefined),
      ),
      next: last === undefined ? undefined : keyAfter(last),
    };
  }

  /** Committed values with the uncommitted writes over them; `skip` takes what does not decode. */
  private merge(
    stored: Array<[string, Buffer]>,
    inRange: (key: string) => boolean,
    skip?: (key: string, error: unknown) => void,
  ): Array<[string, V]> {
    const result = new Map<string, V>();
    for (const [key, value] of stored) {
      if (this.pending.has(key)) continue;
      try {
        result.set(key, this.serde.deserialize(value));
      } catch (error) {
        if (!skip) throw error;
        skip(key, error);
      }
    }
    for (const [key, value] of this.pending)
      if (value !== DELETED && inRange(key)) result.set(key, value);
    return [...result].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  }

  // ---- savepoints (one per record) ----

  savepoint(): void {
    this.undo = [];
  }

  rollback(): void {
    for (const [key, previous] of (this.undo ?? []).reverse()) {
      if (previous === undefined) this.pending.delete(key);
      else this.pending.set(key, previous);
    }
    this.undo = undefined;
  }

  private keepForUndo(key: string): void {
    this.undo?.push([key, this.pending.get(key)]);
  }

  // ---- commit ----

  get dirty(): boolean {
    return this.pending.size > 0;
  }

  /** The uncommitted writes, serialized: for the changelog and then for RocksDB. */
  writes(): StateWrite[] {
    return [...this.pending].map(([key, value]) => ({
      key,
      value: value === DELETED ? null : this.serde.serialize(value),
    }));
  }

  /** After the commit succeeded: the writes go to RocksDB. */
  async flush(writes: StateWrite[]): Promise<void> {
    await this.db.write(this.name, this.partition, writes);
    const bytes = new Map(writes.map((w) => [w.key, cost(w.key, w.value ?? undefined)]));
    for (const [key, value] of this.pending)
      this.cache.set(
        this.prefix + key,
        value === DELETED ? ABSENT : value,
        bytes.get(key) ?? cost(key, undefined),
      );
    this.pending = new Map();
    this.undo = undefined;
  }

  /** After a failed or fenced commit: the writes are forgotten; their input is processed again. */
  discard(): void {
    this.pending = new Map();
    this.undo = undefined;
  }
}

function cost(key: string, serialized: Buffer | undefined): number {
  return key.length + (serialized?.length ?? 0) + CACHE_ENTRY_OVERHEAD;
}
