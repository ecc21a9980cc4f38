/**
 * `_schemas` as the embedded registry wrote it before ids were derived from the schema
 * (8513b8d until 3ebd8f0): key `<subject>/<version>`, ids counted 1, 2, 3 across subjects.
 * The registry keeps those ids ("Ids given before ids were derived from the schema stay as
 * they were"), so it must still start on such a topic, not call it another registry's.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { EmbeddedSchemaRegistry, SCHEMAS_TOPIC } from '../../schemas/registry/embedded.ts';

describe('embedded schema registry: records of its own older format', () => {
  it('starts on a _schemas topic written before ids came from the schema, and keeps their ids', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-registry-old-'));
    const schema = (name: string) =>
      JSON.stringify({ type: 'record', name, fields: [{ name: 'x', type: 'string' }] });
    try {
      const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
      await log.admin.createTopics([
        { topic: SCHEMAS_TOPIC, partitions: 1, config: { 'cleanup.policy': 'compact' } },
      ]);
      const producer = await log.producer();
      // As 8513b8d's register wrote them: the first schema of b-value got id 2, version 1.
      const old = [
        { subject: 'a-value', version: 1, id: 1, schema: schema('A') },
        { subject: 'b-value', version: 1, id: 2, schema: schema('B') },
      ];
      await producer.send(
        old.map((r) => ({
          topic: SCHEMAS_TOPIC,
          partition: 0,
          key: Buffer.from(`${r.subject}/${r.version}`),
          value: Buffer.from(JSON.stringify(r)),
        })),
      );
      await producer.close();
      try {
        const registry = await EmbeddedSchemaRegistry.open(log);
        assert.equal(await registry.schemaById(2), schema('B'));
        assert.equal((await registry.latest('b-value'))?.id, 2);
        await registry.close();
      } finally {
        await log.close();
      }
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });
});
