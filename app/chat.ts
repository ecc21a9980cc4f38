/**
 * The chat roles on the opened infrastructure: the REST API (accounts), and the users actor
 * with the global table of live gateways it needs. `close` stops them in reverse order.
 */
import { hostname } from 'node:os';
import { join } from 'node:path';
import type Koa from 'koa';
import type { Infrastructure } from './infrastructure.ts';
import type { ChatCodecs } from './bootstrap.ts';
import type { Config } from './config.ts';
import type { Logger } from '../observability/logger.ts';
import type { Metrics } from '../observability/metrics.ts';
import { Codecs } from '../schemas/codec.ts';
import { avroTypeOptions, loadSchema } from '../schemas/avro.ts';
import { deliveriesTopicPrefix, topics } from '../schemas/topics.ts';
import type { Account, Delivery, GatewayHeartbeat } from '../schemas/types.generated.ts';
import { createApi } from '../api/app.ts';
import { TokenService, jwtSecret } from '../api/tokens.ts';
import { EmbeddedAccountStores } from '../state/accounts/embedded.ts';
import { StateDb } from '../state/state-db.ts';
import { StreamsRuntime } from '../processors/runtime/runtime.ts';
import { GlobalTable } from '../processors/runtime/global-table.ts';
import { usersTopology, USERS_APPLICATION } from '../processors/users/topology.ts';
import { GATEWAY_SILENCE_MS } from '../schemas/conventions.ts';
import { createGateway, type Gateway } from '../gateway/gateway.ts';
import { rateLimitPerSecond } from '../gateway/limits.ts';

export interface Chat {
  api: Koa;
  gateway: Gateway;
  close(): Promise<void>;
}

/** GATEWAY_ID, else one derived from the host and port (a gateway's deliveries topic is named by it). */
export function gatewayIdOf(config: Config): string {
  const id = process.env.GATEWAY_ID ?? `${hostname()}-${config.port}`;
  return id
    .toLowerCase()
    .replace(/[^a-z0-9_-]/g, '-')
    .slice(0, 100);
}

export async function startChat(
  config: Config,
  infrastructure: Infrastructure,
  codecs: ChatCodecs,
  logger: Logger,
  metrics: Metrics,
): Promise<Chat> {
  const { log, registry } = infrastructure;
  const closers: Array<() => Promise<void>> = [];
  const close = async () => {
    for (const closer of closers.reverse())
      await closer().catch((err) => logger.error({ err }, 'close failed'));
  };
  try {
    const stores = await EmbeddedAccountStores.open(join(config.dataDir, 'accounts'), { logger });
    closers.push(() => stores.close());
    const tokens = new TokenService({
      secret: await jwtSecret(process.env.JWT_SECRET, config.dataDir),
    });
    const accountsCodec = codecs[topics.accounts];
    const producer = await log.producer();
    closers.push(() => producer.close());
    const api = createApi({
      accounts: stores.accounts,
      refreshTokens: stores.refreshTokens,
      tokens,
      logger: logger.child({ component: 'api' }),
      async publishAccount(account) {
        await producer.send([
          {
            topic: topics.accounts,
            key: Buffer.from(account.userId),
            value: accountsCodec.encode(account),
          },
        ]);
      },
    });

    const accounts = new GlobalTable<Account>(log, topics.accounts, {
      decode: (v) => accountsCodec.decode(v),
      logger,
    });
    await accounts.start();
    closers.push(() => accounts.close());
    const heartbeatsCodec = codecs[topics.gateways];
    const gateways = new GlobalTable<GatewayHeartbeat>(log, topics.gateways, {
      decode: (v) => heartbeatsCodec.decode(v),
      logger,
    });
    await gateways.start();
    closers.push(() => gateways.close());

    // Every gateway's deliveries topic holds Delivery records: the users actor encodes them
    // with the schema registered under `chat.deliveries-value`; each gateway registers the same
    // schema under its own topic's subject, and a schema has one global id.
    const deliveryCodec = await new Codecs(registry).forTopic<Delivery>(
      deliveriesTopicPrefix.slice(0, -1),
      loadSchema('Delivery'),
      avroTypeOptions(),
    );

    const stateDb = await StateDb.open(join(config.dataDir, 'state'));
    closers.push(() => stateDb.close());
    const users = new StreamsRuntime(
      usersTopology({
        codecs: {
          connections: codecs[topics.connections],
          messages: codecs[topics.messages],
          userCommands: codecs[topics.userCommands],
          deliveries: deliveryCodec,
          push: codecs[topics.push],
          inboxEntries: codecs[topics.inboxEntries],
        },
        liveGateways: () => {
          const now = Date.now();
          const live = new Set<string>();
          for (const [id, heartbeat] of gateways.values())
            if (now - heartbeat.at <= GATEWAY_SILENCE_MS) live.add(id);
          return live;
        },
      }),
      { applicationId: USERS_APPLICATION, log, stateDb, logger, metrics },
    );
    await users.start();
    closers.push(() => users.close());

    const gateway = createGateway({
      gatewayId: gatewayIdOf(config),
      log,
      codecs,
      deliveryCodec,
      verifyAccessToken: tokens.verifyAccessToken,
      userExists: (userId) => accounts.has(userId),
      rateLimitPerSecond: rateLimitPerSecond(process.env),
      partitions: config.partitions,
      logger: logger.child({ component: 'gateway' }),
      metrics,
    });
    await gateway.start();
    closers.push(() => gateway.close());
    return { api, gateway, close };
  } catch (error) {
    await close();
    throw error;
  }
}
