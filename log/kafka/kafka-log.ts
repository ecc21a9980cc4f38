/**
 * The log port on Apache Kafka, through kafkajs. Producers are idempotent (acks=all);
 * consumers read committed records only and use the co-partitioned assigner; keyed records
 * are partitioned by the same murmur2 as the embedded log.
 */
import kafkajs, {
  type Admin,
  type Consumer as KafkaConsumer,
  type ConsumerRunConfig,
  type EachBatchPayload,
  type IHeaders,
  type KafkaMessage,
  type LogEntry,
  type Message,
  type Producer as KafkaProducer,
  type Transaction as KafkaTransaction,
} from 'kafkajs';
import { randomUUID } from 'node:crypto';
import type {
  Batch,
  Consumer,
  ConsumerHandlers,
  PartitionStart,
  ConsumerOptions,
  Headers,
  Log,
  LogAdmin,
  LogRecord,
  PartitionWatermarks,
  Producer,
  ProducerOptions,
  ProducerRecord,
  RecordMetadata,
  TopicDescription,
  TopicPartition,
  TopicPartitionOffset,
  TopicSpec,
  Transaction,
} from '../port.ts';
import { IllegalStateError, LogError, ProducerFencedError } from '../errors.ts';
import { partitionFor } from '../partitioner.ts';
import { silentLogger, type Logger } from '../../observability/logger.ts';
import { coPartitionedAssigner } from './assigner.ts';
import { AsyncQueue } from '../async-queue.ts';

// kafkajs is CommonJS; Node's ESM loader does not see all of its named exports.
const { ConfigResourceTypes, ConfigSource, Kafka, logLevel: kafkaLogLevel } = kafkajs;
type Kafka = InstanceType<typeof Kafka>;

export interface KafkaLogOptions {
  brokers: string[];
  clientId?: string;
  logger?: Logger;
}

/** Attempts of a retriable call after the first (with backoff up to 2 s: about 10 s). */
const RETRIES = 8;

/** Which errors to try a call again after, how many times, and the backoff's first and last wait. */
interface RetryPolicy {
  when: (error: unknown) => boolean;
  retries: number;
  firstMs: number;
  maxMs: number;
}

/**
 * By default, while Kafka answers with a retriable error, for the calls kafkajs does not retry
 * itself (admin calls, subscribe): just after a topic is created, or on a broker that has just
 * started, its partitions may have no leader or no metadata yet.
 */
const RETRIABLE: RetryPolicy = {
  when: (error) => (error as { retriable?: boolean }).retriable === true,
  retries: RETRIES,
  firstMs: 100,
  maxMs: 2000,
};

/** Runs a call again, with backoff, while it fails as the policy says to try again after. */
async function retrying<T>(work: () => Promise<T>, policy: RetryPolicy = RETRIABLE): Promise<T> {
  for (let attempt = 0; ; attempt++) {
    try {
      return await work();
    } catch (error) {
      if (!policy.when(error) || attempt >= policy.retries) throw error;
      const wait = Math.min(policy.maxMs, policy.firstMs * 2 ** attempt);
      await new Promise((resolve) => setTimeout(resolve, wait));
    }
  }
}

const FENCED = new Set([
  'PRODUCER_FENCED',
  'INVALID_PRODUCER_EPOCH',
  'TRANSACTIONAL_ID_AUTHORIZATION_FAILED',
]);

/**
 * What kafkajs logs that says nothing an operator can act on, and goes to debug:
 *
 * - Its connections log every error response at error level ("Response Heartbeat(...)": the
 *   group is rebalancing, a coordinator is loading, a leader moved), then throw it to the
 *   caller, which retries or fails, and a failure is logged where it is handled. A test
 *   deployment logged 54 of them in 40 s of normal rebalances.
 * - Its producer logs each send it is about to retry ("Failed to send messages: ...", with the
 *   retry's count): a task's next transaction meeting the coordinator still writing the markers
 *   of the one before (CONCURRENT_TRANSACTIONS) did it every few seconds under load. A send
 *   that runs out of retries reaches its caller, which logs it.
 * - It warns that bounded retries "may invalidate EoS guarantees" for every idempotent producer.
 *   They are bounded on purpose: a send that keeps failing reaches its caller instead of hanging.
 *   What a caller then sends again is deduplicated where it lands (a gateway's retry keeps its
 *   id, and the users actor keeps one entry per id) or was never committed (a transaction that
 *   failed is aborted and its task revived).
 */
export function isNoise(namespace: string, message: string): boolean {
  return (
    (namespace === 'Connection' && message.startsWith('Response ')) ||
    (namespace === 'Producer' && message.startsWith('Failed to send messages: ')) ||
    message === 'Limiting retries for the idempotent producer may invalidate EoS guarantees'
  );
}

export class KafkaLog implements Log {
  readonly admin: KafkaAdmin;
  private readonly kafka: Kafka;
  private readonly producers = new Set<KafkaLogProducer>();
  private readonly consumers = new Set<KafkaLogConsumer>();

  constructor(private readonly options: KafkaLogOptions) {
    const logger = options.logger ?? silentLogger;
    this.kafka = new Kafka({
      clientId: options.clientId ?? 'kchat',
      brokers: options.brokers,
      logLevel: kafkaLogLevel.WARN,
      logCreator: () => (entry: LogEntry) => {
        const { message, ...rest } = entry.log;
        const level = isNoise(entry.namespace, message)
          ? 'debug'
          : entry.level <= kafkaLogLevel.ERROR
            ? 'error'
            : entry.level === kafkaLogLevel.WARN
              ? 'warn'
              : 'debug';
        logger[level]({ kafkajs: entry.namespace, ...rest }, message);
      },
      retry: { initialRetryTime: 100, retries: 8 },
    });
    this.admin = new KafkaAdmin(this.kafka.admin());
  }

