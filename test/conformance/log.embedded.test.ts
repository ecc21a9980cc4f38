import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { logConformance } from './log.suite.ts';

let dir: string;
let log: EmbeddedLog;

logConformance(
  'embedded',
  async () => {
    dir = await mkdtemp(join(tmpdir(), 'kchat-log-'));
    log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    return { log, settleMs: 0 };
  },
  async () => {
    await log.close();
    await rm(dir, { recursive: true, force: true });
  },
);
