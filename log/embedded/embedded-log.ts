/**
 * The embedded log: the log port on a RocksDB database under DATA_DIR, inside the process.
 * Same semantics as the Kafka adapter (topics, partitions, offsets, consumer groups with
 * co-partitioned assignment, compaction, atomic transactions with read-committed reads),
 * proven by the same conformance suite.
 */
import { setImmediate as yieldToEventLoop } from 'node:timers/promises';
import { join } from 'node:path';
import type {
  Batch,
  PartitionStart,
  Consumer,
  ConsumerOptions,
  Log,
  LogAdmin,
  PartitionWatermarks,
  Producer,
  ProducerOptions,
  ProducerRecord,
  RecordMetadata,
  TopicDescription,
  TopicPartitionOffset,
  TopicSpec,
  Transaction,
} from '../port.ts';
import {
  IllegalStateError,
  InvalidRecordError,
  LogClosedError,
  ProducerFencedError,
} from '../errors.ts';
import { partitionFor } from '../partitioner.ts';
import { silentLogger, type Logger } from '../../observability/logger.ts';
import {
  PartitionStore,
  storedRecord,
  type AppendRecord,
  type AppendUnit,
} from './partition-store.ts';
import { EmbeddedConsumer, GroupCoordinator } from './consumer-group.ts';
import { cleanAll, MIN_CLEANABLE_DIRTY_RATIO, type CleanResult } from './cleaner.ts';

/** Records encoded per slice before the event loop gets a turn. */
const ENCODE_SLICE = 1000;
const TOPIC_NAME = /^[a-zA-Z0-9._-]{1,249}$/;

export interface EmbeddedLogOptions {
  /** The log lives in `<dataDir>/log`. */
  dataDir: string;
  /** fsync each write batch (SYNC_WRITES): survives power loss, at a cost. */
  syncWrites?: boolean;
  /** How often the cleaner compacts and applies retention; 0 turns it off. Default 60 s. */
  cleanerIntervalMs?: number;
  logger?: Logger;
}

export class EmbeddedLog implements Log {
  readonly admin: LogAdmin;
  private readonly groups = new Map<string, GroupCoordinator>();
  private readonly consumers = new Set<EmbeddedConsumer>();
  /** The current epoch of each transactional id: a producer with an older one is fenced. */
  private readonly epochs = new Map<string, number>();
  /** The commit of each transactional id on its way to the disk, if one is. */
  private readonly committing = new Map<string, Promise<void>>();
  private cleaner: NodeJS.Timeout | undefined;
  private cleaning: Promise<CleanResult[]> | undefined;
  private roundRobin = 0;
  private closed = false;

  private constructor(
    readonly store: PartitionStore,
    private readonly logger: Logger,
  ) {
    this.admin = new EmbeddedAdmin(store);
  }

  static async open(options: EmbeddedLogOptions): Promise<EmbeddedLog> {
    const logger = options.logger ?? silentLogger;
    const store = await PartitionStore.open(join(options.dataDir, 'log'), {
      syncWrites: options.syncWrites,
    });
    const log = new EmbeddedLog(store, logger);
    const interval = options.cleanerIntervalMs ?? 60_000;
    if (interval > 0) {
      log.cleaner = setInterval(
        () =>
          void log
            .clean(Date.now(), MIN_CLEANABLE_DIRTY_RATIO)
            .catch((err) => logger.error({ err }, 'cleaner failed')),
        interval,
      );
      log.cleaner.unref();
    }
    return log;
  }

  async producer(options: ProducerOptions = {}): Promise<Producer> {
    this.checkOpen();
    let epoch = 0;
    if (options.transactionalId !== undefined) {
      epoch = (this.epochs.get(options.transactionalId) ?? 0) + 1;
      this.epochs.set(options.transactionalId, epoch);
      // As Kafka's InitProducerId completes a pending transaction: a commit the old producer
      // began before the fence is durable (or failed) before the new one reads anything.
      await this.committing.get(options.transactionalId)?.catch(() => undefined);
    }
    return new EmbeddedProducer(this, options.transactionalId, epoch);
  }

  consumer(options: ConsumerOptions): Consumer {
    this.checkOpen();
    let coordinator = this.groups.get(options.groupId);
    if (!coordinator) {
      coordinator = new GroupCoordinator(options.groupId, this.store);
      this.groups.set(options.groupId, coordinator);
    }
    // Forgotten once closed: a process opens and closes consumers all its life (revivals,
    // global tables), and the log lives as long.
    const consumer: EmbeddedConsumer = new EmbeddedConsumer(
      this.store,
      coordinator,
      options,
      this.logger,
      () => this.consumers.delete(consumer),
    );
    this.consumers.add(consumer);
    return consumer;
  }

