/**
 * The schema registry port's conformance suite, with the codec on top: run on the embedded
 * registry (registry.embedded.test.ts) and on a real Confluent-compatible registry through the
 * Confluent adapter (test/kafka/registry.confluent.test.ts).
 */
import assert from 'node:assert/strict';
import type avro from 'avsc';
import {
  IncompatibleSchemaError,
  InvalidSchemaError,
  RegistryUnavailableError,
  UnknownSchemaError,
  type SchemaRegistry,
} from '../../schemas/registry/port.ts';
import { Codecs, DecodeError, EncodeError } from '../../schemas/codec.ts';
import { uniqueName } from '../support/log-helpers.ts';
import { isRetriable } from '../../processors/runtime/errors.ts';
import type { Log } from '../../log/port.ts';
import { EmbeddedSchemaRegistry } from '../../schemas/registry/embedded.ts';

const v1: avro.Schema = {
  type: 'record',
  name: 'Note',
  namespace: 'test.v1',
  fields: [
    { name: 'id', type: 'string' },
    { name: 'text', type: 'string' },
  ],
};
const v2WithDefault: avro.Schema = {
  ...v1,
  fields: [...(v1 as { fields: object[] }).fields, { name: 'lang', type: 'string', default: 'en' }],
} as avro.Schema;
const withoutDefault: avro.Schema = {
  ...v1,
  fields: [...(v1 as { fields: object[] }).fields, { name: 'lang', type: 'string' }],
} as avro.Schema;
const removedText: avro.Schema = { ...v1, fields: [{ name: 'id', type: 'string' }] } as avro.Schema;
const retyped: avro.Schema = {
  ...v1,
  fields: [
    { name: 'id', type: 'string' },
    { name: 'text', type: 'int' },
  ],
} as avro.Schema;

const json = (s: avro.Schema) => JSON.stringify(s);

