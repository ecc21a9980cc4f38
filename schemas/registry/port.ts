/**
 * The schema registry port: Avro schemas by subject and version, each distinct schema with a
 * global integer id, and compatibility (FULL_TRANSITIVE by default: see compatibility.ts)
 * checked before a new version is accepted.
 * Subjects follow the topic-name strategy: the value schema of topic T is subject `T-value`.
 *
 * Adapters: `embedded.ts` (kept durably in the log, like Confluent's `_schemas` topic) and
 * `confluent.ts` (any Confluent-compatible registry over HTTP). One conformance suite:
 * test/conformance/registry.suite.ts.
 */

export interface RegisteredSchema {
  id: number;
  subject: string;
  version: number;
  /** The schema's JSON text. */
  schema: string;
}

export interface SchemaRegistry {
  /**
   * Registers a schema under a subject and answers its id. The same schema again answers the
   * same id; a schema incompatible with the subject's latest version is refused with
   * IncompatibleSchemaError.
   */
  register(subject: string, schema: string): Promise<number>;
  /** The schema with this id; UnknownSchemaError when there is none. */
  schemaById(id: number): Promise<string>;
  /** The subject's latest version, or undefined when the subject has none. */
  latest(subject: string): Promise<RegisteredSchema | undefined>;
  close(): Promise<void>;
}

export const valueSubject = (topic: string) => `${topic}-value`;

export class SchemaRegistryError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** The schema breaks the subject's compatibility rule. */
export class IncompatibleSchemaError extends SchemaRegistryError {
  constructor(
    readonly subject: string,
    readonly reason: string,
  ) {
    super(`schema is incompatible with the latest version of subject "${subject}": ${reason}`);
  }
}

/** The text is not a valid Avro schema. */
export class InvalidSchemaError extends SchemaRegistryError {}

/**
 * The registry could not be asked (down, a 5xx, the network): not the record's fault. Marked
 * `retriable`, as the runtime's RetriableError is, so that a processor reads the record again
 * rather than dead-lettering it.
 */
export class RegistryUnavailableError extends SchemaRegistryError {
  readonly retriable = true;
}

export class UnknownSchemaError extends SchemaRegistryError {
  constructor(readonly id: number) {
    super(`no schema with id ${id} in the registry`);
  }
}

/**
 * The registry holds the id, but its schema is not Avro (a JSON Schema or Protobuf one, which a
 * shared registry may hold, or a text that does not parse): a record written with it is not
 * ours, for good. Schema ids never change what they name, so this is no outage to wait out.
 */
export class NotAvroSchemaError extends SchemaRegistryError {
  constructor(
    readonly id: number,
    why: string,
    options?: { cause?: unknown },
  ) {
    super(`schema id ${id} is not an Avro schema: ${why}`, options);
  }
}
