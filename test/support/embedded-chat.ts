/**
 * The chat's topics and schemas on an embedded log of a fresh directory, as `npm start` makes
 * them (no periodic cleaner): what the gateway and users-actor tests run on.
 */
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { bootstrap, type ChatCodecs } from '../../app/bootstrap.ts';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { EmbeddedSchemaRegistry } from '../../schemas/registry/embedded.ts';

export interface EmbeddedChat {
  dir: string;
  log: EmbeddedLog;
  registry: EmbeddedSchemaRegistry;
  codecs: ChatCodecs;
  /** Closes the registry and the log, then removes the directory. */
  close(): Promise<void>;
}

export async function openEmbeddedChat(partitions: number, prefix: string): Promise<EmbeddedChat> {
  const dir = await mkdtemp(join(tmpdir(), prefix));
  const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
  const registry = await EmbeddedSchemaRegistry.open(log);
  const codecs = await bootstrap(log, registry, partitions);
  return {
    dir,
    log,
    registry,
    codecs,
    async close() {
      await registry.close();
      await log.close();
      await rm(dir, { recursive: true, force: true });
    },
  };
}
