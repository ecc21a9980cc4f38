/**
 * A task's view of one store: reads see the task's own uncommitted writes, which are held in
 * memory until the task commits. Only then do they reach RocksDB, and the changelog records of
 * the same commit carry them (one record per key: the latest value). So the local database
 * never holds state the changelog does not, and a crash between commits loses only writes whose
 * input will be processed again.
 *
 * Each record is processed under a savepoint: if its processing fails, its writes are undone.
 */
import type { KeyValueStore, Serde } from './store.ts';
import type { StateDb, StateWrite } from './state-db.ts';

const DELETED = Symbol('deleted');
type Pending<V> = V | typeof DELETED;

export class TaskStore<V> implements KeyValueStore<V> {
  private pending = new Map<string, Pending<V>>();
  /** Previous pending values of the keys written since the savepoint (undefined: absent). */
  private undo: Array<[string, Pending<V> | undefined]> | undefined;

  constructor(
    readonly name: string,
    readonly partition: number,
    private readonly db: StateDb,
    readonly serde: Serde<V>,
  ) {}

  async get(key: string): Promise<V | undefined> {
    const value = this.pending.get(key);
    if (value === DELETED) return undefined;
    if (value !== undefined) return value;
    const stored = await this.db.get(this.name, this.partition, key);
    return stored === undefined ? undefined : this.serde.deserialize(stored);
  }

  put(key: string, value: V): void {
    this.remember(key);
    this.pending.set(key, value);
  }

  delete(key: string): void {
    this.remember(key);
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

  private merge(
    stored: Array<[string, Buffer]>,
    inRange: (key: string) => boolean,
  ): Array<[string, V]> {
    const result = new Map<string, V>();
    for (const [key, value] of stored)
      if (!this.pending.has(key)) result.set(key, this.serde.deserialize(value));
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

  private remember(key: string): void {
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
    this.pending = new Map();
    this.undo = undefined;
  }

  /** After a failed or fenced commit: the writes are forgotten; their input is processed again. */
  discard(): void {
    this.pending = new Map();
    this.undo = undefined;
  }
}