  async producer(options: ProducerOptions = {}): Promise<Producer> {
    const decided = new WeakMap<Message, number>();
    const kafkaProducer = await this.kafkaProducer(options, decided);
    if (options.transactionalId !== undefined) {
      // Like the Java client's initTransactions(): get the producer id and epoch now, which
      // fences any older producer with this transactional id. kafkajs would otherwise wait for
      // the first transaction; an empty one is aborted without a request to the broker.
      try {
        await (await kafkaProducer.transaction()).abort();
      } catch (error) {
        await kafkaProducer.disconnect();
        throw translate(error, options.transactionalId);
      }
    }
    const producer = new KafkaLogProducer(
      kafkaProducer,
      options.transactionalId,
      decided,
      () => this.kafkaProducer(options, decided),
      this.options.logger ?? silentLogger,
      () => this.producers.delete(producer),
    );
    this.producers.add(producer);
    return producer;
  }

  /** A connected kafkajs producer, idempotent, partitioning as the embedded log does. */
  private async kafkaProducer(
    options: ProducerOptions,
    decided: WeakMap<Message, number>,
  ): Promise<KafkaProducer> {
    const roundRobin = new Map<string, number>();
    const kafkaProducer = this.kafka.producer({
      idempotent: true,
      maxInFlightRequests: 1,
      transactionalId: options.transactionalId,
      allowAutoTopicCreation: false,
      // The same partitioner as the embedded log; it remembers each decision so that send()
      // can tell every record its offset.
      createPartitioner:
        () =>
        ({ topic, partitionMetadata, message }) => {
          const count = partitionMetadata.length;
          let partition: number;
          if (message.partition !== undefined && message.partition !== null)
            partition = message.partition;
          else if (message.key) partition = partitionFor(Buffer.from(message.key), count);
          else {
            const next = roundRobin.get(topic) ?? Math.floor(Math.random() * count);
            roundRobin.set(topic, next + 1);
            partition = next % count;
          }
          decided.set(message, partition);
          return partition;
        },
    });
    await kafkaProducer.connect();
    return kafkaProducer;
  }

  /**
   * A throwaway consumer in a group of its own, paused on every other partition and sought to
   * the starts. kafkajs announces every batch it moves past, transaction markers included,
   * which tells when each partition has reached its end.
   */
  async *readPartitions(topic: string, starts: PartitionStart[]): AsyncGenerator<Batch> {
    const marks = await this.admin.watermarks(topic);
    const ends = new Map(
      starts.map((s) => [s.partition, marks.find((m) => m.partition === s.partition)?.high ?? 0]),
    );
    const position = new Map<number, number>();
    for (const s of starts) if (s.from < ends.get(s.partition)!) position.set(s.partition, s.from);
    if (position.size === 0) return;
    const queue = new AsyncQueue<Batch>();
    const consumer = this.kafka.consumer({
      groupId: `${this.options.clientId ?? 'kchat'}-reader-${randomUUID()}`,
      readUncommitted: false,
      allowAutoTopicCreation: false,
      maxWaitTimeInMs: 100,
      retry: { initialRetryTime: 100, retries: 10 },
    });
    const advance = (partition: number, next: number) => {
      if (!position.has(partition)) return;
      if (next >= ends.get(partition)!) position.delete(partition);
      else position.set(partition, Math.max(position.get(partition)!, next));
      if (position.size === 0) queue.end();
    };
    consumer.on(consumer.events.END_BATCH_PROCESS, ({ payload }) => {
      if (payload.topic === topic) advance(payload.partition, Number(payload.lastOffset) + 1);
    });
    consumer.on(consumer.events.CRASH, ({ payload }) => queue.end(payload.error));
    try {
      await consumer.connect();
      await retrying(() => consumer.subscribe({ topics: [topic], fromBeginning: true }));
      await consumer.run({
        autoCommit: false,
        eachBatch: async ({ batch }) => {
          const next = position.get(batch.partition);
          const end = ends.get(batch.partition);
          if (next === undefined || end === undefined) return;
          // From where this partition has got to, not from its start: a batch fetched before
          // the seek (the consumer starts at the beginning) may cover what the seek reads again.
          const records = batch.messages
            .map((m) => toRecord(batch.topic, batch.partition, m))
            .filter((r) => r.offset >= next && r.offset < end);
          if (records.length > 0) {
            queue.push({ topic, partition: batch.partition, records, highWatermark: end });
            advance(batch.partition, records[records.length - 1]!.offset + 1);
          }
        },
      });
      const others = marks.map((m) => m.partition).filter((p) => !position.has(p));
      if (others.length > 0) consumer.pause([{ topic, partitions: others }]);
      for (const [partition, offset] of position)
        consumer.seek({ topic, partition, offset: String(offset) });
      yield* queue;
    } finally {
      await consumer.disconnect();
    }
  }

  consumer(options: ConsumerOptions): Consumer {
    const consumer = new KafkaLogConsumer(
      this.kafka,
      options,
      () => this.consumers.delete(consumer),
      this.options.logger ?? silentLogger,
      this.admin,
    );
    this.consumers.add(consumer);
    return consumer;
  }

  async close(): Promise<void> {
    await Promise.all([...this.consumers].map((c) => c.close()));
    await Promise.all([...this.producers].map((p) => p.close()));
    await this.admin.close();
  }
}

/** kafkajs messages grouped by topic, and each record's message in the caller's order. */
function toMessages(records: ProducerRecord[]): {
  byTopic: Map<string, Message[]>;
  inOrder: Message[];
} {
  const byTopic = new Map<string, Message[]>();
  const inOrder = records.map((r) => {
    const message: Message = {
      key: r.key,
      value: r.value,
      headers: r.headers,
      partition: r.partition,
      timestamp: r.timestamp === undefined ? undefined : String(r.timestamp),
    };
    let list = byTopic.get(r.topic);
    if (!list) byTopic.set(r.topic, (list = []));
    list.push(message);
    return message;
  });
  return { byTopic, inOrder };
}

