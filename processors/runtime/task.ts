/**
 * A stream task: partition p of every source topic of a topology, the processors that handle
 * its records, and its share of every store. Records are processed one at a time, in offset
 * order per partition. The task gathers what it produces until the runtime commits it.
 */
import type { LogRecord, ProducerRecord, TopicPartitionOffset } from '../../log/port.ts';
import type { KeyValueStore } from '../../state/store.ts';
import type { Logger } from '../../observability/logger.ts';
import type {
  Cancellable,
  Node,
  Processor,
  ProcessorContext,
  Punctuator,
  Record,
  RecordMetadata,
  Topology,
} from './topology.ts';
import { UnknownTopicError } from '../../log/errors.ts';
import { partitionFor } from '../../log/partitioner.ts';
import { isRetriable } from './errors.ts';

/** What a task needs of a store beyond the KeyValueStore a processor sees. */
export interface TaskStateStore<V = unknown> extends KeyValueStore<V> {
  savepoint(): void;
  rollback(): void;
}

interface Punctuation {
  intervalMs: number;
  next: number;
  punctuator: Punctuator;
  cancelled: boolean;
}

export type Outcome = 'processed' | 'skipped' | 'dead-lettered';

export interface TaskOptions {
  applicationId: string;
  partition: number;
  topology: Topology;
  stores: Map<string, TaskStateStore>;
  deadLetterTopic: string;
  logger: Logger;
  /**
   * Whether a topic that a sink chose per record exists (fixed topics are created at start).
   * A record for one that does not goes to the dead-letter topic instead: nobody could read it,
   * and a transaction holding it would fail at every try and wedge the task's commits.
   */
  topicExists?: (topic: string) => boolean | Promise<boolean>;
  /** Told of each output sent to the dead-letter topic for want of its topic. */
  onUnknownTopic?: (topic: string) => void;
  /** The source topics' partition count, to check that each record is in its key's partition. */
  partitions?: number;
  now?: () => number;
}

export class StreamTask {
  readonly id: string;
  readonly partition: number;
  /** Records for sinks and the dead-letter topic, in the order they were produced. */
  outputs: ProducerRecord[] = [];
  /** Per source topic, the offset of the next record to process. */
  private readonly positions = new Map<string, number>();
  private readonly changed = new Set<string>();
  private readonly processors = new Map<string, Processor>();
  private readonly punctuations: Punctuation[] = [];
  private current: RecordMetadata | undefined;
  /** Records processed since the last commit. */
  uncommitted = 0;

  constructor(private readonly options: TaskOptions) {
    this.partition = options.partition;
    this.id = `${options.applicationId}_${options.partition}`;
  }

  async init(): Promise<void> {
    for (const node of this.options.topology.nodes.values()) {
      if (node.kind !== 'processor') continue;
      const processor = node.supplier();
      this.processors.set(node.name, processor);
      await processor.init?.(this.contextFor(node));
    }
  }

  /** Where processing resumes in a source topic (from the committed offsets). */
  setPosition(topic: string, offset: number): void {
    this.positions.set(topic, offset);
  }

  /** The offsets to commit: the next record to process, per source partition. */
  committable(): TopicPartitionOffset[] {
    return [...this.changed].map((topic) => ({
      topic,
      partition: this.partition,
      offset: this.positions.get(topic)!,
    }));
  }

  /** Every source partition's position: the offset of the next record to process. */
  currentOffsets(): TopicPartitionOffset[] {
    return [...this.positions].map(([topic, offset]) => ({
      topic,
      partition: this.partition,
      offset,
    }));
  }

  get hasWork(): boolean {
    return this.outputs.length > 0 || this.changed.size > 0;
  }

  /** After a successful commit. */
  committed(): void {
    this.outputs = [];
    this.changed.clear();
    this.uncommitted = 0;
  }

  async process(record: LogRecord): Promise<Outcome> {
    if (record.offset < (this.positions.get(record.topic) ?? 0)) return 'skipped'; // a batch handed again
    const source = this.options.topology.sourceFor(record.topic);
    if (!source) throw new Error(`task ${this.id} has no source for topic ${record.topic}`);
    const outputsBefore = this.outputs.length;
    for (const store of this.options.stores.values()) store.savepoint();
    this.current = { topic: record.topic, partition: record.partition, offset: record.offset };
    let outcome: Outcome = 'processed';
    try {
      if (source.spec.partitionedByKey !== false && this.options.partitions)
        mustBeInItsPartition(record, this.options.partitions);
      const value = await source.spec.decode(record.value, record.topic);
      const key = record.key?.toString('utf8') ?? '';
      await this.forwardTo(source.children, {
        key,
        value,
        timestamp: record.timestamp,
        headers: record.headers,
      });
    } catch (error) {
      for (const store of this.options.stores.values()) store.rollback();
      this.outputs.length = outputsBefore;
      if (isRetriable(error)) throw error; // retried with backoff; nothing of it is kept
      this.outputs.push(this.deadLetter(record, error));
      this.options.logger.error(
        {
          err: error,
          task: this.id,
          topic: record.topic,
          partition: record.partition,
          offset: record.offset,
        },
        'record sent to the dead-letter topic',
      );
      outcome = 'dead-lettered';
    } finally {
      this.current = undefined;
    }
    this.positions.set(record.topic, record.offset + 1);
    this.changed.add(record.topic);
    this.uncommitted++;
    return outcome;
  }

