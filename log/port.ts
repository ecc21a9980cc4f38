/**
 * The log port: what the rest of the system needs from a partitioned, replayable log.
 *
 * Two adapters implement it, with one conformance suite (test/conformance/log.suite.ts):
 * - `log/embedded/`: a durable log on RocksDB inside the process (the default shape);
 * - `log/kafka/`: Apache Kafka through kafkajs.
 *
 * Semantics follow Kafka's, so that code written against this port behaves the same on both:
 * offsets are per partition and increase; a committed consumer offset is the offset of the
 * next record to read; keyed records are partitioned by the Java client's murmur2
 * (`partitionFor`); transactions make produced records and consumer offsets visible together
 * or not at all, and consumers read committed records only.
 */

export type Headers = Record<string, Buffer>;

export interface ProducerRecord {
  topic: string;
  /** null for an unkeyed record (spread round-robin). */
  key: Buffer | null;
  /** null is a tombstone: on a compacted topic it deletes the key. */
  value: Buffer | null;
  headers?: Record<string, Buffer | string>;
  /** Overrides the partitioner. */
  partition?: number;
  /** Milliseconds since the epoch; defaults to the time of the append. */
  timestamp?: number;
}

export interface TopicPartition {
  topic: string;
  partition: number;
}

export interface TopicPartitionOffset extends TopicPartition {
  offset: number;
}

export type RecordMetadata = TopicPartitionOffset;

export interface LogRecord extends TopicPartitionOffset {
  key: Buffer | null;
  value: Buffer | null;
  headers: Headers;
  timestamp: number;
}

export type CleanupPolicy = 'delete' | 'compact';

export interface TopicSpec {
  topic: string;
  partitions: number;
  /** Kafka topic configs; the embedded log honours `cleanup.policy` and `retention.ms`. */
  config?: {
    'cleanup.policy'?: CleanupPolicy;
    'retention.ms'?: string;
    [name: string]: string | undefined;
  };
}

export interface TopicDescription {
  topic: string;
  partitions: number;
  cleanupPolicy: CleanupPolicy;
  /** How long records are kept (`retention.ms`; -1: forever). */
  retentionMs: number;
}

export interface PartitionWatermarks {
  partition: number;
  /** The first offset still held (after retention or compaction). */
  low: number;
  /**
   * The end of what a reader sees: on Kafka the last stable offset, which passes a committed
   * transaction's records once its markers are written, moments after commit() returns.
   */
  high: number;
}

export interface LogAdmin {
  /** Creates the topics that do not exist yet; an existing topic is left as it is. */
  createTopics(topics: TopicSpec[]): Promise<void>;
  /**
   * Sets a topic's `retention.ms` (a topic created before its owner asked for less keeps what
   * it was created with otherwise). On Kafka its `segment.ms` too, when given: retention only
   * removes whole segments, and the active one rolls after `segment.ms` (seven days by default).
   */
  setRetention(topic: string, retentionMs: number, segmentMs?: number): Promise<void>;
  deleteTopics(topics: string[]): Promise<void>;
  listTopics(): Promise<string[]>;
  /** undefined when the topic does not exist. */
  describeTopic(topic: string): Promise<TopicDescription | undefined>;
  watermarks(topic: string): Promise<PartitionWatermarks[]>;
  /** The committed offsets of a consumer group for a topic; -1 where none is committed. */
  committedOffsets(groupId: string, topic: string): Promise<TopicPartitionOffset[]>;
  /**
   * For each partition, the first offset whose record has a timestamp at or after `timestamp`,
   * or the high watermark when there is none: where a replay from that time starts.
   */
  offsetsForTime(topic: string, timestamp: number): Promise<TopicPartitionOffset[]>;
}

export interface ProducerOptions {
  /**
   * Makes the producer transactional. A newer producer with the same id fences the older
   * one: the older one's transactions then fail with ProducerFencedError.
   */
  transactionalId?: string;
}