const HEARTBEAT_INTERVAL_MS = 1000;

/**
 * Awaits work, calling kafkajs's heartbeat every HEARTBEAT_INTERVAL_MS meanwhile. A beat that
 * fails because the group is rebalancing, or no longer knows this member (evicted), is told to
 * onRebalance; kafkajs meets the same answer again and rejoins once the batch is done.
 */
async function whileBeating<T>(
  work: Promise<T>,
  heartbeat: () => Promise<void>,
  onRebalance: (error: Error) => void,
): Promise<T> {
  const beat = () =>
    void heartbeat().catch((error: unknown) => {
      if (leavesTheAssignment(error)) onRebalance(error as Error);
    });
  const timer = setInterval(beat, HEARTBEAT_INTERVAL_MS);
  try {
    return await work;
  } finally {
    clearInterval(timer);
  }
}

/** A heartbeat's answers after which this member's assignment is no longer the group's. */
const LEAVES_THE_ASSIGNMENT = new Set([
  'REBALANCE_IN_PROGRESS',
  'ILLEGAL_GENERATION',
  'UNKNOWN_MEMBER_ID',
  'FENCED_INSTANCE_ID',
]);

function leavesTheAssignment(error: unknown): boolean {
  return LEAVES_THE_ASSIGNMENT.has(kafkaErrorType(error) ?? '');
}

/**
 * A request's records, at most about this many bytes as sizeOf counts them. The broker refuses a
 * record batch over `message.max.bytes` (1 MiB by default), and kafkajs sends each partition's
 * records of one call as one batch, so a large call (a task's commit after a burst) is split.
 */
const REQUEST_BYTES = 512 * 1024;

/**
 * What a record's framing in a v2 batch can take beyond its key, value and header bytes (its
 * length, attributes, timestamp and offset deltas, and the key, value and header-count lengths,
 * all varints), and each header's two lengths. Counting key and value bytes alone, 90,000
 * tombstones with 3-byte keys counted 270 KB and weighed 1.2 MB on the wire: refused as too
 * large, retried for a minute and a half, and a commit like that would fail every time.
 */
const RECORD_OVERHEAD_BYTES = 32;
const HEADER_OVERHEAD_BYTES = 10;

function sizeOf(record: ProducerRecord): number {
  let bytes = RECORD_OVERHEAD_BYTES + (record.key?.length ?? 0) + (record.value?.length ?? 0);
  for (const [name, value] of Object.entries(record.headers ?? {}))
    bytes += HEADER_OVERHEAD_BYTES + Buffer.byteLength(name) + (value?.length ?? 0);
  return bytes;
}

const sizeOfAll = (records: ProducerRecord[]) => records.reduce((n, r) => n + sizeOf(r), 0);

/** Consecutive slices of at most REQUEST_BYTES each (a larger record alone in its slice). */
export function inRequests(records: ProducerRecord[]): ProducerRecord[][] {
  const requests: ProducerRecord[][] = [];
  let current: ProducerRecord[] = [];
  let bytes = 0;
  for (const record of records) {
    const size = sizeOf(record);
    if (current.length > 0 && bytes + size > REQUEST_BYTES) {
      requests.push(current);
      current = [];
      bytes = 0;
    }
    current.push(record);
    bytes += size;
  }
  if (current.length > 0) requests.push(current);
  return requests;
}

export function translate(error: unknown, transactionalId?: string): unknown {
  // kafkajs wraps a protocol error when its retries end (KafkaJSNumberOfRetriesExceeded): a
  // fence found on the last retry is still a fence.
  const type = kafkaErrorType(error);
  if (transactionalId !== undefined && type && FENCED.has(type))
    return new ProducerFencedError(transactionalId);
  const retriable = (error as { retriable?: boolean }).retriable === true;
  return new LogError((error as Error).message ?? String(error), { retriable, cause: error });
}

interface QueuedSend {
  records: ProducerRecord[];
  resolve(metadata: RecordMetadata[]): void;
  reject(error: unknown): void;
}

/**
 * Errors after which the broker no longer knows an idempotent producer's sequence (it lost the
 * producer's state, say in a restart): kafkajs fails every later send of that producer with
 * them, for good (kafkajs#598). The producer is replaced by one with a new producer id.
 */
const LOST_PRODUCER_STATE = new Set([
  'OUT_OF_ORDER_SEQUENCE_NUMBER',
  'UNKNOWN_PRODUCER_ID',
  'INVALID_PRODUCER_EPOCH',
  'INVALID_PRODUCER_ID_MAPPING',
]);

/**
 * AddOffsetsToTxn answered CONCURRENT_TRANSACTIONS, the previous transaction's markers still
 * being written: tried again 15 times, backing off from 20 ms to 500 ms (about 6 s in all).
 */
const CONCURRENT_TRANSACTIONS: RetryPolicy = {
  when: (error) => kafkaErrorType(error) === 'CONCURRENT_TRANSACTIONS',
  retries: 15,
  firstMs: 20,
  maxMs: 500,
};

/** The Kafka error type of an error kafkajs threw, or of the one it wraps. */
function kafkaErrorType(error: unknown): string | undefined {
  for (
    let e = error as { type?: string; originalError?: unknown; cause?: unknown } | undefined;
    e;
  ) {
    if (typeof e.type === 'string' && e.type !== 'UNKNOWN') return e.type;
    e = (e.originalError ?? e.cause) as typeof e;
  }
  return undefined;
}

class KafkaLogProducer implements Producer {
  private open: KafkaLogTransaction | undefined;
  /** Sends waiting for the request in flight to finish. */
  private readonly queue: QueuedSend[] = [];
  /** Set while sends are being sent; close waits for them. */
  private draining: Promise<void> | undefined;

