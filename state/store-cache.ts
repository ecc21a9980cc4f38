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
import { LRUCache } from 'lru-cache';

/** Entries the cache holds at most. */
export const DEFAULT_CACHE_ENTRIES = 100_000;
/**
 * Bytes the cache holds at most, counted as serialized keys and values plus an entry's
 * overhead: 64 MiB, about 150 to 200 MiB of heap. Ten thousand inbox entries of 16 KiB bodies
 * would otherwise hold 160 MiB on their own.
 */
export const DEFAULT_CACHE_BYTES = 64 * 1024 * 1024;

export class StoreCache {
  /**
   * lru-cache: constant time per operation. A Map in insertion order, its oldest found with
   * keys().next(), had to step over the holes its deletions left at its front (V8 compacts a
   * Map's table only as it grows): at 100,000 entries, evicting on every write cost the chat
   * benchmark a third of its rate (a write and an eviction: 0.4 µs at 1,000 entries, 39 µs at
   * 100,000).
   */
  private readonly entries: LRUCache<string, { value: unknown }>;

  constructor(
    readonly maxEntries = DEFAULT_CACHE_ENTRIES,
    readonly maxBytes = DEFAULT_CACHE_BYTES,
  ) {
    this.entries = new LRUCache({ max: maxEntries, maxSize: maxBytes });
  }

  get size(): number {
    return this.entries.size;
  }

  get bytes(): number {
    return this.entries.calculatedSize;
  }

  /** The cached value, made the most recently used; undefined when not cached. */
  get(key: string): { value: unknown } | undefined {
    return this.entries.get(key);
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  /**
   * Caches a value costing `bytes`, evicting the least recently used past the bounds (a value
   * over the byte bound on its own is not cached).
   */
  set(key: string, value: unknown, bytes: number): void {
    this.entries.set(key, { value }, { size: Math.max(1, bytes) });
  }

  delete(key: string): void {
    this.entries.delete(key);
  }
}