export function registryConformance(
  adapter: string,
  open: () => Promise<SchemaRegistry>,
  close: () => Promise<void>,
) {
  describe(`schema registry conformance: ${adapter}`, function () {
    let registry: SchemaRegistry;
    before(async () => {
      registry = await open();
    });
    after(close);

    it('registers a schema once: the same schema again gets the same id', async () => {
      const subject = `${uniqueName('notes')}-value`;
      const id = await registry.register(subject, json(v1));
      assert.equal(await registry.register(subject, json(v1)), id);
      // The same schema written with other whitespace is the same schema.
      assert.equal(await registry.register(subject, JSON.stringify(v1, null, 2)), id);
      const latest = await registry.latest(subject);
      assert.equal(latest?.id, id);
      assert.equal(latest?.version, 1);
      assert.deepEqual(JSON.parse(await registry.schemaById(id)), JSON.parse(latest!.schema));
      assert.equal(await registry.latest(`${uniqueName('none')}-value`), undefined);
    });

    it('accepts a field added with a default; old data reads with the new schema and new data with the old', async () => {
      const topic = uniqueName('notes');
      const codecs = new Codecs(registry);
      const oldCodec = await codecs.forTopic<{ id: string; text: string }>(topic, v1);
      const newCodec = await codecs.forTopic<{ id: string; text: string; lang: string }>(
        topic,
        v2WithDefault,
      );
      assert.notEqual(newCodec.schemaId, oldCodec.schemaId);
      assert.equal((await registry.latest(`${topic}-value`))?.version, 2);

      const oldBytes = oldCodec.encode({ id: 'n1', text: 'hello' });
      assert.equal(oldBytes[0], 0, 'magic byte');
      assert.equal(oldBytes.readUInt32BE(1), oldCodec.schemaId, 'schema id, big-endian');
      assert.deepEqual(
        { ...(await newCodec.decode(oldBytes)) },
        { id: 'n1', text: 'hello', lang: 'en' },
      );

      const newBytes = newCodec.encode({ id: 'n2', text: 'bonjour', lang: 'fr' });
      assert.deepEqual({ ...(await oldCodec.decode(newBytes)) }, { id: 'n2', text: 'bonjour' });
    });

    it('accepts a change of namespace alone, as Avro compares names without it; data reads both ways', async () => {
      // Avro's SchemaCompatibility (which Confluent's registry applies) matches named types by
      // their short name: a registry that accepts the change leaves readers that refuse it
      // dead-lettering every record written with it.
      const topic = uniqueName('notes');
      const codecs = new Codecs(registry);
      const oldCodec = await codecs.forTopic<{ id: string; text: string }>(topic, v1);
      const moved = { ...(v1 as object), namespace: 'test.v2' } as avro.Schema;
      const newCodec = await codecs.forTopic<{ id: string; text: string }>(topic, moved);
      assert.equal((await registry.latest(`${topic}-value`))?.version, 2);
      const fromOld = oldCodec.encode({ id: 'n1', text: 'old' });
      assert.deepEqual({ ...(await newCodec.decode(fromOld)) }, { id: 'n1', text: 'old' });
      const fromNew = newCodec.encode({ id: 'n2', text: 'new' });
      assert.deepEqual({ ...(await oldCodec.decode(fromNew)) }, { id: 'n2', text: 'new' });
    });

    for (const [change, schema] of [
      ['adding a field without a default', withoutDefault],
      ['removing a field without a default', removedText],
      ["changing a field's type", retyped],
    ] as const) {
      it(`refuses ${change}, naming the subject and the incompatibility`, async () => {
        const subject = `${uniqueName('notes')}-value`;
        const id = await registry.register(subject, json(v1));
        await assert.rejects(
          () => registry.register(subject, json(schema)),
          (error: unknown) => {
            assert.ok(error instanceof IncompatibleSchemaError, String(error));
            assert.equal(error.subject, subject);
            assert.match(error.message, new RegExp(subject));
            assert.ok(error.reason.length > 0);
            return true;
          },
        );
        assert.equal((await registry.latest(subject))?.id, id, 'the subject is unchanged');
      });
    }

    it('checks a new version against every earlier one (FULL_TRANSITIVE): a field removed, then added back with another type, is refused', async () => {
      // Step by step each change is FULL-compatible with the version before it; but a topic
      // replayed from its start holds v1's records, which v3 cannot read (a string as a long).
      const withNote = (type: string) =>
        ({
          ...(v1 as object),
          fields: [
            ...(v1 as { fields: object[] }).fields,
            { name: 'note', type, default: type === 'string' ? '' : 0 },
          ],
        }) as avro.Schema;
      const subject = `${uniqueName('notes')}-value`;
      await registry.register(subject, json(withNote('string')));
      const v2 = await registry.register(subject, json(v1));
      await assert.rejects(
        () => registry.register(subject, json(withNote('long'))),
        (error: unknown) => {
          assert.ok(error instanceof IncompatibleSchemaError, String(error));
          assert.equal(error.subject, subject);
          return true;
        },
      );
      assert.equal((await registry.latest(subject))?.id, v2, 'the subject is unchanged');
      // The field back with its first type is fine.
      await registry.register(subject, json(withNote('string')));
    });

    it('refuses text that is not an Avro schema', async () => {
      await assert.rejects(
        () =>
          registry.register(
            `${uniqueName('bad')}-value`,
            '{"type":"record","name":"X","fields":[{"name":"a","type":"nope"}]}',
          ),
        InvalidSchemaError,
      );
    });

    it('answers an unknown schema id with a clear error, and the codec turns it into a DecodeError', async () => {
      await assert.rejects(() => registry.schemaById(987654), UnknownSchemaError);
      const codec = await new Codecs(registry).forTopic(uniqueName('notes'), v1);
      const forged = codec.encode({ id: 'x', text: 'y' });
      forged.writeUInt32BE(987654, 1);
      await assert.rejects(
        () => codec.decode(forged),
        (e: unknown) => e instanceof DecodeError && /987654/.test(e.message),
      );
    });

    it('makes a registry it cannot ask a retriable error, not a bad record', async () => {
      const topic = uniqueName('notes');
      const newer = await new Codecs(registry).forTopic<object>(topic, v2WithDefault);
      // A reader of the older schema meets a record of the newer, while the registry is down.
      let down = true;
      const flaky: SchemaRegistry = Object.create(registry, {
        schemaById: {
          value: async (id: number) => {
            if (down) throw new Error('connect ECONNREFUSED 127.0.0.1:8081');
            return registry.schemaById(id);
          },
        },
      });
      const reader = await new Codecs(flaky).forTopic<object>(topic, v1);
      const bytes = newer.encode({ id: 'n', text: 't', lang: 'fr' });
      await assert.rejects(
        () => reader.decode(bytes),
        (e: unknown) =>
          e instanceof RegistryUnavailableError && isRetriable(e) && !(e instanceof DecodeError),
      );
      down = false;
      assert.deepEqual({ ...(await reader.decode(bytes)) }, { id: 'n', text: 't' });
    });

    it('turns malformed records into DecodeErrors and invalid values into EncodeErrors', async () => {
      const codec = await new Codecs(registry).forTopic<{ id: string; text: string }>(
        uniqueName('notes'),
        v1,
      );
      const good = codec.encode({ id: 'x', text: 'some text' });
      await assert.rejects(() => codec.decode(Buffer.from([0, 0])), DecodeError);
      const wrongMagic = Buffer.from(good);
      wrongMagic[0] = 1;
      await assert.rejects(() => codec.decode(wrongMagic), /magic byte/);
      await assert.rejects(() => codec.decode(good.subarray(0, good.length - 3)), DecodeError);
      assert.throws(
        () => codec.encode({ id: 'x', text: 42 } as unknown as { id: string; text: string }),
        (e: unknown) => e instanceof EncodeError && e.paths.includes('text'),
      );
    });

    it('encodes values of any size, each into bytes of its own', async () => {
      const codec = await new Codecs(registry).forTopic<{ id: string; text: string }>(
        uniqueName('notes'),
        v1,
      );
      const small = codec.encode({ id: 'a', text: 'short' });
      // Past the codec's 64 KiB scratch buffer, and then past twice that.
      const large = { id: 'b', text: 'x'.repeat(100_000) };
      const larger = { id: 'c', text: 'é'.repeat(200_000) };
      const [largeBytes, largerBytes] = [codec.encode(large), codec.encode(larger)];
      const again = codec.encode({ id: 'd', text: 'after' });
      // avsc decodes records into instances of a class of its own: compare their fields.
      const decoded = async (bytes: Buffer) => ({ ...(await codec.decode(bytes)) });
      assert.deepEqual(await decoded(small), { id: 'a', text: 'short' });
      assert.deepEqual(await decoded(largeBytes), large);
      assert.deepEqual(await decoded(largerBytes), larger);
      assert.deepEqual(await decoded(again), { id: 'd', text: 'after' });
    });
  });
}

