// The Avro schemas of every event (schemas/avro/*.avsc, the source of truth) and the one set
// of avsc options the whole project parses them with, so that decoded values have the shapes
// of schemas/types.generated.ts.
import { readFileSync } from 'node:fs';
import avro from 'avsc';
import type { Schema, Type } from 'avsc';

/**
 * Every top-level schema, in the order of DESIGN.md's topic table: `schemas/avro/<name>.avsc`
 * holds the value schema `chat.v1.<name>`.
 */
export const schemaNames = [
  'ConnectionEvent',
  'InboxCommand',
  'UserCommand',
  'GroupMessage',
  'GroupCommand',
  'GroupEvent',
  'CommandReply',
  'Delivery',
  'Account',
  'GatewayHeartbeat',
  'PushRequest',
  'InboxEntry',
] as const;

export type SchemaName = (typeof schemaNames)[number];

export type AvroTypeOptions = NonNullable<Parameters<typeof avro.Type.forSchema>[1]>;

/**
 * The avsc `Type.forSchema` options of the whole project (codec, registry adapters, tests).
 * A function, not a shared object: avsc stores its registry of named types in the options it
 * is given, so options reused across two schemas that define the same named type fail.
 *
 * - `wrapUnions: 'auto'` (avsc's default, spelled out): a union with at most one branch of
 *   each kind, such as `["null", T]`, is unwrapped (`T | null`); a union of several records
 *   is wrapped, its value `{ "chat.v1.<Record>": {...} }` (Avro's JSON encoding of unions).
 *   See `branchOf`.
 * - no `logicalTypes`: `long` with logicalType `timestamp-millis` decodes to a number of
 *   milliseconds since the Unix epoch, not a `Date`.
 * - `omitRecordMethods`: decoded records carry no avsc methods (they are still instances of
 *   a class per record, so compare them with `assert.deepEqual` or `type.compare`, not
 *   `deepStrictEqual`).
 */
export function avroTypeOptions(): AvroTypeOptions {
  return { wrapUnions: 'auto', omitRecordMethods: true };
}

/** The schema of `schemas/avro/<name>.avsc`, parsed from disk on every call. */
export function loadSchema(name: SchemaName): Schema {
  return JSON.parse(
    readFileSync(new URL(`./avro/${name}.avsc`, import.meta.url), 'utf8'),
  ) as Schema;
}

/** The avsc type of `schemas/avro/<name>.avsc`, with `avroTypeOptions()`. */
export function loadType(name: SchemaName): Type {
  return avro.Type.forSchema(loadSchema(name), avroTypeOptions());
}

/**
 * The branches of a wrapped union value (`{ "chat.v1.Receipt": {...} } | ...`) as a
 * discriminated union `{ name: "chat.v1.Receipt", value: Receipt } | ...`, for `switch`.
 */
export type Branch<U> = U extends null
  ? never
  : { [K in keyof U]: { readonly name: K; readonly value: U[K] } }[keyof U];

/**
 * Unwraps a wrapped union value so that a `switch` on `name` narrows `value`:
 *
 * ```ts
 * const { name, value } = branchOf(command.entry);
 * switch (name) {
 *   case fullNames.Receipt: return value.status; // value: Receipt
 * }
 * ```
 */
export function branchOf<U extends object>(union: U): Branch<U> {
  const names = Object.keys(union);
  const name = names[0];
  if (names.length !== 1 || name === undefined) {
    throw new TypeError(`not a wrapped union value: it has keys [${names.join(', ')}]`);
  }
  return { name, value: (union as Record<string, unknown>)[name] } as Branch<U>;
}