export interface Producer {
  /** Appends the records; resolves once they are durable (acks=all on Kafka). */
  send(records: ProducerRecord[]): Promise<RecordMetadata[]>;
  /** Begins a transaction; only on a transactional producer, one at a time. */
  transaction(): Promise<Transaction>;
  close(): Promise<void>;
}

/**
 * Records and consumer offsets that become visible together once `commit` resolves (on Kafka,
 * the offsets reach OffsetFetch moments later, when the transaction markers are written; a new
 * producer with the same transactional id waits for that before it may start).
 */
export interface Transaction {
  send(records: ProducerRecord[]): Promise<void>;
  /** Commits these consumer offsets (next offset to read) with the transaction. */
  sendOffsets(groupId: string, offsets: TopicPartitionOffset[]): Promise<void>;
  commit(): Promise<void>;
  abort(): Promise<void>;
}

export interface ConsumerOptions {
  groupId: string;
  /**
   * Where a partition with no committed offset starts: 'earliest' (default) or 'latest'. With
   * 'latest' a consumer that commits nothing still skips nothing once it has started: a
   * partition that stays with it through a rebalance, or a restart of the consumer after a
   * failure, goes on from where it was.
   */
  startFrom?: 'earliest' | 'latest';
  /** Upper bound of records handed to one eachBatch call. */
  maxBatchSize?: number;
  /** Kafka only: how long a silent member keeps its partitions. */
  sessionTimeoutMs?: number;
  /** Kafka only: how long a rebalance waits for the members to join again (default 30 s). */
  rebalanceTimeoutMs?: number;
}

export interface Batch extends TopicPartition {
  /** In offset order; never empty. */
  records: LogRecord[];
  /** The partition's high watermark when the batch was read: the lag is high - last offset - 1. */
  highWatermark: number;
}

export interface ConsumerHandlers {
  /**
   * Called after every rebalance with this member's whole new assignment, and awaited before
   * any record of the new assignment is handed to eachBatch. Partitions missing from it were
   * revoked.
   */
  onAssignment?(assignment: TopicPartition[]): Promise<void> | void;
  /**
   * Handles the records of one partition. The consumer's position advances past the batch
   * when it resolves; if it throws, the same records are handed again after a pause.
   */
  eachBatch(batch: Batch): Promise<void>;
}

export interface Consumer {
  /**
   * Joins the group for these topics. Partition p of every subscribed topic is assigned to the
   * same member (co-partitioning), so the topics must have equal partition counts for a join.
   */
  subscribe(topics: string[]): Promise<void>;
  /** Starts consuming; resolves once the consumer is running (not when it stops). */
  run(handlers: ConsumerHandlers): Promise<void>;
  /** Moves the position of an assigned partition; the next batch starts there. */
  seek(to: TopicPartitionOffset): void;
  /** Commits offsets (next offset to read) outside a transaction. */
  commit(offsets: TopicPartitionOffset[]): Promise<void>;
  assignment(): TopicPartition[];
  /**
   * Why this member may no longer be in its group: on Kafka, no heartbeat has been answered for
   * the session timeout, after which the coordinator evicts a member (and the member owns no
   * partition until it joins again). Undefined while it is in the group; always on the
   * embedded log.
   */
  outOfGroupBecause(): string | undefined;
  /** Leaves the group at once (no session timeout to wait for) and stops. */
  close(): Promise<void>;
}

export interface PartitionStart {
  partition: number;
  /** The first offset to read. */
  from: number;
}

export interface Log {
  readonly admin: LogAdmin;
  producer(options?: ProducerOptions): Promise<Producer>;
  consumer(options: ConsumerOptions): Consumer;
  /**
   * Reads partitions of a topic from the given offsets up to their ends as of the call
   * (committed records only), outside any consumer group's offsets, then stops: how stores
   * are restored from changelogs and how a replay reads history.
   */
  readPartitions(topic: string, starts: PartitionStart[]): AsyncGenerator<Batch>;
  close(): Promise<void>;
}
