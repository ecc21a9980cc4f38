/**
 * Picks each port's adapter from the configuration: the embedded log or Kafka, the embedded
 * registry or a Confluent-compatible one. The rest of the program only sees the ports.
 */
import type { Log } from '../log/port.ts';
import { EmbeddedLog } from '../log/embedded/embedded-log.ts';
import { KafkaLog } from '../log/kafka/kafka-log.ts';
import type { SchemaRegistry } from '../schemas/registry/port.ts';
import { EmbeddedSchemaRegistry } from '../schemas/registry/embedded.ts';
import { ConfluentSchemaRegistry } from '../schemas/registry/confluent.ts';
import type { Logger } from '../observability/logger.ts';
import { redactUrl, type Config } from './config.ts';

export interface Infrastructure {
  log: Log;
  registry: SchemaRegistry;
  /** 'embedded' or the brokers. */
  describe(): { log: string; registry: string; syncWrites?: boolean };
  /**
   * Why this process can never serve again without a restart (the embedded log refuses every
   * append after a failed write), or undefined: what /healthz answers 503 with.
   */
  deadBecause(): string | undefined;
  close(): Promise<void>;
}

export async function openInfrastructure(config: Config, logger: Logger): Promise<Infrastructure> {
  const log: Log = config.kafkaBrokers
    ? new KafkaLog({ brokers: config.kafkaBrokers, logger: logger.child({ component: 'kafka' }) })
    : await EmbeddedLog.open({
        dataDir: config.dataDir,
        syncWrites: config.syncWrites,
        logger: logger.child({ component: 'embedded-log' }),
      });
  let registry: SchemaRegistry;
  try {
    registry = config.schemaRegistryUrl
      ? new ConfluentSchemaRegistry(config.schemaRegistryUrl)
      : await EmbeddedSchemaRegistry.open(log);
  } catch (error) {
    await log.close();
    throw error;
  }
  return {
    log,
    registry,
    describe: () => ({
      log: config.kafkaBrokers
        ? `kafka ${config.kafkaBrokers.join(',')}`
        : `embedded (${config.dataDir})`,
      registry: config.schemaRegistryUrl ? redactUrl(config.schemaRegistryUrl) : 'embedded',
      ...(config.kafkaBrokers ? {} : { syncWrites: config.syncWrites }),
    }),
    deadBecause: () => (log instanceof EmbeddedLog ? log.store.failedBecause : undefined),
    async close() {
      await registry.close();
      await log.close();
    },
  };
}
