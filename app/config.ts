/**
 * The process interface of PROTOCOL.md: what the program reads from its environment.
 * Without KAFKA_BROKERS the embedded log is used, without SCHEMA_REGISTRY_URL the embedded
 * registry.
 */
import { resolve } from 'node:path';
import { DEFAULT_REGISTRATIONS_PER_HOUR, REFRESHES_PER_HOUR } from '../api/throttles.ts';
import { MIN_SECRET_BYTES } from '../api/tokens.ts';
import { rateLimitPerSecond } from '../gateway/limits.ts';

/** pino's levels: anything else makes pino throw when the logger is created. */
const LOG_LEVELS = ['fatal', 'error', 'warn', 'info', 'debug', 'trace', 'silent'];

export interface Config {
  port: number;
  host: string;
  dataDir: string;
  kafkaBrokers: string[] | undefined;
  schemaRegistryUrl: string | undefined;
  /** Partitions of every co-partitioned chat topic. */
  partitions: number;
  syncWrites: boolean;
  logLevel: string;
  /** Take the client's address from X-Forwarded-For (behind a proxy that sets it). */
  trustProxy: boolean;
  /** Registrations a client address may make in an hour (0: no limit). */
  registrationsPerHour: number;
  refreshesPerHour: number;
  /** RATE_LIMIT_PER_S: send and typing frames a connection may make per second. */
  rateLimitPerSecond: number;
}

export class ConfigError extends Error {}

function integer(
  env: NodeJS.ProcessEnv,
  name: string,
  fallback: number,
  min: number,
  max: number,
): number {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  const value = Number(raw);
  if (!Number.isInteger(value) || value < min || value > max) {
    throw new ConfigError(`${name} must be an integer from ${min} to ${max}, not "${raw}"`);
  }
  return value;
}

export function readConfig(env: NodeJS.ProcessEnv = process.env): Config {
  if (env.KAFKA_BROKERS && !env.JWT_SECRET) {
    // Every process must verify the tokens any other signed (PROTOCOL: required when distributed).
    throw new ConfigError('JWT_SECRET is required with KAFKA_BROKERS (the distributed deployment)');
  }
  // Checked here, before anything is opened or contacted: a short secret found only once the
  // roles start stops the process after it has created DATA_DIR or reached Kafka (or, with
  // Kafka unreachable, never).
  if (env.JWT_SECRET && Buffer.byteLength(env.JWT_SECRET) < MIN_SECRET_BYTES) {
    throw new ConfigError(`JWT_SECRET must be at least ${MIN_SECRET_BYTES} bytes`);
  }
  const logLevel = env.LOG_LEVEL || 'info';
  if (!LOG_LEVELS.includes(logLevel)) {
    throw new ConfigError(`LOG_LEVEL must be one of ${LOG_LEVELS.join(', ')}, not "${logLevel}"`);
  }
  let rate: number;
  try {
    rate = rateLimitPerSecond(env);
  } catch (error) {
    throw new ConfigError((error as Error).message);
  }
  const brokers = env.KAFKA_BROKERS?.split(',')
    .map((b) => b.trim())
    .filter(Boolean);
  return {
    port: integer(env, 'PORT', 8080, 0, 65535),
    host: env.HOST || '0.0.0.0',
    dataDir: resolve(env.DATA_DIR || './data'),
    kafkaBrokers: brokers && brokers.length > 0 ? brokers : undefined,
    schemaRegistryUrl: env.SCHEMA_REGISTRY_URL || undefined,
    partitions: integer(env, 'PARTITIONS', 12, 1, 1000),
    syncWrites: env.SYNC_WRITES === 'true',
    logLevel,
    trustProxy: env.TRUST_PROXY === 'true',
    registrationsPerHour: integer(
      env,
      'REGISTRATIONS_PER_HOUR',
      DEFAULT_REGISTRATIONS_PER_HOUR,
      0,
      1_000_000_000,
    ),
    refreshesPerHour: integer(env, 'REFRESHES_PER_HOUR', REFRESHES_PER_HOUR, 0, 1_000_000_000),
    rateLimitPerSecond: rate,
  };
}
