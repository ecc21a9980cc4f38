/**
 * Runs tasks one at a time per key, in the order they were started: a read-check-write on one
 * key is then atomic within the process. One process owns an embedded database (RocksDB's LOCK
 * file refuses a second), so that is atomic, full stop.
 */
export class KeyedLock {
  /** The last task started on each key with tasks in flight, settled either way. */
  private readonly tails = new Map<string, Promise<void>>();

  run<T>(key: string, task: () => Promise<T>): Promise<T> {
    const previous = this.tails.get(key) ?? Promise.resolve();
    const result = previous.then(task);
    const tail = result.then(
      () => undefined,
      () => undefined,
    );
    this.tails.set(key, tail);
    void tail.then(() => {
      if (this.tails.get(key) === tail) this.tails.delete(key);
    });
    return result;
  }

  /** Keys with a task in flight (for tests: the map must not grow without bound). */
  get size(): number {
    return this.tails.size;
  }
}
