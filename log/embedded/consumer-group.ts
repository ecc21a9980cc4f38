/**
 * Consumer groups of the embedded log: a coordinator per group id, and the consumer that joins
 * it. Like Kafka's eager rebalance protocol, a rebalance first stops every member between two
 * batches (no member processes while partitions move), then hands out the new co-partitioned
 * assignment; each member starts its partitions at the group's committed offsets.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import type {
  Batch,
  Consumer,
  ConsumerHandlers,
  ConsumerOptions,
  LogRecord,
  TopicPartition,
  TopicPartitionOffset,
} from '../port.ts';
import { assignCoPartitioned } from '../assignment.ts';
import { IllegalStateError, UnknownTopicError } from '../errors.ts';
import type { PartitionStore } from './partition-store.ts';
import type { Logger } from '../../observability/logger.ts';

const DEFAULT_MAX_BATCH = 500;
const RETRY_BACKOFF_MS = { initial: 100, max: 5000 };

/**
 * A promise that can be resolved from outside: the consumer's loop sleeps on one. A wake while
 * the loop is not asleep (an append during its round, after it found that partition idle) is
 * kept for its next wait, which then returns at once: else the loop would sleep past records
 * already there, until some later append.
 */
class Wakeup {
  private resolve: (() => void) | undefined;
  private promise: Promise<void> | undefined;
  private woken = false;
  wait(): Promise<void> {
    if (this.woken) {
      this.woken = false;
      return Promise.resolve();
    }
    this.promise ??= new Promise<void>((resolve) => (this.resolve = resolve));
    return this.promise;
  }
  wake(): void {
    if (!this.resolve) {
      this.woken = true;
      return;
    }
    this.resolve();
    this.resolve = undefined;
    this.promise = undefined;
  }
}

export class GroupCoordinator {
  private readonly members = new Map<string, EmbeddedConsumer>();
  /** Each member's task numbers from the last rebalance: kept where balance allows (sticky). */
  private readonly owned = new Map<string, number[]>();
  private nextMemberId = 0;
  private rebalancing: Promise<void> = Promise.resolve();

  constructor(
    readonly groupId: string,
    private readonly store: PartitionStore,
  ) {}

  join(member: EmbeddedConsumer): string {
    // Zero-padded, so that ids sort in join order.
    const id = `member-${String(++this.nextMemberId).padStart(9, '0')}`;
    this.members.set(id, member);
    return id;
  }

  leave(memberId: string): void {
    this.members.delete(memberId);
    this.owned.delete(memberId);
  }

  /** Rebalances the group; rebalances run one after another, a failed one stopping no later one. */
  rebalance(): Promise<void> {
    this.rebalancing = this.rebalancing.catch(() => undefined).then(() => this.doRebalance());
    return this.rebalancing;
  }

  private async doRebalance(): Promise<void> {
    const members = [...this.members.entries()];
    // Every member stops between batches before any partition moves.
    await Promise.all(members.map(([, m]) => m.suspend()));
    const topics = new Map<string, number>();
    for (const [, m] of members) {
      for (const topic of m.topics) {
        // A topic deleted since it was subscribed to has no partitions to assign, as on Kafka;
        // the members must still be resumed, with the rest.
        if (this.store.meta(topic)) topics.set(topic, this.store.partitionCount(topic));
      }
    }
    // Member ids sort in join order (zero-padded): with nothing owned yet, older members get
    // the low partition numbers.
    const ids = members.map(([id]) => id);
    const assignment = assignCoPartitioned(
      ids,
      [...topics].map(([topic, partitions]) => ({ topic, partitions })),
      this.owned,
    );
    for (const [id, m] of members) {
      const all = assignment.get(id) ?? [];
      this.owned.set(id, [...new Set(all.map((tp) => tp.partition))]);
      m.resume(all.filter((tp) => m.topics.includes(tp.topic)));
    }
  }
}

/**
 * How many partitions' reads run ahead of the batch being handled. Two gave the chat bench no
 * more than one (2,986 and 2,944 msg/s with one, 3,007 to 2,821 with two), and kept `sent`
 * waiting longer behind the reads in libuv's threads.
 */
const READ_AHEAD = 1;

/** A batch read for a partition, with the end and the seek count it was read at. */
interface Fetched {
  records: LogRecord[];
  end: number;
  seeks: number;
}

