/**
 * The cache of committed store values in front of RocksDB, one per process (the StateDb's),
 * shared by every task store of every runtime in it, least recently used out first: as Kafka
 * Streams' record cache, whose bound (`statestore.cache.max.bytes`) is per instance, not per
 * store. A bound per store partition multiplied by the tasks a process holds: 4 stores of 12
 * tasks could hold 192 MiB of serialized values, two to three times that in the heap.
 *
 * Keys are the store instance's prefix and its key: a store opened again (a task revived,
 * restored from its changelog) gets a new prefix, so it never reads what the one before cached;
 * what that one cached is the least recently used and goes first.
 */

/** Entries the cache holds at most. */
export const DEFAULT_CACHE_ENTRIES = 100_000;
/**
 * Bytes the cache holds at most, counted as serialized keys and values plus an entry's
 * overhead: 64 MiB, about 150 to 200 MiB of heap. Ten thousand inbox entries of 16 KiB bodies
 * would otherwise hold 160 MiB on their own.
 */
export const DEFAULT_CACHE_BYTES = 64 * 1024 * 1024;

export class StoreCache {
  private readonly entries = new Map<string, { value: unknown; bytes: number }>();
  private held = 0;

  constructor(
    readonly maxEntries = DEFAULT_CACHE_ENTRIES,
    readonly maxBytes = DEFAULT_CACHE_BYTES,
  ) {}

  get size(): number {
    return this.entries.size;
  }

  get bytes(): number {
    return this.held;
  }

  /** The cached value, made the most recently used; undefined when not cached. */
  get(key: string): { value: unknown } | undefined {
    const entry = this.entries.get(key);
    if (entry === undefined) return undefined;
    this.entries.delete(key);
    this.entries.set(key, entry);
    return entry;
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  /** Caches a value costing `bytes`, then evicts the least recently used past the bounds. */
  set(key: string, value: unknown, bytes: number): void {
    this.delete(key);
    this.entries.set(key, { value, bytes });
    this.held += bytes;
    while (this.entries.size > this.maxEntries || this.held > this.maxBytes) {
      const oldest = this.entries.keys().next().value;
      if (oldest === undefined) break;
      this.delete(oldest);
    }
  }

  delete(key: string): void {
    const entry = this.entries.get(key);
    if (entry === undefined) return;
    this.entries.delete(key);
    this.held -= entry.bytes;
  }
}
