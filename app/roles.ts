/**
 * The roles of PROTOCOL.md's process interface, each started on the opened infrastructure:
 *
 *   api              the REST API (accounts), publishing each public account to chat.accounts
 *   gateway          the WebSocket gateway, with the accounts table it answers unknown_recipient from
 *   processor users  the users actor (sessions and inboxes), with the table of live gateways
 *
 * `all` is every role in one process (what `npm start` runs). A role's `close` stops what it
 * started, in reverse order.
 */
import { randomBytes } from 'node:crypto';
import { hostname } from 'node:os';
import { join } from 'node:path';
import type Koa from 'koa';
import type { Infrastructure } from './infrastructure.ts';
import { usersCodecs, type ChatCodecs } from './bootstrap.ts';
import type { Config } from './config.ts';
import type { Logger } from '../observability/logger.ts';
import type { Metrics } from '../observability/metrics.ts';
import { Codecs, type TopicCodec } from '../schemas/codec.ts';
import { avroTypeOptions, loadSchema } from '../schemas/avro.ts';
import { deliveriesTopic, deliveriesTopicPrefix, topics } from '../schemas/topics.ts';
import type { Account, Delivery, GatewayHeartbeat } from '../schemas/types.generated.ts';
import { createApi } from '../api/app.ts';
import { AccountOutbox } from '../api/account-outbox.ts';
import { RequestDrain } from '../api/drain.ts';
import { TokenService, jwtSecret } from '../api/tokens.ts';
import { EmbeddedAccountStores } from '../state/accounts/embedded.ts';
import { StateDb } from '../state/state-db.ts';
import { StreamsRuntime } from '../processors/runtime/runtime.ts';
import { GlobalTable } from '../processors/runtime/global-table.ts';
import { usersTopology, USERS_APPLICATION } from '../processors/users/topology.ts';
import { GATEWAY_SILENCE_MS } from '../schemas/conventions.ts';
import { createGateway, type Gateway } from '../gateway/gateway.ts';
import { forgetSilentGateways } from '../gateway/heartbeat.ts';

/** What `main` may be asked to run: `processor` roles name their processor. */
export const ROLES = ['all', 'api', 'gateway', 'processor users'] as const;
export type Role = (typeof ROLES)[number];

/** How long a stopping API waits for the requests already inside before its stores close. */
const API_DRAIN_MS = 5_000;

export function parseRole(argv: readonly string[]): Role | undefined {
  const role = argv.length === 0 ? 'all' : argv.join(' ');
  return (ROLES as readonly string[]).includes(role) ? (role as Role) : undefined;
}

/** What the started roles hand the HTTP server. */
export interface Roles {
  /** The REST API, when this process serves it. */
  api?: Koa;
  /** The gateway, when this process serves WebSocket clients. */
  gateway?: Gateway;
  /** Why the process cannot serve yet (a processor restoring its tasks), or undefined. */
  notReadyBecause(): string | undefined;
  close(): Promise<void>;
}

interface RoleContext {
  config: Config;
  infrastructure: Infrastructure;
  codecs: ChatCodecs;
  logger: Logger;
  metrics: Metrics;
  /** Each role pushes what it opened; Roles.close runs them backwards. */
  closers: Array<() => Promise<void>>;
  /** Each role may add why it is not ready. */
  readiness: Array<() => string | undefined>;
  /** The codec of every gateway's deliveries topic (users write it, gateways read it). */
  deliveryCodec: () => Promise<TopicCodec<Delivery>>;
}

/**
 * GATEWAY_ID, else one derived from the host and port (a gateway's deliveries topic is named by
 * it). With PORT=0 the port tells two gateways of one host nothing: a random suffix does.
 */
export function gatewayIdOf(config: Config): string {
  if (config.gatewayId !== undefined) return config.gatewayId;
  const port = config.port === 0 ? `0-${randomBytes(3).toString('hex')}` : String(config.port);
  return `${hostname()}-${port}`
    .toLowerCase()
    .replace(/[^a-z0-9_-]/g, '-')
    .slice(0, 100);
}

