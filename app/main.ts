/**
 * The program. `npm start` runs every role in one process on the embedded default; each role
 * also runs alone, against Kafka (an embedded log belongs to one process):
 *
 *   node --import tsx app/main.ts [all | api | gateway | processor users]
 *   npm start -- gateway
 *
 * (tsx loaded as a module, not its CLI: the CLI relays a signal to the program and kills it
 * when a busy event loop does not confirm within milliseconds, which made SIGTERM a SIGKILL.)
 *
 * It opens the log and the registry (embedded, or Kafka and a Confluent-compatible registry
 * when KAFKA_BROKERS and SCHEMA_REGISTRY_URL are set), creates the chat topics, registers every
 * event schema, starts its roles, and serves HTTP on HOST:PORT: /healthz, /readyz,
 * /metrics, and the REST API (api) and /v1/ws (gateway) when it runs them. SIGTERM or SIGINT closes it within 10 s, releasing PORT and
 * DATA_DIR.
 */
import { once } from 'node:events';
import type { IncomingMessage, ServerResponse } from 'node:http';
import type { AddressInfo } from 'node:net';
import type { Duplex } from 'node:stream';
import { ConfigError, readConfig, redactUrl } from './config.ts';
import { openInfrastructure, type Infrastructure } from './infrastructure.ts';
import { bootstrap } from './bootstrap.ts';
import { createHttpServer, json } from './http.ts';
import { WS_PATH } from '../gateway/gateway.ts';
import { HandshakeRefusal, refuseUpgrade } from '../gateway/authentication.ts';
import { parseRole, ROLES, startRoles, type Roles } from './roles.ts';
import { createLogger } from '../observability/logger.ts';
import { Metrics } from '../observability/metrics.ts';
import { EmbeddedLog } from '../log/embedded/embedded-log.ts';

const SHUTDOWN_DEADLINE_MS = 9000;

/** Set by the first SIGTERM or SIGINT: a start-up it interrupts fails, and that is no error. */
let stopping = false;

async function main(): Promise<void> {
  const role = parseRole(process.argv.slice(2));
  if (role === undefined) {
    console.error(
      `unknown role "${process.argv.slice(2).join(' ')}"; this build runs: ${ROLES.join(', ')}`,
    );
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
  if (role !== 'all' && !config.kafkaBrokers) {
    console.error(
      `the ${role} role runs alone only against Kafka (set KAFKA_BROKERS); without it, run all`,
    );
    process.exit(2);
  }
  // DATA_DIR holds password hashes and every message: what the process creates there is its
  // own user's alone (files 0600, directories 0700), as jwt-secret always was.
  process.umask(0o077);
  const logger = createLogger({ level: config.logLevel });
  const metrics = new Metrics({ role: role.replace(' ', '-') });
  // Set once open; a signal during start-up closes whatever is open by then.
  let infrastructure: Infrastructure | undefined = undefined;
  let roles: Roles | undefined = undefined;
  let ready = false;
  let server: ReturnType<typeof createHttpServer> | undefined = undefined;

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
    // The roles first: a gateway closes its sockets (1001) and records their DISCONNECTED
    // while the log is still open; then the HTTP server lets go of PORT.
    // A step that fails (a log that can no longer write cannot close cleanly) is logged and
    // the next one still runs: the process exits, releasing PORT and DATA_DIR, either way.
    const step = (what: string, run: () => Promise<void> | undefined) =>
      Promise.resolve()
        .then(run)
        .then(
          () => true,
          (err: unknown) => {
            logger.error({ err }, `${what} did not close cleanly`);
            return false;
          },
        );
    let clean = await step('the roles', () => roles?.close());
    if (server?.listening) {
      server.closeAllConnections();
      await new Promise<void>((resolve) => server!.close(() => resolve()));
    }
    clean = (await step('the log and the registry', () => infrastructure?.close())) && clean;
    logger.info('stopped');
    process.exit(clean ? 0 : 1);
  };
  process.on('SIGTERM', () => void stop('SIGTERM'));
  process.on('SIGINT', () => void stop('SIGINT'));

  // PORT first: a process that cannot have it (another one holds it) fails before it joins a
  // consumer group or heartbeats as its gateway, which would disturb the process that does
  // hold it. Until the roles run, every API request, handshake, /healthz and /readyz answers
  // 503 `unavailable`: /healthz answers 200 once the process accepts clients.
  const serving: { api?: (request: IncomingMessage, response: ServerResponse) => void } = {};
  server = createHttpServer(
    metrics,
    {
      notReadyBecause: async () => (ready ? roles?.notReadyBecause() : 'starting or stopping'),
      deadBecause: () => (ready ? infrastructure?.deadBecause() : 'starting or stopping'),
    },
    {
      api: role === 'all' || role === 'api' ? (q, r) => (serving.api ?? starting)(q, r) : undefined,
      webSocketPath: role === 'all' || role === 'gateway' ? WS_PATH : undefined,
    },
  );
  const refuseWhileStarting = (_request: IncomingMessage, socket: Duplex) =>
    refuseUpgrade(socket, new HandshakeRefusal(503, 'unavailable', 'the server is starting'));
  server.on('upgrade', refuseWhileStarting);
  server.listen(config.port, config.host);
  await once(server, 'listening');

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
  const codecs = await bootstrap(log, infrastructure.registry, config.partitions, logger);
  roles = await startRoles(role, config, infrastructure, codecs, logger, metrics);
  serving.api = roles.api?.callback();
  server.off('upgrade', refuseWhileStarting);
  roles.gateway?.attach(server);
  const address = server.address() as AddressInfo;
  ready = true;
  // A wildcard address is reached on loopback; an IPv6 literal goes in brackets (RFC 3986).
  const host = { '0.0.0.0': '127.0.0.1', '::': '::1' }[config.host] ?? config.host;
  const shown = host.includes(':') ? `[${host}]` : host;
  logger.info({ ...infrastructure.describe(), role }, 'ready');
  console.log(
    `kchat ${role} listening on http://${shown}:${address.port} (log: ${infrastructure.describe().log})`,
  );
}

/** A request that comes before the roles run. */
function starting(request: IncomingMessage, response: ServerResponse): void {
  request.resume();
  json(
    response,
    503,
    { error: { code: 'unavailable', message: 'the server is starting' } },
    // CORS as the API's own errors (api/app.ts)
    { 'retry-after': '1', 'access-control-allow-origin': '*' },
  );
}

main().catch((error) => {
  // A signal during start-up closes what is open (the log among it) under the start-up, which
  // then fails: `stop` exits once it has closed everything, and says so.
  if (stopping) return;
  // One line, the causes after it, URL credentials hidden (the stack at LOG_LEVEL=debug).
  const causes: string[] = [];
  for (let e: unknown = error; e instanceof Error && causes.length < 5; e = e.cause)
    causes.push(e.message);
  const text = causes.length > 0 ? causes.join(': ') : String(error);
  console.error(`kchat: cannot start: ${redactUrl(text)}`);
  if (process.env.LOG_LEVEL === 'debug' || process.env.LOG_LEVEL === 'trace')
    console.error(redactUrl(String((error as Error)?.stack ?? error)));
  process.exit(1);
});
