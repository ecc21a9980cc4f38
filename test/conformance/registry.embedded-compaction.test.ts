/**
 * The embedded registry numbered a subject's versions by the order of `_schemas`, but
 * that topic is compacted: a duplicate record of an older version written after a newer one
 * (two processes registering at once, one with a stale view) moves the older version past the
 * newer once the cleaner has run. Versions now go by the number their writer gave them (found
 * by a review helper, session 18).
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import {
  EmbeddedSchemaRegistry,
  SCHEMAS_TOPIC,
  schemaIdOf,
} from '../../schemas/registry/embedded.ts';
import { canonicalSchema } from '../../schemas/registry/compatibility.ts';

const v1 = JSON.stringify({
  type: 'record',
  name: 'R',
  fields: [{ name: 'x', type: 'string' }],
});
const v2 = JSON.stringify({
  type: 'record',
  name: 'R',
  fields: [
    { name: 'x', type: 'string' },
    { name: 'y', type: 'string', default: '' },
  ],
});

describe('embedded registry: versions across compaction of _schemas', function () {
  this.timeout(20_000);

  it("a subject's latest version stays the latest after the cleaner runs", async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-registry-compact-'));
    const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    try {
      const registry = await EmbeddedSchemaRegistry.open(log);
      const id1 = await registry.register('s-value', v1);
      const id2 = await registry.register('s-value', v2);
      // A second process that read _schemas before id1 was written registers v1 too: its
      // record, as its doRegister writes it, lands after v2's.
      const c1 = canonicalSchema(v1);
      assert.equal(schemaIdOf(c1), id1);
      const producer = await log.producer();
      await producer.send([
        {
          topic: SCHEMAS_TOPIC,
          partition: 0,
          key: Buffer.from(`s-value/${id1}`),
          value: Buffer.from(
            JSON.stringify({ subject: 's-value', version: 1, id: id1, schema: c1 }),
          ),
        },
      ]);
      await producer.close();
      assert.equal((await registry.latest('s-value'))?.id, id2, 'before the cleaner: v2');
      const fresh = await EmbeddedSchemaRegistry.open(log);
      assert.equal((await fresh.latest('s-value'))?.id, id2, 'a fresh process, before the cleaner');
      await (log as unknown as { clean(): Promise<void> }).clean();
      const afterClean = await EmbeddedSchemaRegistry.open(log);
      assert.deepEqual(
        await afterClean.latest('s-value'),
        await fresh.latest('s-value'),
        'after the cleaner, a process starting sees another latest version',
      );
      await Promise.all([registry.close(), fresh.close(), afterClean.close()]);
    } finally {
      await log.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
