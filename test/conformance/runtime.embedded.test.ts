import { rmSync } from 'node:fs';
import { mkdtemp } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { Log } from '../../log/port.ts';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { runtimeSuite } from './runtime.suite.ts';

// One log directory for the whole suite, made when first opened, removed when the run ends.
let dir: string | undefined;
const logDir = async () => (dir ??= await mkdtemp(join(tmpdir(), 'kchat-runtime-log-')));
process.on('exit', () => dir && rmSync(dir, { recursive: true, force: true }));

runtimeSuite({
  name: 'embedded',
  open: async () => EmbeddedLog.open({ dataDir: await logDir(), cleanerIntervalMs: 0 }),
  close: (log: Log) => log.close(),
  childEnv: () => ({ LOG_DIR: dir! }),
  settleMs: 0,
  shared: false,
});
