/**
 * The counting topology as its own process, for crash tests:
 *   tsx test/support/counting-app.ts
 * Environment: LOG_DIR (embedded log) or KAFKA_BROKERS; STATE_DIR; APP_ID; INPUT; OUTPUT;
 * EXPECTED (exit 0 once that many input records are committed; unset: run until a signal);
 * GUARANTEE; COMMIT_INTERVAL_MS; CRASH_AT=<stage>:<n> (SIGKILL itself at the n-th time a commit
 * reaches that stage). Prints "running" once started and "commit" after each task commit.
 */
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { KafkaLog } from '../../log/kafka/kafka-log.ts';
import type { Log } from '../../log/port.ts';
import { StateDb } from '../../state/state-db.ts';
import {
  StreamsRuntime,
  type CommitStage,
  type ProcessingGuarantee,
} from '../../processors/runtime/runtime.ts';
import { createLogger } from '../../observability/logger.ts';
import { countingTopology } from './counting.ts';

const env = process.env;
const logger = createLogger({ name: 'counting-app', level: env.LOG_LEVEL ?? 'warn' });
const log: Log = env.KAFKA_BROKERS
  ? new KafkaLog({ brokers: env.KAFKA_BROKERS.split(','), clientId: 'counting-app' })
  : await EmbeddedLog.open({ dataDir: env.LOG_DIR!, cleanerIntervalMs: 0 });
const stateDb = await StateDb.open(env.STATE_DIR!);
const [crashStage, crashAt] = (env.CRASH_AT ?? '').split(':') as [
  CommitStage | '',
  string | undefined,
];
let reached = 0;
const runtime = new StreamsRuntime(countingTopology(env.INPUT!, env.OUTPUT!), {
  applicationId: env.APP_ID!,
  log,
  stateDb,
  guarantee: (env.GUARANTEE as ProcessingGuarantee | undefined) ?? 'exactly_once',
  commitIntervalMs: Number(env.COMMIT_INTERVAL_MS ?? 50),
  logger,
  onCommitStage: (stage) => {
    if (stage === crashStage && ++reached === Number(crashAt)) process.kill(process.pid, 'SIGKILL');
    if (stage === 'flushed') process.stdout.write('commit\n');
  },
});

const stop = async () => {
  await runtime.close();
  await log.close();
  await stateDb.close();
  process.exit(0);
};
process.on('SIGTERM', () => void stop());
process.on('SIGINT', () => void stop());

await runtime.start();
console.log('running');

if (env.EXPECTED) {
  const expected = Number(env.EXPECTED);
  const timer = setInterval(async () => {
    const committed = await log.admin.committedOffsets(env.APP_ID!, env.INPUT!);
    const done = committed.reduce((n, o) => n + Math.max(0, o.offset), 0);
    if (done >= expected) {
      clearInterval(timer);
      await stop();
    }
  }, 100);
}