/**
 * The embedded registry shared by several processes (every role on Kafka without
 * SCHEMA_REGISTRY_URL): two instances on one log, each standing for a process.
 */
export function sharedRegistryConformance(
  adapter: string,
  openLog: () => Promise<{ log: Log; close(): Promise<void> }>,
) {
  describe(`embedded schema registry shared by two processes: ${adapter}`, function () {
    this.timeout(60_000);

    it('gives one schema one id in every process, and resolves ids the other registered', async () => {
      const { log, close } = await openLog();
      try {
        const [a, b] = [
          await EmbeddedSchemaRegistry.open(log),
          await EmbeddedSchemaRegistry.open(log),
        ];
        const subject = `${uniqueName('shared')}-value`;
        const other = `${uniqueName('other')}-value`;
        // Side by side: the same schema from both, and different subjects from each.
        const [fromA, fromB, otherFromB] = await Promise.all([
          a.register(subject, json(v1)),
          b.register(subject, json(v1)),
          b.register(other, json(retyped)),
        ]);
        assert.equal(fromA, fromB, 'one schema, one id, whichever process registered it');
        assert.notEqual(fromA, otherFromB);
        assert.equal(
          JSON.parse(await a.schemaById(otherFromB)).fields[1].type,
          'int',
          'a reads what b registered',
        );
        const next = await a.register(subject, json(v2WithDefault));
        assert.deepEqual(await b.latest(subject), {
          subject,
          version: 2,
          id: next,
          schema: (await a.latest(subject))!.schema,
        });
        await assert.rejects(b.register(subject, json(removedText)), IncompatibleSchemaError);
        await Promise.all([a.close(), b.close()]);
      } finally {
        await close();
      }
    });
  });
}
