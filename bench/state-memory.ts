/**
 * What sharing one RocksDB database between all stores and tasks of a process saves.
 *
 *   npm run bench -- state-memory [--stores 4] [--partitions 12] [--keys 2000]
 *
 * Writes the same data (stores x partitions x keys, ~200-byte values) once into one shared
 * database (the runtime's StateDb) and once into a database per store partition, each in a
 * fresh child process, and reports the resident memory each process grew by.
 */
import { spawnSync } from 'node:child_process';
import { parseArgs } from 'node:util';
import { fileURLToPath } from 'node:url';

export async function run(args: string[]): Promise<void> {
  const { values } = parseArgs({
    args,
    options: {
      stores: { type: 'string', default: '4' },
      partitions: { type: 'string', default: '12' },
      keys: { type: 'string', default: '2000' },
    },
  });
  const child = fileURLToPath(new URL('./state-memory-child.ts', import.meta.url));
  const results: Record<string, { rssMiB: number; ms: number }> = {};
  for (const mode of ['shared', 'separate']) {
    console.log(`running: ${mode}`);
    const out = spawnSync(
      process.execPath,
      ['--import', 'tsx', child, mode, values.stores!, values.partitions!, values.keys!],
      {
        encoding: 'utf8',
      },
    );
    if (out.status !== 0) throw new Error(out.stderr);
    results[mode] = JSON.parse(out.stdout.trim().split('\n').at(-1)!) as {
      rssMiB: number;
      ms: number;
    };
  }
  const databases = Number(values.stores) * Number(values.partitions);
  console.log(
    `\n# ${values.stores} stores x ${values.partitions} partitions x ${values.keys} keys`,
  );
  console.log('| layout | databases | RSS growth MiB | write ms |');
  console.log('| --- | ---: | ---: | ---: |');
  console.log(
    `| one shared StateDb (baseline) | 1 | ${results.shared!.rssMiB} | ${results.shared!.ms} |`,
  );
  console.log(
    `| a database per store partition | ${databases} | ${results.separate!.rssMiB} | ${results.separate!.ms} |`,
  );
  console.log(
    `ratio separate / shared: ${(results.separate!.rssMiB / results.shared!.rssMiB).toFixed(1)}x`,
  );
}
