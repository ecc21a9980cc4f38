/**
 * Avro schema compatibility, decided by avsc's resolver.
 *
 * - BACKWARD: the new schema, as a reader, resolves data written with the latest one (consumers
 *   can be upgraded first). Adding a field with a default passes; adding one without a default
 *   or changing a field's type fails; removing any field passes.
 * - FORWARD: the latest schema, as a reader, resolves data written with the new one (producers
 *   can be upgraded first). Removing a field without a default fails.
 * - FULL: both. In a rolling deploy, gateways (producers) and processors (consumers) are
 *   upgraded in any order, so a change must be safe both ways.
 * - *_TRANSITIVE: the same against every earlier version of the subject, not only the latest.
 *   This project's subjects use FULL_TRANSITIVE: topics are replayed from their start (the
 *   group events are kept forever, changelogs and compacted tables hold records of any age), so
 *   a reader must resolve data written with any version, and one version removing a field that
 *   a later one adds back with another type would pass FULL step by step and break that.
 */
import avro from 'avsc';
import { InvalidSchemaError } from './port.ts';

export type Compatibility =
  | 'BACKWARD'
  | 'FORWARD'
  | 'FULL'
  | 'BACKWARD_TRANSITIVE'
  | 'FORWARD_TRANSITIVE'
  | 'FULL_TRANSITIVE'
  | 'NONE';

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

/**
 * Why `next` may not follow the subject's versions (oldest first) under `level`, or undefined
 * when it may: checked against the latest, or against each for a transitive level.
 */
export function incompatibility(
  level: Compatibility,
  next: avro.Type,
  versions: readonly avro.Type[],
): string | undefined {
  if (level === 'NONE' || versions.length === 0) return undefined;
  const transitive = level.endsWith('_TRANSITIVE');
  const rule = level.replace('_TRANSITIVE', '');
  const checked = transitive ? versions : versions.slice(-1);
  for (let i = checked.length - 1; i >= 0; i--) {
    const earlier = checked[i]!;
    const which = transitive
      ? `version ${versions.length - checked.length + i + 1} of ${versions.length}`
      : 'the latest';
    if (rule === 'BACKWARD' || rule === 'FULL') {
      const reason = cannotRead(next, earlier);
      if (reason)
        return `${level}: the new schema cannot read data written with ${which}: ${reason}`;
    }
    if (rule === 'FORWARD' || rule === 'FULL') {
      const reason = cannotRead(earlier, next);
      if (reason)
        return `${level}: ${which} cannot read data written with the new schema: ${reason}`;
    }
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