  async *readPartitions(topic: string, starts: PartitionStart[]): AsyncGenerator<Batch> {
    this.checkOpen();
    const ends = starts.map((s) => this.store.end(topic, s.partition));
    for (let i = 0; i < starts.length; i++) {
      const { partition, from } = starts[i]!;
      for await (const records of this.store.scan(topic, partition, { from, to: ends[i] }))
        yield { topic, partition, records, highWatermark: ends[i]! };
    }
  }

  /**
   * Compacts compacted topics and applies retention now. The periodic cleaner passes
   * MIN_CLEANABLE_DIRTY_RATIO: it compacts only partitions with that share written since their
   * last compaction. A call while one runs gets that one's answer.
   */
  clean(now = Date.now(), minDirtyRatio = 0): Promise<CleanResult[]> {
    this.cleaning ??= cleanAll(this.store, now, minDirtyRatio).finally(
      () => (this.cleaning = undefined),
    );
    return this.cleaning;
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearInterval(this.cleaner);
    await Promise.all([...this.consumers].map((c) => c.close()));
    await this.cleaning;
    await this.store.close();
  }

  // ---- used by the producer ----

  /** Validates and encodes records, yielding to the event loop between slices. */
  async prepare(records: ProducerRecord[]): Promise<AppendRecord[]> {
    const prepared: AppendRecord[] = [];
    for (let i = 0; i < records.length; i++) {
      if (i > 0 && i % ENCODE_SLICE === 0) await yieldToEventLoop();
      const record = records[i]!;
      const partitions = this.store.partitionCount(record.topic);
      let partition = record.partition;
      if (partition === undefined) {
        partition = record.key
          ? partitionFor(record.key, partitions)
          : this.roundRobin++ % partitions;
      } else if (!Number.isInteger(partition) || partition < 0 || partition >= partitions) {
        throw new InvalidRecordError(`topic "${record.topic}" has no partition ${partition}`);
      }
      prepared.push({ topic: record.topic, partition, encoded: storedRecord(record) });
    }
    return prepared;
  }

  /** Appends a transaction's unit, known as committing until it is durable or failed. */
  commitUnit(transactionalId: string, unit: AppendUnit): Promise<void> {
    const appended = this.store.append(unit);
    const tracked = appended.finally(() => {
      if (this.committing.get(transactionalId) === tracked) this.committing.delete(transactionalId);
    });
    this.committing.set(transactionalId, tracked);
    return tracked;
  }

  checkEpoch(transactionalId: string, epoch: number): void {
    if (this.epochs.get(transactionalId) !== epoch) throw new ProducerFencedError(transactionalId);
  }

  checkOpen(): void {
    if (this.closed) throw new LogClosedError();
  }
}

class EmbeddedProducer implements Producer {
  private open: EmbeddedTransaction | undefined;
  /**
   * Settles once the latest send's records were handed to the store. Encoding a large send
   * yields to the event loop (prepare), so a smaller send after it would otherwise be appended
   * first: as on Kafka, one producer's sends land in the order they were made.
   */
  private handedOn: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly log: EmbeddedLog,
    private readonly transactionalId: string | undefined,
    private readonly epoch: number,
  ) {}

  async send(records: ProducerRecord[]): Promise<RecordMetadata[]> {
    this.log.checkOpen();
    if (this.transactionalId !== undefined) {
      throw new IllegalStateError('a transactional producer sends inside a transaction');
    }
    const preparing = this.log.prepare(records); // side by side with the sends before it
    const handing = this.handedOn.then(async () => {
      const prepared = await preparing;
      // Handed on, not durable: later sends join the same write group.
      return { prepared, appended: this.log.store.append({ records: prepared }) };
    });
    this.handedOn = handing.catch(() => undefined);
    const { prepared, appended } = await handing;
    await appended;
    return prepared.map((r) => ({ topic: r.topic, partition: r.partition, offset: r.offset! }));
  }

  async transaction(): Promise<Transaction> {
    this.log.checkOpen();
    const id = this.transactionalId;
    if (id === undefined) throw new IllegalStateError('not a transactional producer');
    if (this.open) throw new IllegalStateError(`transaction of "${id}" already open`);
    this.log.checkEpoch(id, this.epoch);
    this.open = new EmbeddedTransaction(this.log, id, this.epoch, () => (this.open = undefined));
    return this.open;
  }

  async close(): Promise<void> {
    await this.open?.abort();
  }
}