export class EmbeddedConsumer implements Consumer {
  topics: string[] = [];
  private memberId: string | undefined;
  private handlers: ConsumerHandlers | undefined;
  private assigned: TopicPartition[] = [];
  /** Next offset to hand to eachBatch, per "topic/partition". */
  private readonly positions = new Map<string, number>();
  /** Bumped by seek, so that a batch in flight does not move a position that was just set. */
  private readonly seeks = new Map<string, number>();
  private pendingAssignment: TopicPartition[] | undefined;
  private suspended = false;
  private parked: (() => void) | undefined;
  private running = false;
  private stopped = false;
  private loop: Promise<void> | undefined;
  private readonly wakeup = new Wakeup();
  private unsubscribeAppends: (() => void) | undefined;
  private readonly maxBatch: number;

  constructor(
    private readonly store: PartitionStore,
    private readonly coordinator: GroupCoordinator,
    private readonly options: ConsumerOptions,
    private readonly logger: Logger,
    /** Called once it has closed: the log forgets it. */
    private readonly onClosed: () => void = () => undefined,
  ) {
    this.maxBatch = options.maxBatchSize ?? DEFAULT_MAX_BATCH;
  }

  async subscribe(topics: string[]): Promise<void> {
    if (this.running) throw new IllegalStateError('subscribe before run');
    for (const topic of topics) this.store.partitionCount(topic); // throws UnknownTopicError
    this.topics = [...new Set([...this.topics, ...topics])];
  }

  async run(handlers: ConsumerHandlers): Promise<void> {
    if (this.running) throw new IllegalStateError('the consumer is already running');
    if (this.topics.length === 0) throw new IllegalStateError('subscribe to at least one topic');
    this.running = true;
    this.handlers = handlers;
    this.unsubscribeAppends = this.store.onAppend((topic) => {
      if (this.topics.includes(topic)) this.wakeup.wake();
    });
    this.memberId = this.coordinator.join(this);
    this.loop = this.consume();
    await this.coordinator.rebalance();
  }

  seek(to: TopicPartitionOffset): void {
    const id = `${to.topic}/${to.partition}`;
    this.positions.set(id, to.offset);
    this.seeks.set(id, (this.seeks.get(id) ?? 0) + 1);
    this.wakeup.wake();
  }

  async commit(offsets: TopicPartitionOffset[]): Promise<void> {
    await this.store.commitOffsets(this.options.groupId, offsets);
  }

  assignment(): TopicPartition[] {
    return [...this.assigned];
  }

  /** The group lives in this process: a member is in it until it closes. */
  outOfGroupBecause(): string | undefined {
    return undefined;
  }

  async close(): Promise<void> {
    if (this.stopped) return;
    this.stopped = true;
    this.unsubscribeAppends?.();
    this.wakeup.wake();
    this.parked?.();
    await this.loop;
    if (this.memberId !== undefined) {
      this.coordinator.leave(this.memberId);
      if (!this.store.isClosed) await this.coordinator.rebalance();
    }
    this.onClosed();
  }

  // ---- called by the coordinator ----

  /** Resolves once the loop is parked between batches. */
  suspend(): Promise<void> {
    this.suspended = true;
    if (this.stopped || !this.loop) return Promise.resolve();
    return new Promise<void>((resolve) => {
      this.parked = resolve;
      this.wakeup.wake();
    });
  }

  resume(partitions: TopicPartition[]): void {
    this.pendingAssignment = partitions;
    this.suspended = false;
    this.wakeup.wake();
  }

  // ---- the loop ----

  private async consume(): Promise<void> {
    let cursor = 0;
    let backoff = RETRY_BACKOFF_MS.initial;
    while (!this.stopped) {
      if (this.suspended) {
        this.parked?.();
        this.parked = undefined;
        await this.wakeup.wait();
        continue;
      }
      if (this.pendingAssignment) {
        const ok = await this.applyAssignment();
        if (!ok) continue;
      }
      let handed = false;
      const round = this.assigned;
      // The next partition's read runs while this one's batch is handled: a read is a round
      // trip through libuv's threads, and awaited in turn they left the loop waiting half its
      // time. READ_AHEAD ahead, not the round's every read at once, which fills those threads.
      const ahead = new Map<number, Promise<Fetched | 'idle'>>();
      const fetchAt = (i: number) => {
        let fetched = ahead.get(i);
        if (!fetched) {
          fetched = this.fetch(round[(cursor + i) % round.length]!);
          // Awaited when its turn comes, or never if the round ends first (its records are
          // then read again): not an unhandled rejection meanwhile.
          fetched.catch(() => undefined);
          ahead.set(i, fetched);
        }
        return fetched;
      };
      // Start at a different partition each round, so that one busy partition cannot starve others.
      for (let i = 0; i < round.length && !this.suspended && !this.stopped; i++) {
        const tp = round[(cursor + i) % round.length]!;
        const fetched = fetchAt(i);
        ahead.delete(i);
        for (let j = i + 1; j <= i + READ_AHEAD && j < round.length; j++) void fetchAt(j);
        const result = await this.handOver(tp, await fetched);
        if (result === 'failed') {
          await sleep(backoff);
          backoff = Math.min(backoff * 2, RETRY_BACKOFF_MS.max);
          handed = true;
          break;
        }
        if (result === 'handed') {
          handed = true;
          backoff = RETRY_BACKOFF_MS.initial;
        }
        if (result === 'sought') handed = true; // read again from there, at once
      }
      cursor++;
      if (!handed && !this.suspended && !this.stopped) await this.wakeup.wait();
    }
    this.parked?.();
  }