  constructor(
    private producer: KafkaProducer,
    private readonly transactionalId: string | undefined,
    private readonly decided: WeakMap<Message, number>,
    /** A new kafkajs producer like this one (for a producer whose broker state was lost). */
    private readonly replacement: () => Promise<KafkaProducer>,
    private readonly logger: Logger,
    private readonly onClose: () => void,
  ) {}

  /**
   * Group commit, as the Java client's accumulator does: the idempotent producer has one
   * request in flight, so the sends made meanwhile (and those of the same event-loop turn) go
   * out together as the next request, in the order they were made, as many as fit one request
   * (REQUEST_BYTES). Each resolves with its own records' offsets; a failed request fails the
   * sends in it and leaves the sends of earlier requests resolved. A send too large for one
   * request goes alone, in several: if one of them fails, it rejects though its earlier requests
   * were written (as on Kafka; a resend writes those records again).
   */
  send(records: ProducerRecord[]): Promise<RecordMetadata[]> {
    if (this.transactionalId !== undefined) {
      return Promise.reject(
        new IllegalStateError('a transactional producer sends inside a transaction'),
      );
    }
    return new Promise((resolve, reject) => {
      this.queue.push({ records, resolve, reject });
      this.draining ??= new Promise<void>((done) => setImmediate(done)).then(() => this.drain());
    });
  }

  private async drain(): Promise<void> {
    while (this.queue.length > 0) {
      const group: QueuedSend[] = [this.queue.shift()!];
      let bytes = sizeOfAll(group[0]!.records);
      while (this.queue.length > 0 && bytes + sizeOfAll(this.queue[0]!.records) <= REQUEST_BYTES) {
        const next = this.queue.shift()!;
        group.push(next);
        bytes += sizeOfAll(next.records);
      }
      try {
        const metadata = await this.sendNow(group.flatMap((g) => g.records));
        let at = 0;
        for (const g of group) {
          g.resolve(metadata.slice(at, at + g.records.length));
          at += g.records.length;
        }
      } catch (error) {
        for (const g of group) g.reject(error);
      }
    }
    this.draining = undefined;
  }

  private async sendNow(records: ProducerRecord[]): Promise<RecordMetadata[]> {
    const metadata: RecordMetadata[] = [];
    for (const request of inRequests(records)) metadata.push(...(await this.sendRequest(request)));
    return metadata;
  }

  private async sendRequest(records: ProducerRecord[]): Promise<RecordMetadata[]> {
    const { byTopic, inOrder } = toMessages(records);
    let results;
    try {
      results = await this.producer.sendBatch({
        acks: -1,
        topicMessages: [...byTopic].map(([topic, messages]) => ({ topic, messages })),
      });
    } catch (error) {
      const type = kafkaErrorType(error);
      if (type !== undefined && LOST_PRODUCER_STATE.has(type)) await this.replace(type);
      throw translate(error);
    }
    // The records of one partition in one request get consecutive offsets from its base offset,
    // in the order they were given.
    const base = new Map(
      results.map((r) => [`${r.topicName}/${r.partition}`, Number(r.baseOffset)]),
    );
    const taken = new Map<string, number>();
    return records.map((r, i) => {
      const partition = this.decided.get(inOrder[i]!)!;
      const id = `${r.topic}/${partition}`;
      const n = taken.get(id) ?? 0;
      taken.set(id, n + 1);
      return { topic: r.topic, partition, offset: base.get(id)! + n };
    });
  }

  /**
   * Swaps in a new kafkajs producer: the send that failed fails (its records were not written;
   * the caller sends them again), and the next ones go out under a new producer id.
   */
  private async replace(type: string): Promise<void> {
    this.logger.warn({ type }, "the broker lost this producer's state; replacing the producer");
    const old = this.producer;
    try {
      this.producer = await this.replacement();
    } catch (error) {
      this.logger.warn({ err: error }, 'no new producer yet; the next send tries again');
      return;
    }
    await old.disconnect().catch(() => undefined);
  }

  async transaction(): Promise<Transaction> {
    const id = this.transactionalId;
    if (id === undefined) throw new IllegalStateError('not a transactional producer');
    if (this.open) throw new IllegalStateError(`transaction of "${id}" already open`);
    let transaction: KafkaTransaction;
    try {
      transaction = await this.producer.transaction();
    } catch (error) {
      throw translate(error, id);
    }
    this.open = new KafkaLogTransaction(transaction, id, () => (this.open = undefined));
    return this.open;
  }

  async close(): Promise<void> {
    await this.open?.abort().catch(() => undefined);
    await this.draining;
    await this.producer.disconnect();
    this.onClose();
  }
}

class KafkaLogTransaction implements Transaction {
  private done = false;

  constructor(
    private readonly transaction: KafkaTransaction,
    private readonly transactionalId: string,
    private readonly onEnd: () => void,
  ) {}

  async send(records: ProducerRecord[]): Promise<void> {
    this.checkOpen();
    try {
      for (const request of inRequests(records))
        await this.transaction.sendBatch({
          acks: -1,
          topicMessages: [...toMessages(request).byTopic].map(([topic, messages]) => ({
            topic,
            messages,
          })),
        });
    } catch (error) {
      throw translate(error, this.transactionalId);
    }
  }

