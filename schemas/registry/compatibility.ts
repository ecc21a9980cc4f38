/**
 * Avro schema compatibility, decided by avsc's resolver.
 *
 * - BACKWARD: the new schema, as a reader, resolves data written with the latest one (consumers
 *   can be upgraded first). Adding a field with a default passes; adding one without a default
 *   or changing a field's type fails; removing any field passes.
 * - FORWARD: the latest schema, as a reader, resolves data written with the new one (producers
 *   can be upgraded first). Removing a field without a default fails.
 * - FULL: both. This project's subjects use FULL: in a rolling deploy, gateways (producers)
 *   and processors (consumers) are upgraded in any order, so a change must be safe both ways.
 */
import avro from 'avsc';
import { InvalidSchemaError } from './port.ts';

export type Compatibility = 'BACKWARD' | 'FORWARD' | 'FULL' | 'NONE';

export function parseSchema(schema: string): avro.Type {
  try {
    return avro.Type.forSchema(JSON.parse(schema) as avro.Schema);
  } catch (error) {
    throw new InvalidSchemaError(`invalid Avro schema: ${(error as Error).message}`, {
      cause: error,
    });
  }
}

/**
 * As Avro's SchemaCompatibility (which Confluent's registry applies) resolves: named types match
 * by their short name, so a record moved to another namespace still reads the old one's data.
 * A new object each time: avsc keeps its resolvers of named types in the options it is given.
 */
export function resolverOptions(): { ignoreNamespaces: boolean } {
  return { ignoreNamespaces: true };
}

function cannotRead(reader: avro.Type, writer: avro.Type): string | undefined {
  try {
    reader.createResolver(writer, resolverOptions());
    return undefined;
  } catch (error) {
    return (error as Error).message;
  }
}

/** Why `next` may not follow `latest` under `level`, or undefined when it may. */
export function incompatibility(
  level: Compatibility,
  next: avro.Type,
  latest: avro.Type,
): string | undefined {
  if (level === 'BACKWARD' || level === 'FULL') {
    const reason = cannotRead(next, latest);
    if (reason)
      return `BACKWARD: the new schema cannot read data written with the latest: ${reason}`;
  }
  if (level === 'FORWARD' || level === 'FULL') {
    const reason = cannotRead(latest, next);
    if (reason)
      return `FORWARD: the latest schema cannot read data written with the new: ${reason}`;
  }
  return undefined;
}

/**
 * The text that decides a schema's identity: its JSON without insignificant white space, so the
 * same schema pretty-printed differently gets the same id. (avsc's own export is not used: it
 * drops logical types, which would make two different schemas one.)
 */
export function canonicalSchema(schema: string): string {
  parseSchema(schema);
  return JSON.stringify(JSON.parse(schema));
}
