/**
 * A global table: a compacted topic read whole by every instance and kept current, such as
 * `chat.gateways` (which gateways are alive) or `chat.accounts` (which users exist). It loads
 * every partition to its end before `start` resolves, then follows new records with a consumer
 * of its own that starts exactly where the load ended. A tombstone removes the key.
 */
import { randomUUID } from 'node:crypto';
import type { Consumer, Log } from '../../log/port.ts';
import { silentLogger, type Logger } from '../../observability/logger.ts';
import { isRetriable } from './errors.ts';

/** Tries of a record whose decoding failed for a retriable reason, while the table loads. */
const LOAD_TRIES = 20;
const LOAD_RETRY_MS = 500;
/** How long `hasCurrent` waits, at most, for the table to apply what the topic holds. */
export const CATCH_UP_WAIT_MS = 3_000;

type Marks = Array<{ partition: number; high: number }>;

export interface GlobalTableOptions<V> {
  /**
   * A value that fails to decode is logged and skipped; one whose error is retriable (the
   * schema registry unreachable) is read again until it decodes.
   */
  decode(value: Buffer): V | Promise<V>;
  logger?: Logger;
  /** Called after each change, e.g. to expire sessions of a silent gateway. */
  onChange?(key: string, value: V | undefined): void;
}

export class GlobalTable<V> {
  private readonly entries = new Map<string, V>();
  private consumer: Consumer | undefined;
  private readonly logger: Logger;
  /**
   * Per partition, the offset after the last record applied (by the load or the consumer): a
   * batch handed again after a retriable failure applies only what it had not, so no key goes
   * back to an older value; and `hasCurrent` knows when the table has reached a watermark.
   */
  private readonly position = new Map<number, number>();
  /** Called after each batch the consumer applied (hasCurrent's waiters). */
  private readonly progressed = new Set<() => void>();
  /** The watermarks question out, and the one asked once it is answered (see watermarks). */
  private asking: Promise<Marks> | undefined;
  private queued: Promise<Marks> | undefined;

  constructor(
    private readonly log: Log,
    readonly topic: string,
    private readonly options: GlobalTableOptions<V>,
  ) {
    this.logger = (options.logger ?? silentLogger).child({ globalTable: topic });
  }

  async start(): Promise<void> {
    const marks = await this.log.admin.watermarks(this.topic);
    const ends = new Map(marks.map((m) => [m.partition, m.high]));
    for await (const batch of this.log.readPartitions(
      this.topic,
      marks.map((m) => ({ partition: m.partition, from: 0 })),
    )) {
      for (const record of batch.records) {
        await this.applyWhileLoading(record.key, record.value);
        this.advance(batch.partition, record.offset + 1);
      }
    }
    for (const [partition, end] of ends) this.advance(partition, end);
    this.logger.info({ entries: this.entries.size }, 'global table loaded');
    const consumer = this.log.consumer({
      groupId: `global-${this.topic}-${randomUUID()}`,
      startFrom: 'latest',
    });
    this.consumer = consumer;
    await consumer.subscribe([this.topic]);
    // Each partition starts where the load ended; after that, the consumer keeps its place
    // through rebalances and restarts (the log port's promise for 'latest').
    const started = new Set<number>();
    await consumer.run({
      onAssignment: (assignment) => {
        for (const tp of assignment) {
          if (started.has(tp.partition)) continue;
          started.add(tp.partition);
          consumer.seek({ ...tp, offset: ends.get(tp.partition) ?? 0 });
        }
      },
      eachBatch: async (batch) => {
        try {
          for (const record of batch.records) {
            if (record.offset < (this.position.get(batch.partition) ?? 0)) continue;
            await this.apply(record.key, record.value);
            this.advance(batch.partition, record.offset + 1);
          }
        } finally {
          for (const waiter of [...this.progressed]) waiter();
        }
      },
    });
  }

  get(key: string): V | undefined {
    return this.entries.get(key);
  }

  has(key: string): boolean {
    return this.entries.has(key);
  }

  /**
   * Whether the key is in the table once the table has applied every record the topic held when
   * asked (waiting at most waitMs): a record whose write was acknowledged before the call is
   * seen, however far the follower lags. A present key answers at once; so does an absent one
   * when the table is already at the topic's end.
   */
  async hasCurrent(key: string, waitMs = CATCH_UP_WAIT_MS): Promise<boolean> {
    if (this.entries.has(key)) return true;
    // One wait for both steps: the question to the log is part of it (a slow admin, Kafka
    // retrying an unreachable leader, must not hold the answer past it), then the catching up.
    let timer: NodeJS.Timeout | undefined;
    const expired = new Promise<undefined>((resolve) => {
      timer = setTimeout(() => resolve(undefined), waitMs);
    });
    let check: (() => void) | undefined;
    try {
      const marks = await Promise.race([this.watermarks(), expired]);
      if (marks === undefined) return this.entries.has(key);
      const behind = () => marks.some((m) => (this.position.get(m.partition) ?? 0) < m.high);
      if (behind()) {
        const caughtUp = new Promise<void>((resolve) => {
          check = () => {
            if (!behind() || this.entries.has(key)) resolve();
          };
        });
        this.progressed.add(check!);
        await Promise.race([caughtUp, expired]);
      }
      return this.entries.has(key);
    } finally {
      clearTimeout(timer);
      if (check) this.progressed.delete(check);
    }
  }

  get size(): number {
    return this.entries.size;
  }

  values(): IterableIterator<[string, V]> {
    return this.entries.entries();
  }

  async close(): Promise<void> {
    await this.consumer?.close();
  }

  /**
   * The topic's watermarks, as asked after this call: a question already out may have been
   * asked before the record a miss is about was written, so the misses that come while one is
   * out share the next one (a burst of sends to unknown users asks the log about once per
   * round trip, not once each). The log unreachable: none, and the table answers as it is
   * rather than with an error.
   */
  private watermarks(): Promise<Marks> {
    if (!this.asking) return this.ask();
    this.queued ??= this.asking.then(() => {
      this.queued = undefined;
      return this.ask();
    });
    return this.queued;
  }

  private ask(): Promise<Marks> {
    const asked = this.log.admin.watermarks(this.topic).catch((): Marks => []);
    this.asking = asked;
    void asked.then(() => {
      if (this.asking === asked) this.asking = undefined;
    });
    return asked;
  }

  private advance(partition: number, offset: number): void {
    if (offset > (this.position.get(partition) ?? 0)) this.position.set(partition, offset);
  }

  private async apply(keyBytes: Buffer | null, value: Buffer | null): Promise<void> {
    if (!keyBytes) return;
    const key = keyBytes.toString('utf8');
    if (value === null) {
      this.entries.delete(key);
      this.options.onChange?.(key, undefined);
      return;
    }
    try {
      const decoded = await this.options.decode(value);
      this.entries.set(key, decoded);
      this.options.onChange?.(key, decoded);
    } catch (error) {
      // Not the record's fault: the consumer hands the batch again (set and delete are
      // idempotent, so the records before it may be applied twice).
      if (isRetriable(error)) throw error;
      this.logger.error({ err: error, key }, 'global table record does not decode; skipped');
    }
  }

  /** apply, tried again on a retriable failure (for about 10 s, then start fails). */
  private async applyWhileLoading(key: Buffer | null, value: Buffer | null): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.apply(key, value);
      } catch (error) {
        if (attempt >= LOAD_TRIES) throw error;
        this.logger.warn({ err: error, attempt }, 'global table record not decoded yet; retrying');
        await new Promise((resolve) => setTimeout(resolve, LOAD_RETRY_MS));
      }
    }
  }
}
