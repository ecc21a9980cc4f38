/**
 * The RocksDB database that holds every store of every task in one process: twelve partitions
 * and four stores are one database, not forty-eight. Keys are prefixed by store and partition,
 * so that each task's share can still be restored, checkpointed and dropped on its own:
 *
 *   s/<store>/<partition>/<key>   a value
 *   c/<store>/<partition>         the changelog offset the local state has caught up to
 */
import { RocksLevel } from '@nxtedition/rocksdb';
import { StoreCache } from './store-cache.ts';

const pad = (n: number) => n.toString().padStart(5, '0');
const prefix = (store: string, partition: number) => `s/${store}/${pad(partition)}/`;
/** The first string after every key with this prefix ('/' + 1 is '0'). */
const prefixEnd = (store: string, partition: number) => `s/${store}/${pad(partition)}0`;
const checkpointKey = (store: string, partition: number) => `c/${store}/${pad(partition)}`;
/** "<offset> <written at, ms since the epoch>"; checkpoints before the time was kept: "<offset>". */
const checkpointValue = (offset: number) => Buffer.from(`${offset} ${Date.now()}`);

export interface Checkpoint {
  offset: number;
  writtenAt: number | undefined;
}

export type StateWrite = { key: string; value: Buffer | null };

/**
 * The binding's synchronous reads. A task reads its state record by record, one read awaited
 * before the next: through the thread pool each read costs a round trip (~56 µs idle, far more
 * under load), inline a few µs from the memtable or block cache. Kafka Streams reads RocksDB
 * inline in its stream thread for the same reason. Writes stay batched and asynchronous.
 */
interface SyncReads {
  _getManySync(keys: string[], options: object): Array<Buffer | undefined>;
  querySync(options: {
    gte: Buffer;
    lt: Buffer;
    /** -1: no limit. */
    limit: number;
    keyEncoding: 'utf8';
    valueEncoding: 'buffer';
  }): {
    rows: Array<string | Buffer>;
    finished: boolean;
  };
}

export class StateDb {
  private readonly db: RocksLevel<string, Buffer>;
  /** The cache of committed values every task store of the process reads through. */
  readonly cache = new StoreCache();

  private constructor(readonly directory: string) {
    this.db = new RocksLevel<string, Buffer>(directory, {
      keyEncoding: 'utf8',
      valueEncoding: 'buffer',
    });
  }

  static async open(directory: string): Promise<StateDb> {
    const stateDb = new StateDb(directory);
    await stateDb.db.open({ createIfMissing: true });
    return stateDb;
  }

  async get(store: string, partition: number, key: string): Promise<Buffer | undefined> {
    this.assertOpen();
    return this.reads._getManySync([prefix(store, partition) + key], {})[0] ?? undefined;
  }

  /**
   * Entries of one store partition with from <= key < to (to undefined: to the end), the first
   * `limit` of them when a limit is given.
   */
  async range(
    store: string,
    partition: number,
    from: string,
    to?: string,
    limit?: number,
  ): Promise<Array<[string, Buffer]>> {
    this.assertOpen();
    const base = prefix(store, partition);
    const { rows } = this.reads.querySync({
      gte: Buffer.from(base + from),
      lt: Buffer.from(to === undefined ? prefixEnd(store, partition) : base + to),
      limit: limit ?? -1,
      keyEncoding: 'utf8',
      valueEncoding: 'buffer',
    });
    const entries: Array<[string, Buffer]> = [];
    for (let i = 0; i < rows.length; i += 2)
      entries.push([(rows[i] as string).slice(base.length), rows[i + 1] as Buffer]);
    return entries;
  }

  private get reads(): SyncReads {
    return this.db as unknown as SyncReads;
  }

  private assertOpen(): void {
    if (this.db.status !== 'open') throw new Error(`the state database is ${this.db.status}`);
  }

  /** Applies writes (a null value deletes), and optionally a new checkpoint, atomically. */
  async write(
    store: string,
    partition: number,
    writes: StateWrite[],
    checkpoint?: number,
  ): Promise<void> {
    const batch = this.db.batch();
    const base = prefix(store, partition);
    for (const { key, value } of writes) {
      if (value === null) batch.del(base + key);
      else batch.put(base + key, value);
    }
    if (checkpoint !== undefined)
      batch.put(checkpointKey(store, partition), checkpointValue(checkpoint));
    await batch.write();
  }

  /**
   * The changelog offset a store partition's local state is complete up to, and when that was
   * written (undefined for a checkpoint written before the time was kept).
   */
  async checkpoint(store: string, partition: number): Promise<Checkpoint | undefined> {
    let text: string;
    try {
      text = (await this.db.get(checkpointKey(store, partition))).toString('utf8');
    } catch (error) {
      if ((error as { code?: string }).code === 'LEVEL_NOT_FOUND') return undefined;
      throw error;
    }
    const [offset, writtenAt] = text.split(' ');
    return { offset: Number(offset), writtenAt: writtenAt ? Number(writtenAt) : undefined };
  }

  async setCheckpoint(store: string, partition: number, offset: number): Promise<void> {
    await this.db.put(checkpointKey(store, partition), checkpointValue(offset));
  }

  /** Forgets a store partition's state and checkpoint (before a restore from scratch). */
  async drop(store: string, partition: number): Promise<void> {
    await this.db.clear({ gte: prefix(store, partition), lt: prefixEnd(store, partition) });
    await this.db.del(checkpointKey(store, partition));
  }

  async close(): Promise<void> {
    await this.db.close();
  }
}
