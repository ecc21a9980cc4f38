/**
 * The embedded schema registry: subjects, versions and ids kept in a compacted topic of the log
 * (`_schemas`, as Confluent's registry does on Kafka), read whole at start and caught up
 * whenever an id or subject may have moved on.
 *
 * Several processes may share it (every role on Kafka without SCHEMA_REGISTRY_URL), so nothing
 * is handed out from one process's memory:
 * - a schema's id is derived from its canonical form (31 bits of its SHA-256): every process
 *   gives one schema the same id, and two schemas never get the same one (a collision, about one
 *   in 20 million for 100 schemas, is refused, not overwritten);
 * - a subject's versions are numbered in the topic's order, which every reader sees alike; the
 *   key `<subject>/<id>` keeps every distinct registration through compaction.
 * Two processes registering incompatible schemas under one subject at the same instant could
 * both pass the check; Confluent's registry avoids that with a single leader.
 */
import { createHash } from 'node:crypto';
import type { Log } from '../../log/port.ts';
import {
  IncompatibleSchemaError,
  SchemaRegistryError,
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
  /** As the writer numbered it; readers number versions by the topic's order. */
  version: number;
  id: number;
  schema: string;
}

/** 31 bits of the canonical schema's SHA-256, never 0 (ids are positive int32s). */
export function schemaIdOf(canonical: string): number {
  const id = createHash('sha256').update(canonical).digest().readUInt32BE(0) & 0x7fffffff;
  return id === 0 ? 1 : id;
}

/**
 * A record of `_schemas` as this registry writes it (key `<subject>/<id>`, or
 * `<subject>/<version>` as it wrote them before ids came from the schema, 3ebd8f0; the value a
 * SchemaRecord of the same subject), null for a tombstone of such a key, undefined for anything
 * else. Another registry's records are refused rather than read: Confluent's use the same topic
 * name and field names, but number their ids otherwise, and this registry's records would in
 * turn be garbage to it.
 */
function ownRecord(key: Buffer | null, value: Buffer | null): SchemaRecord | null | undefined {
  const match = key && /^(.+)\/(\d+)$/.exec(key.toString('utf8'));
  if (!match) return undefined;
  if (value === null) return null;
  let record: Partial<SchemaRecord>;
  try {
    record = JSON.parse(value.toString('utf8')) as Partial<SchemaRecord>;
  } catch {
    return undefined;
  }
  const valid =
    typeof record === 'object' &&
    record !== null &&
    record.subject === match[1] &&
    typeof record.id === 'number' &&
    typeof record.version === 'number' &&
    // `<subject>/<id>`; before ids came from the schema (3ebd8f0), `<subject>/<version>`
    (record.id === Number(match[2]) || record.version === Number(match[2])) &&
    typeof record.schema === 'string';
  return valid ? (record as SchemaRecord) : undefined;
}

/** A version as this registry keeps it: its writer's number, and the order it arrived in. */
type Version = RegisteredSchema & { writtenAs: number; arrival: number };

export class EmbeddedSchemaRegistry implements SchemaRegistry {
  private readonly byId = new Map<number, string>();
  private readonly idByCanonical = new Map<string, number>();
  /** Each subject's versions, oldest first (see apply). */
  private readonly versions = new Map<string, Version[]>();
  /** How many records apply has seen: the topic's order, for versions numbered alike. */
  private arrivals = 0;
  /** Registrations and catch-ups run one at a time. */
  private queue: Promise<unknown> = Promise.resolve();
  /** The next offset of `_schemas` to read. */
  private position = 0;

  private constructor(
    private readonly log: Log,
    private readonly compatibility: Compatibility,
  ) {}

  static async open(
    log: Log,
    options: { compatibility?: Compatibility } = {},
  ): Promise<EmbeddedSchemaRegistry> {
    const registry = new EmbeddedSchemaRegistry(log, options.compatibility ?? 'FULL_TRANSITIVE');
    await log.admin.createTopics([
      { topic: SCHEMAS_TOPIC, partitions: 1, config: { 'cleanup.policy': 'compact' } },
    ]);
    await registry.catchUp();
    return registry;
  }