export async function startRoles(
  role: Role,
  config: Config,
  infrastructure: Infrastructure,
  codecs: ChatCodecs,
  logger: Logger,
  metrics: Metrics,
): Promise<Roles> {
  const closers: Array<() => Promise<void>> = [];
  const close = async () => {
    for (const closer of closers.reverse())
      await closer().catch((err) => logger.error({ err }, 'close failed'));
  };
  const readiness: RoleContext['readiness'] = [];
  let deliveryCodec: Promise<TopicCodec<Delivery>> | undefined;
  const context: RoleContext = {
    deliveryCodec: () => (deliveryCodec ??= deliveryCodecOf(infrastructure)),
    config,
    infrastructure,
    codecs,
    logger,
    metrics,
    closers,
    readiness,
  };
  try {
    const all = role === 'all';
    const tokens = new TokenService({
      secret: await jwtSecret(process.env.JWT_SECRET, config.dataDir),
    });
    // The users actor first: a gateway's CONNECTED then finds its tasks running.
    if (all || role === 'processor users') await startUsersProcessor(context);
    const api = all || role === 'api' ? await startApi(context, tokens) : undefined;
    const gateway = all || role === 'gateway' ? await startGateway(context, tokens) : undefined;
    const notReadyBecause = () => readiness.map((why) => why()).find((why) => why !== undefined);
    return { api, gateway, notReadyBecause, close };
  } catch (error) {
    await close();
    throw error;
  }
}

async function startApi(context: RoleContext, tokens: TokenService): Promise<Koa> {
  const { config, infrastructure, codecs, logger, closers, metrics } = context;
  // Until the MongoDB adapter: accounts live under this process's DATA_DIR, so a deployment
  // runs one api process (docs/deployment.md).
  const stores = await EmbeddedAccountStores.open(join(config.dataDir, 'accounts'), { logger });
  closers.push(() => stores.close());
  const accountsCodec = codecs[topics.accounts];
  const producer = await infrastructure.log.producer();
  closers.push(() => producer.close());
  const outbox = new AccountOutbox({
    accounts: stores.accounts,
    async send(account) {
      await producer.send([
        {
          topic: topics.accounts,
          key: Buffer.from(account.userId),
          value: accountsCodec.encode(account),
        },
      ]);
    },
    logger: logger.child({ component: 'account-outbox' }),
  });
  outbox.start();
  closers.push(() => outbox.close());
  // Pushed last, so run first: no request is inside when the outbox and the stores close.
  const drain = new RequestDrain();
  closers.push(() => drain.close(API_DRAIN_MS));
  return createApi({
    drain,
    accounts: stores.accounts,
    refreshTokens: stores.refreshTokens,
    tokens,
    outbox,
    logger, // createApi adds { component: 'api' } itself
    trustProxy: context.config.trustProxy,
    registrationsPerHour: context.config.registrationsPerHour,
    refreshesPerHour: context.config.refreshesPerHour,
    metrics,
  });
}

async function startGateway(context: RoleContext, tokens: TokenService): Promise<Gateway> {
  const { config, infrastructure, codecs, logger, metrics, closers, readiness } = context;
  const accountsCodec = codecs[topics.accounts];
  const accounts = new GlobalTable<Account>(infrastructure.log, topics.accounts, {
    decode: (v) => accountsCodec.decode(v),
    logger,
  });
  await accounts.start();
  closers.push(() => accounts.close());
  const gateway = createGateway({
    gatewayId: gatewayIdOf(config),
    log: infrastructure.log,
    codecs,
    deliveryCodec: await context.deliveryCodec(),
    verifyAccessToken: tokens.verifyAccessToken,
    // Read your writes: a user whose registration was answered is on chat.accounts, and the
    // table, which follows it, is waited for (briefly) before a user is called unknown.
    userExists: (userId) => accounts.hasCurrent(userId),
    // No groups actor yet (a later issue): no group exists, and a group frame answers
    // unknown_recipient rather than `sent` for a message that nothing would ever route.
    groupExists: () => false,
    rateLimitPerSecond: config.rateLimitPerSecond,
    partitions: config.partitions,
    logger, // the gateway adds { component: 'gateway', gatewayId } itself
    metrics,
  });
  await gateway.start();
  closers.push(() => gateway.close());
  readiness.push(() => gateway.notReadyBecause);
  return gateway;
}

