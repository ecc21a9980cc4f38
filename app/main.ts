/**
 * The program. `npm start` runs every role in one process on the embedded default:
 *
 *   tsx app/main.ts [all]
 *
 * It opens the log and the registry (embedded, or Kafka and a Confluent-compatible registry
 * when KAFKA_BROKERS and SCHEMA_REGISTRY_URL are set), creates the chat topics, registers every
 * event schema, starts the chat roles, and serves HTTP on HOST:PORT: /healthz, /readyz,
 * /metrics and the REST API. SIGTERM or SIGINT closes it within 10 s, releasing PORT and
 * DATA_DIR.
 */
import { once } from 'node:events';
import type { AddressInfo } from 'node:net';
import { ConfigError, readConfig } from './config.ts';
import { openInfrastructure, type Infrastructure } from './infrastructure.ts';
import { bootstrap } from './bootstrap.ts';
import { createHttpServer } from './http.ts';
import { startChat, type Chat } from './chat.ts';
import { createLogger } from '../observability/logger.ts';
import { Metrics } from '../observability/metrics.ts';
import { EmbeddedLog } from '../log/embedded/embedded-log.ts';

const SHUTDOWN_DEADLINE_MS = 9000;
const ROLES = ['all'];

async function main(): Promise<void> {
  const role = process.argv[2] ?? 'all';
  if (!ROLES.includes(role)) {
    console.error(`unknown role "${role}"; this build runs: ${ROLES.join(', ')}`);
    process.exit(2);
  }
  let config;
  try {
    config = readConfig();
  } catch (error) {
    if (error instanceof ConfigError) {
      console.error(error.message);
      process.exit(2);
    }
    throw error;
  }
  const logger = createLogger({ level: config.logLevel });
  const metrics = new Metrics({ role });
  // Set once open; a signal during start-up closes whatever is open by then.
  let infrastructure: Infrastructure | undefined = undefined;
  let chat: Chat | undefined = undefined;
  let ready = false;
  let server: ReturnType<typeof createHttpServer> | undefined = undefined;

  let stopping = false;
  const stop = async (signal: string) => {
    if (stopping) return;
    stopping = true;
    ready = false;
    logger.info({ signal }, 'shutting down');
    const deadline = setTimeout(() => {
      logger.error('shutdown took too long; exiting');
      process.exit(1);
    }, SHUTDOWN_DEADLINE_MS);
    deadline.unref();
    // The chat first: the gateway closes its sockets (1001) and records their DISCONNECTED
    // while the log is still open; then the HTTP server lets go of PORT.
    await chat?.close();
    if (server?.listening) {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server!.close(() => resolve()));
    }
    await infrastructure?.close();
    logger.info('stopped');
    process.exit(0);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  infrastructure = await openInfrastructure(config, logger);
  const { log } = infrastructure;
  if (log instanceof EmbeddedLog) {
    const store = log.store;
    metrics.gauge('kchat_log_write_batches', 'Write batches of the embedded log since start', (g) =>
      g.set(store.writeBatches),
    );
    metrics.gauge(
      'kchat_log_records_written',
      'Records appended to the embedded log since start',
      (g) => g.set(store.recordsWritten),
    );
  }
  const codecs = await bootstrap(log, infrastructure.registry, config.partitions);
  chat = await startChat(config, infrastructure, codecs, logger, metrics);
  server = createHttpServer(
    metrics,
    { notReadyBecause: async () => (ready ? undefined : 'starting or stopping') },
    chat.api.callback(),
  );
  chat.gateway.attach(server);
  // Listen only once everything is open: /healthz answering means the process accepts
  // clients, and a second process on a locked DATA_DIR fails before it listens.
  server.listen(config.port, config.host);
  await once(server, 'listening');
  const address = server.address() as AddressInfo;
  ready = true;
  const shown = config.host === '0.0.0.0' ? '127.0.0.1' : config.host;
  logger.info({ ...infrastructure.describe(), role }, 'ready');
  console.log(
    `kchat listening on http://${shown}:${address.port} (log: ${infrastructure.describe().log})`,
  );
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});
