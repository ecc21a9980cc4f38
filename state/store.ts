/**
 * Key-value state stores, in Kafka Streams' words: a `KeyValueStore` has get, put, delete,
 * range and all. Keys are strings (user ids, group ids, composite keys); values go through a
 * Serde on their way to RocksDB and the changelog.
 */

export interface Serde<V> {
  serialize(value: V): Buffer;
  deserialize(data: Buffer): V;
}

export const jsonSerde = <V>(): Serde<V> => ({
  serialize: (value) => Buffer.from(JSON.stringify(value)),
  deserialize: (data) => JSON.parse(data.toString('utf8')) as V,
});

export interface KeyValueStore<V> {
  readonly name: string;
  get(key: string): Promise<V | undefined>;
  put(key: string, value: V): void;
  delete(key: string): void;
  /** Entries with from <= key < to, in key order. */
  range(from: string, to: string): Promise<Array<[string, V]>>;
  all(): Promise<Array<[string, V]>>;
  /**
   * A slice of a long scan: up to `limit` (1 or more) entries with key >= from, in key order, and where the
   * next slice starts (undefined: this one reached the end). A punctuator that walks a large
   * store a slice per tick holds its task up for a bounded time.
   */
  scan(from: string, limit: number): Promise<ScanSlice<V>>;
}

export interface ScanSlice<V> {
  entries: Array<[string, V]>;
  next: string | undefined;
}

/** A scan's limit is a whole number of entries, 1 or more. */
export function assertLimit(limit: number): void {
  if (!Number.isInteger(limit) || limit < 1)
    throw new RangeError(`a scan takes a limit of 1 or more entries, not ${limit}`);
}

/** The smallest key after `key`, in the byte order of RocksDB and the string order of JS alike. */
export const keyAfter = (key: string) => `${key}\0`;

/** A store in memory, for unit tests of processors. */
export class InMemoryKeyValueStore<V> implements KeyValueStore<V> {
  private readonly entries = new Map<string, V>();

  constructor(readonly name: string) {}

  async get(key: string): Promise<V | undefined> {
    return this.entries.get(key);
  }

  put(key: string, value: V): void {
    this.entries.set(key, value);
  }

  delete(key: string): void {
    this.entries.delete(key);
  }

  async range(from: string, to: string): Promise<Array<[string, V]>> {
    return [...this.entries]
      .filter(([k]) => k >= from && k < to)
      .sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  }

  async all(): Promise<Array<[string, V]>> {
    return [...this.entries].sort(([a], [b]) => (a < b ? -1 : a > b ? 1 : 0));
  }

  async scan(from: string, limit: number): Promise<ScanSlice<V>> {
    assertLimit(limit);
    const after = (await this.all()).filter(([k]) => k >= from);
    const entries = after.slice(0, limit);
    return {
      entries,
      next: after.length > limit ? keyAfter(entries[entries.length - 1]![0]) : undefined,
    };
  }
}
