import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { EmbeddedSchemaRegistry, SCHEMAS_TOPIC } from '../../schemas/registry/embedded.ts';
import { SchemaRegistryError } from '../../schemas/registry/port.ts';
import { registryConformance, sharedRegistryConformance } from './registry.suite.ts';

let dir: string;
let log: EmbeddedLog;

sharedRegistryConformance('embedded', async () => {
  const dir = await mkdtemp(join(tmpdir(), 'kchat-registry-'));
  const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
  // One log shared by two registries, as processes share one Kafka cluster.
  return {
    log,
    close: async () => {
      await log.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
});

registryConformance(
  'embedded',
  async () => {
    dir = await mkdtemp(join(tmpdir(), 'kchat-registry-'));
    log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    return EmbeddedSchemaRegistry.open(log);
  },
  async () => {
    await log.close();
    await rm(dir, { recursive: true, force: true });
  },
);

describe('embedded schema registry', () => {
  it('keeps subjects, versions and ids across a restart', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-registry-'));
    try {
      const schema = (fields: string[]) =>
        JSON.stringify({
          type: 'record',
          name: 'R',
          fields: fields.map((name) => ({ name, type: 'string', default: '' })),
        });
      let log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
      let registry = await EmbeddedSchemaRegistry.open(log);
      const a1 = await registry.register('a-value', schema(['x']));
      const a2 = await registry.register('a-value', schema(['x', 'y']));
      const b1 = await registry.register('b-value', schema(['z']));
      await log.close();

      log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
      registry = await EmbeddedSchemaRegistry.open(log);
      assert.deepEqual(
        [
          (await registry.latest('a-value'))?.version,
          (await registry.latest('a-value'))?.id,
          (await registry.latest('b-value'))?.id,
        ],
        [2, a2, b1],
      );
      assert.equal(
        await registry.register('a-value', schema(['x'])),
        a1,
        'an old version keeps its id',
      );
      const c1 = await registry.register('c-value', schema(['w']));
      assert.equal(new Set([a1, a2, b1, c1]).size, 4, 'one id per schema');
      await log.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it("refuses to start on another registry's topic, and writes nothing to it", async () => {
    // Confluent's registry keeps its schemas in a topic of the same name (keys and values as
    // it writes them): a process left without SCHEMA_REGISTRY_URL on such a cluster must not
    // read them as its own or add records of its own format to them.
    const dir = await mkdtemp(join(tmpdir(), 'kchat-registry-'));
    const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    try {
      await log.admin.createTopics([{ topic: SCHEMAS_TOPIC, partitions: 1 }]);
      const producer = await log.producer();
      await producer.send([
        {
          topic: SCHEMAS_TOPIC,
          partition: 0,
          key: Buffer.from('{"keytype":"NOOP","magic":0}'),
          value: null,
        },
        {
          topic: SCHEMAS_TOPIC,
          partition: 0,
          key: Buffer.from('{"keytype":"SCHEMA","subject":"a-value","version":1,"magic":1}'),
          value: Buffer.from(
            '{"subject":"a-value","version":1,"id":1,"schema":"\\"string\\"","deleted":false}',
          ),
        },
      ]);
      await producer.close();
      await assert.rejects(
        () => EmbeddedSchemaRegistry.open(log),
        (error: unknown) =>
          error instanceof SchemaRegistryError && /SCHEMA_REGISTRY_URL/.test(error.message),
      );
      assert.deepEqual(await log.admin.watermarks(SCHEMAS_TOPIC), [
        { partition: 0, low: 0, high: 2 },
      ]);
    } finally {
      await log.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