class EmbeddedTransaction implements Transaction {
  private records: AppendRecord[] = [];
  private offsets: { groupId: string; offsets: TopicPartitionOffset[] } | undefined;
  private state: 'open' | 'committing' | 'done' = 'open';
  /** Settles once the latest send's records joined `records`: they join in call order. */
  private added: Promise<unknown> = Promise.resolve();

  constructor(
    private readonly log: EmbeddedLog,
    private readonly transactionalId: string,
    private readonly epoch: number,
    private readonly onEnd: () => void,
  ) {}

  async send(records: ProducerRecord[]): Promise<void> {
    this.checkOpen();
    this.log.checkEpoch(this.transactionalId, this.epoch);
    const preparing = this.log.prepare(records);
    const adding = this.added.then(async () => {
      this.records.push(...(await preparing));
    });
    this.added = adding.catch(() => undefined);
    await adding;
  }

  async sendOffsets(groupId: string, offsets: TopicPartitionOffset[]): Promise<void> {
    this.checkOpen();
    if (this.offsets && this.offsets.groupId !== groupId) {
      throw new IllegalStateError('one consumer group per transaction');
    }
    const merged = new Map(
      (this.offsets?.offsets ?? []).map((o) => [`${o.topic}/${o.partition}`, o]),
    );
    for (const o of offsets) merged.set(`${o.topic}/${o.partition}`, o);
    this.offsets = { groupId, offsets: [...merged.values()] };
  }

  async commit(): Promise<void> {
    this.checkOpen();
    this.state = 'committing';
    try {
      await this.added; // sends not awaited by the caller are part of the transaction, as on Kafka
      // The fence check and the append happen in one turn: no newer producer can slip between.
      this.log.checkEpoch(this.transactionalId, this.epoch);
      await this.log.commitUnit(this.transactionalId, {
        records: this.records,
        offsets: this.offsets,
      });
    } finally {
      this.state = 'done';
      this.onEnd();
    }
  }

  async abort(): Promise<void> {
    if (this.state !== 'open') return;
    this.state = 'done';
    this.records = [];
    this.onEnd();
  }

  private checkOpen(): void {
    if (this.state !== 'open') throw new IllegalStateError('the transaction is over');
  }
}

class EmbeddedAdmin implements LogAdmin {
  constructor(private readonly store: PartitionStore) {}

  async createTopics(topics: TopicSpec[]): Promise<void> {
    for (const spec of topics) {
      if (!TOPIC_NAME.test(spec.topic))
        throw new InvalidRecordError(`illegal topic name "${spec.topic}"`);
      if (!Number.isInteger(spec.partitions) || spec.partitions < 1) {
        throw new InvalidRecordError(
          `topic "${spec.topic}": partitions must be a positive integer`,
        );
      }
      await this.store.createTopic(spec);
    }
  }

  async setRetention(topic: string, retentionMs: number): Promise<void> {
    await this.store.setRetention(topic, retentionMs);
  }

  async deleteTopics(topics: string[]): Promise<void> {
    for (const topic of topics) await this.store.deleteTopic(topic);
  }

  async listTopics(): Promise<string[]> {
    return this.store.topicNames();
  }

  async describeTopic(topic: string): Promise<TopicDescription | undefined> {
    const meta = this.store.meta(topic);
    return (
      meta && {
        topic,
        partitions: meta.partitions,
        cleanupPolicy: meta.cleanupPolicy,
        retentionMs: meta.retentionMs,
      }
    );
  }

  async watermarks(topic: string): Promise<PartitionWatermarks[]> {
    const result: PartitionWatermarks[] = [];
    for (let p = 0; p < this.store.partitionCount(topic); p++) {
      result.push({
        partition: p,
        low: await this.store.lowWatermark(topic, p),
        high: this.store.end(topic, p),
      });
    }
    return result;
  }

  async committedOffsets(groupId: string, topic: string): Promise<TopicPartitionOffset[]> {
    const result: TopicPartitionOffset[] = [];
    for (let p = 0; p < this.store.partitionCount(topic); p++) {
      result.push({
        topic,
        partition: p,
        offset: await this.store.committedOffset(groupId, topic, p),
      });
    }
    return result;
  }

  async offsetsForTime(topic: string, timestamp: number): Promise<TopicPartitionOffset[]> {
    const result: TopicPartitionOffset[] = [];
    for (let p = 0; p < this.store.partitionCount(topic); p++) {
      let found = this.store.end(topic, p);
      search: for await (const records of this.store.scan(topic, p)) {
        for (const r of records) {
          if (r.timestamp >= timestamp) {
            found = r.offset;
            break search;
          }
        }
      }
      result.push({ topic, partition: p, offset: found });
    }
    return result;
  }
}