  /** Reads `_schemas` from where this instance stopped to its current end. */
  private async catchUp(): Promise<void> {
    const high = (await this.log.admin.watermarks(SCHEMAS_TOPIC))[0]!.high;
    if (high <= this.position) return;
    for await (const batch of this.log.readPartitions(SCHEMAS_TOPIC, [
      { partition: 0, from: this.position },
    ])) {
      for (const record of batch.records) {
        const own = ownRecord(record.key, record.value);
        if (own === undefined)
          throw new SchemaRegistryError(
            `${SCHEMAS_TOPIC} holds a record this registry did not write (offset ${record.offset}, key ${JSON.stringify(record.key?.toString('utf8') ?? null)}): another schema registry (Confluent's keeps its schemas there) shares this Kafka cluster; set SCHEMA_REGISTRY_URL to use it`,
          );
        if (own !== null) this.apply(own);
        this.position = record.offset + 1;
      }
      if (this.position >= high) break;
    }
  }

  /**
   * A subject's versions are in the order their writers numbered them (ties, from writers that
   * raced, in the topic's order), not in the topic's order alone: `_schemas` is compacted, and
   * a later copy of an old version (written by a process whose view was behind) would, once the
   * cleaner kept only that copy, move the old version past the newer ones. A schema registered
   * twice keeps its first place.
   */
  private apply(record: SchemaRecord): void {
    this.byId.set(record.id, record.schema);
    this.idByCanonical.set(canonicalSchema(record.schema), record.id);
    const list = this.versions.get(record.subject) ?? [];
    this.versions.set(record.subject, list);
    if (list.some((v) => v.id === record.id)) return;
    const entry = { ...record, writtenAs: record.version, arrival: this.arrivals++ };
    list.push(entry);
    list.sort((a, b) => a.writtenAs - b.writtenAs || a.arrival - b.arrival);
    list.forEach((v, i) => (v.version = i + 1));
  }

  private serially<T>(work: () => Promise<T>): Promise<T> {
    const result = this.queue.then(work);
    this.queue = result.catch(() => undefined);
    return result;
  }

  register(subject: string, schema: string): Promise<number> {
    return this.serially(() => this.doRegister(subject, schema));
  }

  private async doRegister(subject: string, schema: string): Promise<number> {
    const type = parseSchema(schema);
    const canonical = canonicalSchema(schema);
    await this.catchUp();
    const list = this.versions.get(subject) ?? [];
    const existingId = this.idByCanonical.get(canonical);
    const already = list.find((v) => v.id === existingId);
    if (already) return already.id;
    const reason = incompatibility(
      this.compatibility,
      type,
      list.map((v) => parseSchema(v.schema)),
    );
    if (reason) throw new IncompatibleSchemaError(subject, reason);
    // Ids given before ids were derived from the schema stay as they were.
    const id = existingId ?? schemaIdOf(canonical);
    const taken = this.byId.get(id);
    if (taken !== undefined && canonicalSchema(taken) !== canonical)
      throw new SchemaRegistryError(
        `schema id ${id} of "${subject}" collides with another schema's; change the schema (a doc string will do)`,
      );
    const record: SchemaRecord = { subject, version: list.length + 1, id, schema: canonical };
    const producer = await this.log.producer();
    let offset: number;
    try {
      const [written] = await producer.send([
        {
          topic: SCHEMAS_TOPIC,
          partition: 0,
          key: Buffer.from(`${subject}/${id}`),
          value: Buffer.from(JSON.stringify(record)),
        },
      ]);
      offset = written!.offset;
    } finally {
      await producer.close();
    }
    if (offset === this.position) {
      // Nothing came between: the record is where this instance stands, no need to read it.
      this.apply(record);
      this.position = offset + 1;
    } else await this.catchUp();
    return this.idByCanonical.get(canonical) ?? id;
  }

  async schemaById(id: number): Promise<string> {
    // Another process may have registered it since this one last read `_schemas`.
    if (!this.byId.has(id)) await this.serially(() => this.catchUp());
    const schema = this.byId.get(id);
    if (schema === undefined) throw new UnknownSchemaError(id);
    return schema;
  }

  async latest(subject: string): Promise<RegisteredSchema | undefined> {
    await this.serially(() => this.catchUp());
    const latest = this.versions.get(subject)?.at(-1);
    if (latest === undefined) return undefined;
    const { id, version, schema } = latest;
    return { subject, id, version, schema };
  }

  async close(): Promise<void> {
    await this.queue;
  }
}
