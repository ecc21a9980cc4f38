/**
 * The event codec: Avro binary in the Confluent wire format.
 *
 *   byte 0      magic byte, 0
 *   bytes 1..4  the writer schema's registry id, big-endian
 *   bytes 5..   the value, Avro binary
 *
 * A topic's codec registers its schema under `<topic>-value` once, then encodes with that id.
 * Decoding reads the writer's id and resolves the writer schema to the local (reader) schema,
 * so records written by an older or newer producer decode as long as the two are compatible.
 */
import avro from 'avsc';
import {
  RegistryUnavailableError,
  NotAvroSchemaError,
  UnknownSchemaError,
  valueSubject,
  type SchemaRegistry,
} from './registry/port.ts';
import { checkAvroBinary } from './avro-bounds.ts';
import { parseSchema, resolverOptions } from './registry/compatibility.ts';

export const MAGIC_BYTE = 0;
const HEADER_SIZE = 5;
/** Where values are encoded before they are copied out; grows to the largest value seen. */
let scratch = Buffer.allocUnsafe(64 * 1024);

/** A record's bytes are not a value of the topic's schema. Never retriable. */
export class DecodeError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DecodeError';
  }
}

/** A value does not match the schema it is encoded with. */
export class EncodeError extends Error {
  constructor(
    readonly topic: string,
    readonly paths: string[],
  ) {
    super(`value does not match the schema of topic "${topic}" at ${paths.join(', ') || '(root)'}`);
    this.name = 'EncodeError';
  }
}

export class TopicCodec<T> {
  /** Per writer schema id other than the codec's own: its type and its resolver. */
  private readonly readers = new Map<number, { writer: avro.Type; resolver: unknown }>();

  constructor(
    readonly topic: string,
    readonly schemaId: number,
    private readonly type: avro.Type,
    private readonly registry: SchemaRegistry,
  ) {}

  encode(value: T): Buffer {
    if (!this.type.isValid(value)) throw new EncodeError(this.topic, this.invalidPaths(value));
    // Written once into a scratch buffer behind the header, then copied out at its size.
    let end = this.type.encode(value, scratch, HEADER_SIZE);
    if (end < 0) {
      scratch = Buffer.allocUnsafe(Math.max(2 * scratch.length, scratch.length - end));
      end = this.type.encode(value, scratch, HEADER_SIZE);
    }
    const out = Buffer.allocUnsafe(end);
    out.writeUInt8(MAGIC_BYTE, 0);
    out.writeUInt32BE(this.schemaId, 1);
    scratch.copy(out, HEADER_SIZE, HEADER_SIZE, end);
    return out;
  }

  /** Where a value that is not valid departs from the schema (only asked once it is not). */
  private invalidPaths(value: T): string[] {
    const paths: string[] = [];
    this.type.isValid(value, { errorHook: (path) => paths.push(path.join('.')) });
    return paths;
  }

  async decode(data: Buffer): Promise<T> {
    if (data.length < HEADER_SIZE) {
      throw new DecodeError(
        `record of ${data.length} bytes is shorter than the wire format header`,
      );
    }
    if (data[0] !== MAGIC_BYTE)
      throw new DecodeError(`unknown magic byte ${data[0]} (expected ${MAGIC_BYTE})`);
    const id = data.readUInt32BE(1);
    const { writer, resolver } = await this.readerFor(id);
    try {
      checkAvroBinary(writer, data, HEADER_SIZE);
      return this.type.fromBuffer(data.subarray(HEADER_SIZE), resolver as never) as T;
    } catch (error) {
      throw new DecodeError(
        `record with schema id ${id} is not valid Avro for topic "${this.topic}": ${(error as Error).message}`,
        {
          cause: error,
        },
      );
    }
  }

  private async readerFor(id: number): Promise<{ writer: avro.Type; resolver: unknown }> {
    if (id === this.schemaId) return { writer: this.type, resolver: undefined };
    const cached = this.readers.get(id);
    if (cached) return cached;
    let writerSchema: string;
    try {
      writerSchema = await this.registry.schemaById(id);
    } catch (error) {
      if (error instanceof UnknownSchemaError) {
        throw new DecodeError(
          `record written with schema id ${id}, which the registry does not know`,
          { cause: error },
        );
      }
      if (error instanceof NotAvroSchemaError)
        throw new DecodeError(`record written with ${error.message}`, { cause: error });
      throw new RegistryUnavailableError(
        `schema id ${id} could not be fetched from the registry: ${(error as Error).message}`,
        { cause: error },
      );
    }
    let writer: avro.Type;
    let resolver;
    try {
      writer = parseSchema(writerSchema);
      resolver = this.type.createResolver(writer, resolverOptions());
    } catch (error) {
      throw new DecodeError(
        `schema id ${id} cannot be read as topic "${this.topic}"'s schema: ${(error as Error).message}`,
        {
          cause: error,
        },
      );
    }
    const reader = { writer, resolver };
    this.readers.set(id, reader);
    return reader;
  }
}

/** Builds topic codecs over one registry. */
export class Codecs {
  constructor(private readonly registry: SchemaRegistry) {}

  /**
   * The codec of a topic's values. The schema is registered as written (avsc's own export would
   * drop logical types and enum defaults); `options` are avsc's, e.g. avroTypeOptions().
   */
  async forTopic<T>(
    topic: string,
    schema: avro.Schema,
    options?: Partial<avro.ForSchemaOptions>,
  ): Promise<TopicCodec<T>> {
    const type = avro.Type.forSchema(schema, options);
    const id = await this.registry.register(valueSubject(topic), JSON.stringify(schema));
    return new TopicCodec<T>(topic, id, type, this.registry);
  }
}
