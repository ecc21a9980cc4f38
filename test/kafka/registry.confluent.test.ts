import assert from 'node:assert/strict';
import { randomUUID } from 'node:crypto';
import { isRetriable } from '../../processors/runtime/errors.ts';
import { loadType } from '../../schemas/avro.ts';
import { DecodeError, TopicCodec } from '../../schemas/codec.ts';
import { ConfluentSchemaRegistry } from '../../schemas/registry/confluent.ts';
import { registryConformance } from '../conformance/registry.suite.ts';

registryConformance(
  `confluent (${process.env.SCHEMA_REGISTRY_URL})`,
  async () => new ConfluentSchemaRegistry(process.env.SCHEMA_REGISTRY_URL!),
  async () => undefined,
);

describe(`confluent registry (${process.env.SCHEMA_REGISTRY_URL}): ids of other schema types`, () => {
  it('a record written with the id of a JSON Schema is a bad record (dead-lettered), not a registry to wait for', async () => {
    const url = process.env.SCHEMA_REGISTRY_URL!.replace(/\/+$/, '');
    // What a shared registry holds for another team, or a JSON serializer pointed at our topic.
    const subject = `kchat-test-json-${randomUUID()}-value`;
    const registered = await fetch(`${url}/subjects/${subject}/versions`, {
      method: 'POST',
      headers: { 'content-type': 'application/vnd.schemaregistry.v1+json' },
      body: JSON.stringify({
        schemaType: 'JSON',
        schema: JSON.stringify({
          $schema: 'http://json-schema.org/draft-07/schema#',
          type: 'object',
          properties: { userId: { type: 'string' } },
        }),
      }),
    });
    assert.equal(registered.status, 200, await registered.clone().text());
    const { id } = (await registered.json()) as { id: number };
    const registry = new ConfluentSchemaRegistry(url);
    const codec = new TopicCodec('chat.accounts', -1, loadType('Account'), registry);
    const record = Buffer.alloc(5 + 4);
    record.writeUInt32BE(id, 1);
    const error = await codec.decode(record).then(
      () => undefined,
      (e: unknown) => e,
    );
    assert.ok(error instanceof DecodeError, String(error));
    assert.ok(!isRetriable(error));
  });
});