  async sendOffsets(groupId: string, offsets: TopicPartitionOffset[]): Promise<void> {
    this.checkOpen();
    const topics = new Map<string, { partition: number; offset: string }[]>();
    for (const o of offsets) {
      let list = topics.get(o.topic);
      if (!list) topics.set(o.topic, (list = []));
      list.push({ partition: o.partition, offset: String(o.offset) });
    }
    // A transaction holding offsets only starts with AddOffsetsToTxn, which the coordinator
    // answers CONCURRENT_TRANSACTIONS while it still writes the markers of the transaction
    // before; kafkajs retries that answer for AddPartitionsToTxn (a send) but not here. As the
    // Java client does, try again shortly: else the commit failed, and its task was dropped and
    // restored from its changelogs.
    try {
      await retrying(
        () =>
          this.transaction.sendOffsets({
            consumerGroupId: groupId,
            topics: [...topics].map(([topic, partitions]) => ({ topic, partitions })),
          }),
        CONCURRENT_TRANSACTIONS,
      );
    } catch (error) {
      throw translate(error, this.transactionalId);
    }
  }

  async commit(): Promise<void> {
    this.checkOpen();
    this.done = true;
    this.onEnd();
    try {
      await this.transaction.commit();
    } catch (error) {
      throw translate(error, this.transactionalId);
    }
  }

  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    this.onEnd();
    try {
      await this.transaction.abort();
    } catch (error) {
      throw translate(error, this.transactionalId);
    }
  }

  private checkOpen(): void {
    if (this.done) throw new IllegalStateError('the transaction is over');
  }
}

class KafkaLogConsumer implements Consumer {
  private readonly consumer: KafkaConsumer;
  private assigned: TopicPartition[] = [];
  /**
   * The partition numbers of the latest join's assignment, kept when the member gives them up:
   * what it claims at its next join, since its tasks' state is still on this process's disk.
   */
  private lastAssigned: number[] = [];
  /** The latest assignment's onAssignment call: every batch waits for it. */
  private assignmentHandled: Promise<void> = Promise.resolve();
  /** Bumped by every GROUP_JOIN (and by startOver): an older assignment is no longer handled. */
  private generation = 0;
  /** The member id of the latest join: another one at the next join means an eviction. */
  private memberId: string | undefined;
  private running = false;
  private closed = false;
  /** What run() gave kafkajs: given again when the consumer starts over after a crash. */
  private runConfig: ConsumerRunConfig | undefined;
  /**
   * Starting from the end: the next offset to hand per "topic/partition", so that a partition
   * kept through a rebalance or a restart goes on from there instead of from the end again
   * (kafkajs starts every newly joined generation at committed offsets or the end).
   */
  private readonly positions = new Map<string, number>();
  /** Bumped by seek, so that a batch in flight does not move a position that was just set. */
  private readonly seeks = new Map<string, number>();
  /** Restarts since the last batch handled, for the backoff. */
  private restarts = 0;
  private restartTimer: NodeJS.Timeout | undefined;
  /** When the group coordinator last answered a heartbeat (or a join): see `watchMembership`. */
  private heardAt = Date.now();
  private membershipWatch: NodeJS.Timeout | undefined;
  private readonly sessionTimeoutMs: number;
  private readonly rebalanceTimeoutMs: number;
  /** Since kafkajs said the group rebalances, until it joins: heartbeats pause meanwhile. */
  private rebalancingSince: number | undefined;
  /** The watch took the assignment away; a heartbeat of the same member gives it back. */
  private leftByWatch = false;
  /** The latest join's assignment, and the handlers it went to. */
  private joinedAssignment: TopicPartition[] = [];
  private handlers: ConsumerHandlers | undefined;
  private rejoining = false;

  constructor(
    kafka: Kafka,
    private readonly options: ConsumerOptions,
    private readonly onClose: () => void,
    private readonly logger: Logger,
    private readonly admin: LogAdmin,
  ) {
    this.sessionTimeoutMs = options.sessionTimeoutMs ?? 10_000;
    this.rebalanceTimeoutMs = options.rebalanceTimeoutMs ?? 30_000;
    this.consumer = kafka.consumer({
      groupId: options.groupId,
      partitionAssigners: [coPartitionedAssigner(() => this.lastAssigned)],
      readUncommitted: false,
      allowAutoTopicCreation: false,
      sessionTimeout: this.sessionTimeoutMs,
      heartbeatInterval: HEARTBEAT_INTERVAL_MS,
      rebalanceTimeout: this.rebalanceTimeoutMs,
      maxWaitTimeInMs: 100,
      retry: { initialRetryTime: 100, retries: 10 },
    });
  }

  private topics: string[] = [];

  async subscribe(topics: string[]): Promise<void> {
    if (this.running) throw new IllegalStateError('subscribe before run');
    this.topics.push(...topics);
  }

