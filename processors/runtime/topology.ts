/**
 * A processing topology, in Kafka Streams' vocabulary: sources read co-partitioned topics,
 * processors transform records and keep state in stores, sinks write to topics.
 *
 *   new Topology()
 *     .addSource('commands', { topics: ['chat.user-commands'], decode })
 *     .addProcessor('inbox', () => new InboxProcessor(), 'commands')
 *     .addStateStore({ name: 'inbox' }, 'inbox')
 *     .addSink('deliveries', { topic: (r) => deliveriesTopic(r.value.gatewayId), encode }, 'inbox');
 *
 * All sources of one topology are co-partitioned: a task owns partition p of every source
 * topic, and the runtime refuses to start when their partition counts differ.
 */
import type { Headers } from '../../log/port.ts';
import type { KeyValueStore, Serde } from '../../state/store.ts';

export interface Record<V = unknown> {
  key: string;
  value: V;
  /** Milliseconds since the epoch: the input record's, unless a processor sets another. */
  timestamp: number;
  headers?: Headers;
}

export type PunctuationType = 'WALL_CLOCK_TIME';
export type Punctuator = (timestamp: number) => void | Promise<void>;

export interface Cancellable {
  cancel(): void;
}

export interface RecordMetadata {
  topic: string;
  partition: number;
  offset: number;
}

export interface ProcessorContext<VOut = unknown> {
  readonly applicationId: string;
  /** `<applicationId>_<partition>` */
  readonly taskId: string;
  readonly partition: number;
  /** Sends a record to every child (or to the named one). */
  forward(record: Record<VOut>, childName?: string): Promise<void>;
  getStateStore<V>(name: string): KeyValueStore<V>;
  /** Calls `punctuator` every `intervalMs` of wall-clock time, between records. */
  schedule(intervalMs: number, type: PunctuationType, punctuator: Punctuator): Cancellable;
  /** Where the record being processed came from; undefined in a punctuator. */
  recordMetadata(): RecordMetadata | undefined;
}

export interface Processor<VIn = unknown, VOut = unknown> {
  init?(context: ProcessorContext<VOut>): void | Promise<void>;
  process(record: Record<VIn>): void | Promise<void>;
  close?(): void | Promise<void>;
}

export type ProcessorSupplier<VIn = unknown, VOut = unknown> = () => Processor<VIn, VOut>;

export interface SourceSpec<V = unknown> {
  topics: string[];
  /** Turns a record value into the value processors see; may throw DecodeError (dead-letter). */
  decode(value: Buffer | null, topic: string): V | Promise<V>;
  /**
   * Whether a record must sit in the partition its key hashes to (the Java client's murmur2, as
   * every writer of a co-partitioned topic must use). Default true: a record elsewhere (a
   * producer with another partitioner, such as librdkafka's default, or a null key) is
   * dead-lettered, since its task would keep a second state for its key that no other record
   * of that key ever reaches.
   */
  partitionedByKey?: boolean;
}

export interface SinkSpec<V = unknown> {
  /** A fixed topic, or one chosen per record (e.g. a gateway's deliveries topic). */
  topic: string | ((record: Record<V>) => string);
  /** null writes a tombstone. */
  encode(value: V): Buffer | null;
}

export interface StoreSpec<V = unknown> {
  name: string;
  /** How values go to RocksDB and the changelog; JSON by default. */
  serde?: Serde<V>;
}

export type Node =
  | { kind: 'source'; name: string; spec: SourceSpec; children: string[] }
  | {
      kind: 'processor';
      name: string;
      supplier: ProcessorSupplier;
      children: string[];
      stores: string[];
    }
  | { kind: 'sink'; name: string; spec: SinkSpec };

export class TopologyError extends Error {}

export class Topology {
  readonly nodes = new Map<string, Node>();
  readonly stores = new Map<string, StoreSpec>();

  addSource<V>(name: string, spec: SourceSpec<V>): this {
    this.checkNew(name);
    if (spec.topics.length === 0) throw new TopologyError(`source "${name}" names no topic`);
    this.nodes.set(name, { kind: 'source', name, spec: spec as SourceSpec, children: [] });
    return this;
  }

  addProcessor(
    name: string,
    supplier: ProcessorSupplier<never, never>,
    ...parents: string[]
  ): this {
    this.checkNew(name);
    this.nodes.set(name, {
      kind: 'processor',
      name,
      supplier: supplier as ProcessorSupplier,
      children: [],
      stores: [],
    });
    this.connect(name, parents);
    return this;
  }

  addStateStore<V>(spec: StoreSpec<V>, ...processors: string[]): this {
    if (this.stores.has(spec.name))
      throw new TopologyError(`store "${spec.name}" is already defined`);
    this.stores.set(spec.name, spec as StoreSpec);
    for (const name of processors) {
      const node = this.nodes.get(name);
      if (node?.kind !== 'processor')
        throw new TopologyError(`store "${spec.name}": no processor "${name}"`);
      node.stores.push(spec.name);
    }
    return this;
  }

  addSink<V>(name: string, spec: SinkSpec<V>, ...parents: string[]): this {
    this.checkNew(name);
    this.nodes.set(name, { kind: 'sink', name, spec: spec as SinkSpec });
    this.connect(name, parents);
    return this;
  }

  sourceTopics(): string[] {
    return [...this.nodes.values()].flatMap((n) => (n.kind === 'source' ? n.spec.topics : []));
  }

  /** The source node that reads a topic. */
  sourceFor(topic: string): Extract<Node, { kind: 'source' }> | undefined {
    for (const node of this.nodes.values()) {
      if (node.kind === 'source' && node.spec.topics.includes(topic)) return node;
    }
    return undefined;
  }

  describe(): string {
    return [...this.nodes.values()]
      .map((n) => {
        if (n.kind === 'source')
          return `source ${n.name} <- ${n.spec.topics.join(', ')} -> ${n.children.join(', ')}`;
        if (n.kind === 'processor') {
          return `processor ${n.name} [${n.stores.join(', ')}] -> ${n.children.join(', ') || '(none)'}`;
        }
        return `sink ${n.name} -> ${typeof n.spec.topic === 'string' ? n.spec.topic : '(per record)'}`;
      })
      .join('\n');
  }

  private checkNew(name: string): void {
    if (this.nodes.has(name)) throw new TopologyError(`a node named "${name}" already exists`);
  }

  private connect(child: string, parents: string[]): void {
    if (parents.length === 0) throw new TopologyError(`"${child}" needs at least one parent`);
    for (const parent of parents) {
      const node = this.nodes.get(parent);
      if (!node) throw new TopologyError(`"${child}": no parent named "${parent}"`);
      if (node.kind === 'sink')
        throw new TopologyError(`"${child}": a sink ("${parent}") has no children`);
      node.children.push(child);
    }
  }
}