  /** Runs the punctuators that are due; a failing one is logged and tried at its next turn. */
  async punctuate(now: number): Promise<void> {
    for (const p of this.punctuations) {
      if (p.cancelled || now < p.next) continue;
      p.next = now + p.intervalMs;
      const outputsBefore = this.outputs.length;
      for (const store of this.options.stores.values()) store.savepoint();
      try {
        await p.punctuator(now);
      } catch (error) {
        for (const store of this.options.stores.values()) store.rollback();
        this.outputs.length = outputsBefore;
        this.options.logger.error({ err: error, task: this.id }, 'punctuator failed');
      }
    }
  }

  async close(): Promise<void> {
    for (const processor of this.processors.values()) await processor.close?.();
    this.processors.clear();
  }

  private async forwardTo(children: string[], record: Record): Promise<void> {
    for (const name of children) {
      const node = this.options.topology.nodes.get(name)!;
      if (node.kind === 'processor') {
        await this.processors.get(name)!.process(record);
      } else if (node.kind === 'sink') {
        const { topic: spec } = node.spec;
        const chosen = typeof spec !== 'string';
        const topic = chosen ? spec(record) : spec;
        const output: ProducerRecord = {
          topic,
          key: Buffer.from(record.key),
          value: node.spec.encode(record.value),
          headers: record.headers,
          timestamp: record.timestamp,
        };
        const exists =
          !chosen || !this.options.topicExists || (await this.options.topicExists(topic));
        this.outputs.push(exists ? output : this.unsendable(output));
      }
    }
  }

  private contextFor(node: Extract<Node, { kind: 'processor' }>): ProcessorContext {
    const { options, punctuations } = this;
    return {
      applicationId: this.options.applicationId,
      taskId: this.id,
      partition: this.partition,
      forward: (record, childName) => {
        if (childName !== undefined && !node.children.includes(childName)) {
          throw new Error(`"${node.name}" has no child "${childName}"`);
        }
        return this.forwardTo(childName === undefined ? node.children : [childName], record);
      },
      getStateStore: <V>(name: string) => {
        if (!node.stores.includes(name))
          throw new Error(`processor "${node.name}" is not connected to store "${name}"`);
        return options.stores.get(name)! as unknown as KeyValueStore<V>;
      },
      schedule: (intervalMs, _type, punctuator): Cancellable => {
        const now = options.now?.() ?? Date.now();
        const entry: Punctuation = {
          intervalMs,
          next: now + intervalMs,
          punctuator,
          cancelled: false,
        };
        punctuations.push(entry);
        return { cancel: () => (entry.cancelled = true) };
      },
      recordMetadata: () => this.current,
    };
  }

  /** An output whose topic does not exist, as a dead letter naming it. */
  private unsendable(output: ProducerRecord): ProducerRecord {
    const source = this.current;
    this.options.logger.warn(
      { task: this.id, topic: output.topic, source },
      'output for a topic that does not exist sent to the dead-letter topic',
    );
    this.options.onUnknownTopic?.(output.topic);
    return {
      ...output,
      topic: this.options.deadLetterTopic,
      headers: {
        ...output.headers,
        ...this.deadLetterHeaders(new UnknownTopicError(output.topic)),
        'dlq.output-topic': output.topic,
      },
    };
  }

  /** An input record that cannot be processed, as a dead letter naming where it was read. */
  private deadLetter(record: LogRecord, error: unknown): ProducerRecord {
    return {
      topic: this.options.deadLetterTopic,
      key: record.key,
      value: record.value,
      timestamp: record.timestamp,
      headers: {
        ...record.headers,
        ...this.deadLetterHeaders(error),
        'dlq.topic': record.topic,
        'dlq.partition': String(record.partition),
        'dlq.offset': String(record.offset),
      },
    };
  }

  /** What every dead letter says: why, and which task sent it. */
  private deadLetterHeaders(error: unknown): { [header: string]: string } {
    const message = error instanceof Error ? error.message : String(error);
    return {
      'dlq.reason': message.slice(0, 1000),
      'dlq.error': error instanceof Error ? error.name : 'Error',
      'dlq.task': this.id,
    };
  }
}

/** A record of a co-partitioned source that is not in the partition its key hashes to. */
export class MisroutedRecordError extends Error {
  constructor(message: string) {
    super(message);
    this.name = 'MisroutedRecordError';
  }
}

function mustBeInItsPartition(record: LogRecord, partitions: number): void {
  if (record.key === null)
    throw new MisroutedRecordError(`a record of ${record.topic} has no key to route it by`);
  const expected = partitionFor(record.key, partitions);
  if (expected !== record.partition)
    throw new MisroutedRecordError(
      `a record of ${record.topic} keyed "${record.key.toString('utf8')}" is in partition ` +
        `${record.partition}, but its key hashes to ${expected} (murmur2, as the Java client): ` +
        'was it written with another partitioner?',
    );
}