  async run(handlers: ConsumerHandlers): Promise<void> {
    if (this.running) throw new IllegalStateError('the consumer is already running');
    this.running = true;
    await this.consumer.connect();
    await retrying(() =>
      this.consumer.subscribe({
        topics: this.topics,
        fromBeginning: this.options.startFrom !== 'latest',
      }),
    );
    this.handlers = handlers;
    this.consumer.on(this.consumer.events.HEARTBEAT, ({ payload }) => {
      this.heardAt = Date.now();
      if (this.leftByWatch && payload.memberId === this.memberId) this.backInTheGroup();
    });
    this.consumer.on(
      this.consumer.events.REBALANCING,
      () => (this.rebalancingSince ??= Date.now()),
    );
    this.watchMembership();
    this.consumer.on(this.consumer.events.GROUP_JOIN, ({ payload }) => {
      this.heardAt = Date.now();
      this.rebalancingSince = undefined;
      this.leftByWatch = false;
      const assignment: TopicPartition[] = [];
      for (const [topic, partitions] of Object.entries(payload.memberAssignment)) {
        for (const partition of partitions) assignment.push({ topic, partition });
      }
      // A new member id: the group evicted this member (it was silent past the session or the
      // rebalance timeout) and may have given its partitions to others meanwhile.
      const evicted = this.memberId !== undefined && payload.memberId !== this.memberId;
      this.memberId = payload.memberId;
      this.joinedAssignment = assignment;
      this.lastAssigned = [...new Set(assignment.map((tp) => tp.partition))];
      this.take(assignment, handlers, evicted);
    });
    this.consumer.on(this.consumer.events.CRASH, ({ payload }) => {
      if (!payload.restart && !this.closed) this.startOver(payload.error);
    });
    this.runConfig = {
      autoCommit: false,
      eachBatchAutoResolve: true,
      eachBatch: async ({ batch, heartbeat, isStale }: EachBatchPayload) => {
        // Opening tasks (restoring their stores) and a long commit both hold a batch; kafkajs
        // heartbeats only between batches, and a member silent for the session timeout is
        // evicted, which starts another rebalance. Keep beating while waiting.
        const generation = this.generation;
        const onRebalance = (error: Error) => this.leaveAssignment(error, generation);
        await whileBeating(this.assignmentHandled, heartbeat, onRebalance);
        // Fetched before a seek made while it waited: kafkajs reads again from the seek.
        if (isStale()) return;
        if (batch.messages.length === 0) return;
        const records = batch.messages.map((m) => toRecord(batch.topic, batch.partition, m));
        const id = `${batch.topic}/${batch.partition}`;
        const seeksBefore = this.seeks.get(id) ?? 0;
        await whileBeating(
          handlers.eachBatch({
            topic: batch.topic,
            partition: batch.partition,
            records,
            highWatermark: Number(batch.highWatermark),
          }),
          heartbeat,
          onRebalance,
        );
        if (this.options.startFrom === 'latest' && (this.seeks.get(id) ?? 0) === seeksBefore)
          this.positions.set(id, records[records.length - 1]!.offset + 1);
        this.restarts = 0;
      },
    };
    await this.consumer.run(this.runConfig);
  }

  /**
   * Hands an assignment to onAssignment, unless a newer one came meanwhile: kafkajs rejoins the
   * group as soon as it is told of a rebalance (between batches; at once when it has nothing to
   * hand), so an assignment can be replaced while the previous one is still being handled (tasks
   * restoring). Handling the replaced one would open tasks the group has just given to another
   * member, fencing their new owners. A failed onAssignment is retried while its assignment is
   * the latest, as on the embedded log: else its partitions stayed without a task until the next
   * rebalance.
   */
  private async handleAssignment(
    assignment: TopicPartition[],
    generation: number,
    handlers: ConsumerHandlers,
    evicted: boolean,
  ): Promise<void> {
    const current = () => generation === this.generation && !this.closed;
    if (!current()) return;
    if (evicted) {
      // Its partitions were lost, as Kafka Streams says: what it holds for them may have been
      // taken over (a task fenced by the member that had it meanwhile would otherwise wait for
      // the fenced recheck). An empty assignment first closes everything; the new one then
      // opens what is this member's now, afresh from the log.
      this.logger.warn(
        { groupId: this.options.groupId },
        'this member was evicted from the group; closing what it held before it takes its new assignment',
      );
      try {
        await handlers.onAssignment?.([]);
      } catch (error) {
        this.logger.error({ err: error, groupId: this.options.groupId }, 'closing failed');
      }
      if (!current()) return;
    }
    try {
      await retrying(() => this.placePositions(assignment));
    } catch (error) {
      // The partitions still read, from the group's offsets or kafkajs's latest; the
      // assignment is still handled (a gateway waits for it to accept connections).
      this.logger.warn(
        { err: error, groupId: this.options.groupId },
        'placing positions at the end failed',
      );
    }
    for (let attempt = 0; current(); attempt++) {
      try {
        await handlers.onAssignment?.(assignment);
        return;
      } catch (error) {
        this.logger.error(
          { err: error, groupId: this.options.groupId },
          'handling an assignment failed; retrying',
        );
        await new Promise((resolve) => setTimeout(resolve, Math.min(100 * 2 ** attempt, 5000)));
      }
    }
  }

  /**
   * A heartbeat answered that the group is rebalancing, or has evicted this member: the
   * assignment is no longer this member's to act on. kafkajs rejoins only once the batch in hand
   * is done, and that batch may be waiting for a slow onAssignment (tasks restoring their stores,
   * past the rebalance timeout, which evicts the member). Meanwhile the group can give the
   * partitions to others: opening the rest of the old assignment's tasks, or opening a fenced
   * task again, would fence their new owners. So the member owns nothing from here until it
   * joins again, and the assignment being handled is not followed further. A beat from before
   * the latest join (`generation`) tells nothing about the assignment that join gave.
   */
  private leaveAssignment(cause: Error, generation: number): void {
    if (generation !== this.generation || this.closed) return;
    this.generation++;
    this.assigned = [];
    this.logger.info(
      { groupId: this.options.groupId, reason: cause.message },
      'the group is rebalancing; owning no partition until it assigns them again',
    );
  }

  /**
   * A member whose heartbeats have gone unanswered for the session timeout has been evicted by
   * the coordinator, which gives its partitions to others, whether or not this member was told:
   * after a broker pause kafkajs meets UNKNOWN_MEMBER_ID while fetching, forgets its member id
   * and rejoins inside its own loop, and a rejoin that fails there went on fetching the old
   * assignment with no member id (and so no heartbeat) at all. The runtime, asking whether it
   * owned a task it was fenced from, found the old assignment and opened the task again: two
   * processes fenced each other every 10 s for as long as the load lasted (a review's broker
   * pauses, two runs in three). So past the session timeout without an answer, the member owns
   * nothing until it joins again, as the Java consumer takes itself to have left the group.
   */
  private watchMembership(): void {
    this.membershipWatch = setInterval(() => {
      const out = this.outOfGroupBecause();
      if (!out) return;
      if (this.assigned.length > 0) {
        this.leaveAssignment(new Error(out), this.generation);
        this.leftByWatch = true;
      }
      // Past a rebalance's longest wait too: kafkajs is not joining (its rejoin failed inside
      // its loop and it fetches on with no member id). Stopped and run again, it joins.
      if (Date.now() - this.heardAt > this.sessionTimeoutMs + this.rebalanceTimeoutMs)
        this.rejoin(out);
    }, HEARTBEAT_INTERVAL_MS);
    this.membershipWatch.unref();
  }

