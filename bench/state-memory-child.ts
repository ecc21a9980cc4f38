// One measurement of bench/state-memory.ts, in a fresh process: prints {rssMiB, ms}.
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { RocksLevel } from '@nxtedition/rocksdb';
import { StateDb } from '../state/state-db.ts';

const [mode, storesArg, partitionsArg, keysArg] = process.argv.slice(2) as [
  string,
  string,
  string,
  string,
];
const stores = Number(storesArg);
const partitions = Number(partitionsArg);
const keys = Number(keysArg);
const value = Buffer.alloc(200, 'v');
const dir = await mkdtemp(join(tmpdir(), 'kchat-state-memory-'));
const writes = (s: number, p: number) =>
  Array.from({ length: keys }, (_, k) => ({ key: `user-${s}-${p}-${k}`, value }));

global.gc?.();
const before = process.memoryUsage().rss;
const started = performance.now();
if (mode === 'shared') {
  const db = await StateDb.open(dir);
  for (let s = 0; s < stores; s++)
    for (let p = 0; p < partitions; p++) await db.write(`store-${s}`, p, writes(s, p));
  const rss = process.memoryUsage().rss;
  console.log(
    JSON.stringify({
      rssMiB: Math.round((rss - before) / 2 ** 20),
      ms: Math.round(performance.now() - started),
    }),
  );
  await db.close();
} else {
  const dbs: Array<RocksLevel<string, Buffer>> = [];
  for (let s = 0; s < stores; s++) {
    for (let p = 0; p < partitions; p++) {
      const db = new RocksLevel<string, Buffer>(join(dir, `${s}-${p}`), {
        keyEncoding: 'utf8',
        valueEncoding: 'buffer',
      });
      await db.open({ createIfMissing: true });
      const batch = db.batch();
      for (const w of writes(s, p)) batch.put(w.key, w.value);
      await batch.write();
      dbs.push(db);
    }
  }
  const rss = process.memoryUsage().rss;
  console.log(
    JSON.stringify({
      rssMiB: Math.round((rss - before) / 2 ** 20),
      ms: Math.round(performance.now() - started),
    }),
  );
  for (const db of dbs) await db.close();
}
await rm(dir, { recursive: true, force: true });
