/**
 * The embedded schema registry: subjects, versions and ids kept in a compacted topic of the log
 * (`_schemas`, as Confluent's registry does on Kafka), read whole at start. One process writes
 * it, so ids are handed out from memory and the topic is the durable record.
 */
import type { Log } from '../../log/port.ts';
import {
  IncompatibleSchemaError,
  UnknownSchemaError,
  type RegisteredSchema,
  type SchemaRegistry,
} from './port.ts';
import {
  canonicalSchema,
  incompatibility,
  parseSchema,
  type Compatibility,
} from './compatibility.ts';

export const SCHEMAS_TOPIC = '_schemas';

interface SchemaRecord {
  subject: string;
  version: number;
  id: number;
  schema: string;
}

export class EmbeddedSchemaRegistry implements SchemaRegistry {
  private readonly byId = new Map<number, string>();
  private readonly idByCanonical = new Map<string, number>();
  private readonly versions = new Map<string, RegisteredSchema[]>();
  /** Registrations run one at a time, so that ids and versions never collide. */
  private queue: Promise<unknown> = Promise.resolve();

  private constructor(
    private readonly log: Log,
    private readonly compatibility: Compatibility,
  ) {}

  static async open(
    log: Log,
    options: { compatibility?: Compatibility } = {},
  ): Promise<EmbeddedSchemaRegistry> {
    const registry = new EmbeddedSchemaRegistry(log, options.compatibility ?? 'FULL');
    await log.admin.createTopics([
      { topic: SCHEMAS_TOPIC, partitions: 1, config: { 'cleanup.policy': 'compact' } },
    ]);
    await registry.load();
    return registry;
  }

  /** Reads `_schemas` from the start to its end. */
  private async load(): Promise<void> {
    const high = (await this.log.admin.watermarks(SCHEMAS_TOPIC))[0]!.high;
    if (high === 0) return;
    const consumer = this.log.consumer({ groupId: `_schemas-reader-${process.pid}-${Date.now()}` });
    await consumer.subscribe([SCHEMAS_TOPIC]);
    let done!: () => void;
    const finished = new Promise<void>((resolve) => (done = resolve));
    await consumer.run({
      eachBatch: async (batch) => {
        for (const record of batch.records) {
          if (record.value) this.apply(JSON.parse(record.value.toString('utf8')) as SchemaRecord);
          if (record.offset + 1 >= high) done();
        }
      },
    });
    await finished;
    await consumer.close();
  }

  private apply(record: SchemaRecord): void {
    this.byId.set(record.id, record.schema);
    this.idByCanonical.set(canonicalSchema(record.schema), record.id);
    const list = this.versions.get(record.subject) ?? [];
    if (!list.some((v) => v.version === record.version)) list.push({ ...record });
    list.sort((a, b) => a.version - b.version);
    this.versions.set(record.subject, list);
  }

  register(subject: string, schema: string): Promise<number> {
    const result = this.queue.then(() => this.doRegister(subject, schema));
    this.queue = result.catch(() => undefined);
    return result;
  }

  private async doRegister(subject: string, schema: string): Promise<number> {
    const type = parseSchema(schema);
    const canonical = canonicalSchema(schema);
    const list = this.versions.get(subject) ?? [];
    const existingId = this.idByCanonical.get(canonical);
    const already = list.find((v) => v.id === existingId);
    if (already) return already.id;
    const latest = list[list.length - 1];
    if (latest && this.compatibility !== 'NONE') {
      const reason = incompatibility(this.compatibility, type, parseSchema(latest.schema));
      if (reason) throw new IncompatibleSchemaError(subject, reason);
    }
    const id = existingId ?? Math.max(0, ...this.byId.keys()) + 1;
    const record: SchemaRecord = {
      subject,
      version: (latest?.version ?? 0) + 1,
      id,
      schema: canonical,
    };
    const producer = await this.log.producer();
    try {
      await producer.send([
        {
          topic: SCHEMAS_TOPIC,
          partition: 0,
          key: Buffer.from(`${subject}/${record.version}`),
          value: Buffer.from(JSON.stringify(record)),
        },
      ]);
    } finally {
      await producer.close();
    }
    this.apply(record);
    return id;
  }

  async schemaById(id: number): Promise<string> {
    const schema = this.byId.get(id);
    if (schema === undefined) throw new UnknownSchemaError(id);
    return schema;
  }

  async latest(subject: string): Promise<RegisteredSchema | undefined> {
    const list = this.versions.get(subject);
    return list?.[list.length - 1];
  }

  async close(): Promise<void> {
    await this.queue;
  }
}