  outOfGroupBecause(): string | undefined {
    if (!this.running || this.closed) return undefined;
    const silentMs = Date.now() - this.heardAt;
    // A rebalance kafkajs has begun sends no heartbeat until it joins, for up to its timeout.
    const allowedMs =
      this.rebalancingSince === undefined
        ? this.sessionTimeoutMs
        : this.sessionTimeoutMs + this.rebalanceTimeoutMs;
    return silentMs > allowedMs
      ? `the group coordinator has answered no heartbeat for ${Math.round(silentMs / 1000)} s`
      : undefined;
  }

  /**
   * A heartbeat answered for the member of the latest join, after the watch took its
   * assignment away: the coordinator was only slow (paused for less than the session timeout,
   * counted from the heartbeat it last received, not from the answer this member last had).
   * No join follows, so the assignment is taken back here, and handled again (tasks fenced or
   * failed meanwhile were not reopened while the member owned nothing).
   */
  private backInTheGroup(): void {
    if (!this.handlers || this.closed) return;
    this.leftByWatch = false;
    this.logger.info(
      { groupId: this.options.groupId },
      'heartbeats answered again for the same member: taking its assignment back',
    );
    this.take(this.joinedAssignment, this.handlers, false);
  }

  /** The member owns `assignment` from now on, and hands it on after the ones before. */
  private take(assignment: TopicPartition[], handlers: ConsumerHandlers, evicted: boolean): void {
    this.assigned = assignment;
    const generation = ++this.generation;
    this.assignmentHandled = this.assignmentHandled.then(() =>
      this.handleAssignment(assignment, generation, handlers, evicted),
    );
  }

  /** Stops kafkajs's consumer and runs it again: it joins the group afresh. */
  private rejoin(reason: string): void {
    if (this.rejoining || this.closed) return;
    this.rejoining = true;
    this.heardAt = Date.now(); // a next try only after another full wait
    this.logger.warn(
      { groupId: this.options.groupId, reason },
      'out of the group past the rebalance timeout; stopping the consumer to join again',
    );
    this.consumer
      .stop()
      .then(() => (this.closed ? undefined : this.consumer.run(this.runConfig)))
      .catch((error: unknown) => this.startOver(error as Error))
      .finally(() => (this.rejoining = false));
  }

  /**
   * kafkajs stops a consumer for good when it takes a crash's cause for final: a TypeError or
   * RangeError thrown by a handler, an error marked not retriable. The port promises the batch
   * again after a pause, so the consumer starts over (backing off up to 30 s): it joins the
   * group again and reads on from the committed offsets.
   */
  private startOver(cause: Error): void {
    const delay = Math.min(500 * 2 ** this.restarts, 30_000);
    this.restarts++;
    // Out of the group until it joins again: it owns no partition meanwhile (a runtime asking
    // whether to open a fenced task again must not find the old assignment), and an assignment
    // still being handled is no longer handed on.
    this.assigned = [];
    this.generation++;
    this.logger.error(
      { err: cause, groupId: this.options.groupId, inMs: delay },
      'consumer stopped by kafkajs; starting it over',
    );
    this.restartTimer = setTimeout(() => {
      if (this.closed) return;
      this.consumer
        .connect()
        // close() may have come while connecting: nothing runs again, and the connection goes.
        .then(() => (this.closed ? this.consumer.disconnect() : this.consumer.run(this.runConfig)))
        .catch((error: unknown) => this.startOver(error as Error));
    }, delay);
  }

  seek(to: TopicPartitionOffset): void {
    this.consumer.seek({ topic: to.topic, partition: to.partition, offset: String(to.offset) });
    const id = `${to.topic}/${to.partition}`;
    this.seeks.set(id, (this.seeks.get(id) ?? 0) + 1);
    if (this.options.startFrom === 'latest') this.positions.set(id, to.offset);
  }

  /**
   * Starting from the end: a partition new to this member starts at the group's committed
   * offset, or without one at the end it has when assigned; one it keeps (through a rebalance
   * or a restart) goes on from its position; one it lost is forgotten (whoever has it now
   * starts it afresh).
   */
  private async placePositions(assignment: TopicPartition[]): Promise<void> {
    if (this.options.startFrom !== 'latest') return;
    const id = (tp: TopicPartition) => `${tp.topic}/${tp.partition}`;
    const assigned = new Set(assignment.map(id));
    for (const known of [...this.positions.keys()])
      if (!assigned.has(known)) this.positions.delete(known);
    const fresh = assignment.filter((tp) => !this.positions.has(id(tp)));
    for (const topic of new Set(fresh.map((tp) => tp.topic))) {
      // 'latest' is for a partition the group has no committed offset of, as on the embedded log.
      const committed = new Map(
        (await this.admin.committedOffsets(this.options.groupId, topic)).map((o) => [
          o.partition,
          o.offset,
        ]),
      );
      for (const mark of await this.admin.watermarks(topic)) {
        const tp = id({ topic, partition: mark.partition });
        const from = committed.get(mark.partition) ?? -1;
        if (assigned.has(tp)) this.positions.set(tp, from >= 0 ? from : mark.high);
      }
    }
    for (const tp of assignment) {
      const position = this.positions.get(id(tp));
      if (position !== undefined)
        this.consumer.seek({ topic: tp.topic, partition: tp.partition, offset: String(position) });
    }
  }

  async commit(offsets: TopicPartitionOffset[]): Promise<void> {
    await this.consumer.commitOffsets(
      offsets.map((o) => ({ topic: o.topic, partition: o.partition, offset: String(o.offset) })),
    );
  }