async function startUsersProcessor(context: RoleContext): Promise<void> {
  const { config, infrastructure, codecs, logger, metrics, closers, readiness } = context;
  const { log } = infrastructure;
  const heartbeatsCodec = codecs[topics.gateways];
  const gateways = new GlobalTable<GatewayHeartbeat>(log, topics.gateways, {
    decode: (v) => heartbeatsCodec.decode(v),
    logger,
  });
  await gateways.start();
  closers.push(() => gateways.close());

  /** Gateways heard from within GATEWAY_SILENCE_MS: sessions on any other count as offline. */
  const liveGateways = () => {
    const now = Date.now();
    const live = new Set<string>();
    for (const [id, heartbeat] of gateways.values())
      if (now - heartbeat.at <= GATEWAY_SILENCE_MS) live.add(id);
    return live;
  };
  metrics.gauge(
    'kchat_users_live_gateways',
    'Gateways the users actor counts as live (heard from within 15 s)',
    (g) => g.set(liveGateways().size),
  );

  // Gateways gone for good (a container restarted under a new hostname) leave their last
  // heartbeat: forget them, hourly, the first time an hour after the start, when the table has
  // long caught up (a heartbeat it had not read yet would otherwise be deleted, for 5 s).
  const forgetter = await log.producer();
  closers.push(() => forgetter.close());
  const forgetting = setInterval(() => {
    forgetSilentGateways(forgetter, gateways.values(), Date.now()).then(
      (gatewayIds) => {
        if (gatewayIds.length > 0)
          logger.info(
            { gatewayIds, topics: gatewayIds.map(deliveriesTopic) },
            'forgot gateways silent for a day; their deliveries topics can be deleted',
          );
      },
      (err: unknown) => logger.warn({ err }, 'forgetting silent gateways failed'),
    );
  }, 3_600_000);
  forgetting.unref();
  closers.push(async () => clearInterval(forgetting));

  const closedStale = metrics.counter(
    'kchat_users_stale_sessions_closed_total',
    'Sessions closed because their gateway restarted under the same id without them',
  );
  const caughtUp = metrics.counter(
    'kchat_users_catch_up_sessions_total',
    'Sessions sent the entries they missed while their gateway counted as silent',
  );

  const stateDb = await StateDb.open(join(config.dataDir, 'state'));
  closers.push(() => stateDb.close());
  const users = new StreamsRuntime(
    usersTopology({
      codecs: usersCodecs(codecs, await context.deliveryCodec()),
      liveGateways,
      gatewayStartedAt: (gatewayId) => gateways.get(gatewayId)?.startedAt || undefined,
      onStaleSessions: (sessions, gatewayIds) => {
        closedStale.inc(sessions);
        logger.info({ sessions, gatewayIds }, 'closed sessions of an earlier run of their gateway');
      },
      onCatchUp: (sessions) => {
        caughtUp.inc(sessions);
        logger.info({ sessions }, 'sent sessions what they missed while their gateway was silent');
      },
    }),
    // A chat message waits for the commit that publishes its delivery: commit as soon as the
    // records at hand are processed, and let batches grow with the load (bench/README.md).
    { applicationId: USERS_APPLICATION, log, stateDb, logger, metrics, commitIntervalMs: 0 },
  );
  await users.start();
  closers.push(() => users.close());
  readiness.push(() => users.notRunningBecause);
}

/**
 * Every gateway's deliveries topic holds Delivery records: the users actor encodes them with the
 * schema registered under `chat.deliveries-value`; each gateway registers the same schema under
 * its own topic's subject, and a schema has one global id.
 */
function deliveryCodecOf(infrastructure: Infrastructure): Promise<TopicCodec<Delivery>> {
  return new Codecs(infrastructure.registry).forTopic<Delivery>(
    deliveriesTopicPrefix.slice(0, -1),
    loadSchema('Delivery'),
    avroTypeOptions(),
  );
}