  private async applyAssignment(): Promise<boolean> {
    const assigned = this.pendingAssignment!;
    this.pendingAssignment = undefined;
    // Starting from the end, a partition kept through the rebalance goes on from where it was.
    const kept = this.options.startFrom === 'latest' ? new Map(this.positions) : new Map();
    this.positions.clear();
    const partitions: TopicPartition[] = [];
    for (const tp of assigned) {
      // Not those of a topic deleted since the rebalance: there is nothing to read in them.
      if (!this.store.meta(tp.topic)) continue;
      const committed = await this.store.committedOffset(
        this.options.groupId,
        tp.topic,
        tp.partition,
      );
      const start =
        committed >= 0
          ? committed
          : this.options.startFrom === 'latest'
            ? (kept.get(`${tp.topic}/${tp.partition}`) ?? this.store.end(tp.topic, tp.partition))
            : await this.store.lowWatermark(tp.topic, tp.partition).catch((error: unknown) => {
                if (error instanceof UnknownTopicError) return undefined; // deleted meanwhile
                throw error;
              });
      if (start === undefined) continue;
      this.positions.set(`${tp.topic}/${tp.partition}`, start);
      partitions.push(tp);
    }
    this.assigned = partitions;
    try {
      await this.handlers!.onAssignment?.(this.assignment());
      return true;
    } catch (error) {
      // Retried, as eachBatch would be.
      this.logger.error(
        { err: error, groupId: this.options.groupId },
        'onAssignment failed; retrying',
      );
      this.pendingAssignment = partitions;
      await sleep(RETRY_BACKOFF_MS.initial);
      return false;
    }
  }

  /** Reads a partition's next batch from where the consumer stands ('idle': nothing there). */
  private fetch(tp: TopicPartition): Promise<Fetched | 'idle'> {
    const id = `${tp.topic}/${tp.partition}`;
    // Deleted since it was assigned: nothing to read, until a rebalance leaves it out.
    if (!this.store.meta(tp.topic)) return Promise.resolve('idle');
    const position = this.positions.get(id)!;
    const end = this.store.end(tp.topic, tp.partition);
    if (position >= end) return Promise.resolve('idle');
    const seeks = this.seeks.get(id) ?? 0;
    return this.store
      .read(tp.topic, tp.partition, position, this.maxBatch)
      .then((records) => ({ records, end, seeks }));
  }

  /**
   * Hands a batch read by fetch to eachBatch: 'sought' when a seek came since the read started
   * (what it read is dropped: it is from the old position, and handing it would move the
   * position past the seek's), 'failed' when eachBatch threw.
   */
  private async handOver(
    tp: TopicPartition,
    fetched: Fetched | 'idle',
  ): Promise<'idle' | 'handed' | 'failed' | 'sought'> {
    if (fetched === 'idle') return 'idle';
    const id = `${tp.topic}/${tp.partition}`;
    const { records, end, seeks: seeksBefore } = fetched;
    if ((this.seeks.get(id) ?? 0) !== seeksBefore) return 'sought';
    if (records.length === 0) {
      // Everything up to the end was compacted away or expired.
      this.positions.set(id, end);
      return 'idle';
    }
    const batch: Batch = { topic: tp.topic, partition: tp.partition, records, highWatermark: end };
    try {
      await this.handlers!.eachBatch(batch);
    } catch (error) {
      this.logger.error(
        {
          err: error,
          groupId: this.options.groupId,
          topic: tp.topic,
          partition: tp.partition,
          offset: records[0]!.offset,
        },
        'eachBatch failed; the batch will be handed again',
      );
      return 'failed';
    }
    if ((this.seeks.get(id) ?? 0) === seeksBefore) {
      this.positions.set(id, records[records.length - 1]!.offset + 1);
    }
    return 'handed';
  }
}