  assignment(): TopicPartition[] {
    return [...this.assigned];
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    clearTimeout(this.restartTimer);
    clearInterval(this.membershipWatch);
    await this.consumer.disconnect();
    this.assigned = [];
    this.onClose();
  }
}

function toRecord(topic: string, partition: number, m: KafkaMessage): LogRecord {
  return {
    topic,
    partition,
    offset: Number(m.offset),
    key: m.key,
    value: m.value,
    headers: toHeaders(m.headers),
    timestamp: Number(m.timestamp),
  };
}

function toHeaders(headers: IHeaders | undefined): Headers {
  const result: Headers = {};
  for (const [name, value] of Object.entries(headers ?? {})) {
    if (value === undefined) continue;
    const first = Array.isArray(value) ? value[0] : value;
    if (first !== undefined) result[name] = Buffer.isBuffer(first) ? first : Buffer.from(first);
  }
  return result;
}

class KafkaAdmin implements LogAdmin {
  private connected: Promise<void> | undefined;

  constructor(private readonly admin: Admin) {}

  private async ready(): Promise<Admin> {
    this.connected ??= this.admin.connect();
    await this.connected;
    return this.admin;
  }

  /**
   * Runs an admin call, again with backoff when Kafka answers with a retriable error: just after
   * a topic is created, its partitions may have no leader yet (NOT_LEADER_FOR_PARTITION).
   */
  private async call<T>(work: (admin: Admin) => Promise<T>): Promise<T> {
    return retrying(async () => work(await this.ready()));
  }

  /** Retried as a whole: topics that already exist are left as they are, so it is idempotent. */
  async createTopics(topics: TopicSpec[]): Promise<void> {
    await this.call((admin) => this.create(admin, topics));
  }

  private async create(admin: Admin, topics: TopicSpec[]): Promise<void> {
    await admin.createTopics({
      waitForLeaders: true,
      topics: topics.map((t) => ({
        topic: t.topic,
        numPartitions: t.partitions,
        configEntries: Object.entries(t.config ?? {})
          .filter((e): e is [string, string] => e[1] !== undefined)
          .map(([name, value]) => ({ name, value })),
      })),
    });
  }

  /**
   * AlterConfigs (kafkajs has no incremental form) sets a topic's dynamic configs as a whole:
   * the others it had are read first and written back with the new ones.
   */
  async setRetention(topic: string, retentionMs: number, segmentMs?: number): Promise<void> {
    await this.call(async (admin) => {
      const described = await admin.describeConfigs({
        includeSynonyms: false,
        resources: [{ type: ConfigResourceTypes.TOPIC, name: topic }],
      });
      const entries = new Map(
        (described.resources[0]?.configEntries ?? [])
          .filter((e) => e.configSource === ConfigSource.TOPIC_CONFIG && e.configValue !== null)
          .map((e) => [e.configName, e.configValue] as const),
      );
      entries.set('retention.ms', String(retentionMs));
      if (segmentMs !== undefined) entries.set('segment.ms', String(segmentMs));
      await admin.alterConfigs({
        validateOnly: false,
        resources: [
          {
            type: ConfigResourceTypes.TOPIC,
            name: topic,
            configEntries: [...entries].map(([name, value]) => ({ name, value })),
          },
        ],
      });
    });
  }

  async deleteTopics(topics: string[]): Promise<void> {
    await this.call((admin) => admin.deleteTopics({ topics }));
  }

  async listTopics(): Promise<string[]> {
    return this.call((admin) => admin.listTopics());
  }

  async describeTopic(topic: string): Promise<TopicDescription | undefined> {
    return this.call((admin) => this.describe(admin, topic));
  }

  private async describe(admin: Admin, topic: string): Promise<TopicDescription | undefined> {
    if (!(await admin.listTopics()).includes(topic)) return undefined;
    const metadata = await admin.fetchTopicMetadata({ topics: [topic] });
    const configs = await admin.describeConfigs({
      includeSynonyms: false,
      resources: [
        {
          type: ConfigResourceTypes.TOPIC,
          name: topic,
          configNames: ['cleanup.policy', 'retention.ms'],
        },
      ],
    });
    const entry = (name: string) =>
      configs.resources[0]?.configEntries.find((e) => e.configName === name)?.configValue;
    const policy = entry('cleanup.policy');
    return {
      topic,
      partitions: metadata.topics[0]!.partitions.length,
      cleanupPolicy: policy?.includes('compact') ? 'compact' : 'delete',
      retentionMs: Number(entry('retention.ms') ?? 604_800_000),
    };
  }

  async watermarks(topic: string): Promise<PartitionWatermarks[]> {
    const offsets = await this.call((admin) => admin.fetchTopicOffsets(topic));
    return offsets
      .map((o) => ({ partition: o.partition, low: Number(o.low), high: Number(o.high) }))
      .sort((a, b) => a.partition - b.partition);
  }

  async committedOffsets(groupId: string, topic: string): Promise<TopicPartitionOffset[]> {
    const result = await this.call((admin) => admin.fetchOffsets({ groupId, topics: [topic] }));
    return (result[0]?.partitions ?? [])
      .map((p) => ({ topic, partition: p.partition, offset: Number(p.offset) }))
      .sort((a, b) => a.partition - b.partition);
  }

  async offsetsForTime(topic: string, timestamp: number): Promise<TopicPartitionOffset[]> {
    const result = await this.call((admin) => admin.fetchTopicOffsetsByTimestamp(topic, timestamp));
    return result
      .map((p) => ({ topic, partition: p.partition, offset: Number(p.offset) }))
      .sort((a, b) => a.partition - b.partition);
  }

  async close(): Promise<void> {
    if (this.connected) await this.admin.disconnect();
  }
}
