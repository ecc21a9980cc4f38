/**
 * `npm run bench -- <name> [options]`: runs one benchmark and prints its figures with the
 * command line that produced them. Benchmarks: log, runtime, state-memory, chat, codec, replay.
 */
const [name, ...args] = process.argv.slice(2);
const benches: Record<string, () => Promise<{ run(args: string[]): Promise<void> }>> = {
  log: () => import('./log.ts'),
  runtime: () => import('./runtime.ts'),
  'state-memory': () => import('./state-memory.ts'),
  chat: () => import('./chat.ts'),
  codec: () => import('./codec.ts'),
  replay: () => import('./replay.ts'),
};
const load = name ? benches[name] : undefined;
if (!load) {
  console.error(`usage: npm run bench -- <${Object.keys(benches).join('|')}> [options]`);
  process.exit(2);
}
console.log(`# command: npm run bench -- ${[name, ...args].join(' ')}`);
console.log(
  `# ${new Date().toISOString()} node ${process.version}, ${(await import('node:os')).cpus().length} cores`,
);
await (await load()).run(args);
process.exit(0);
