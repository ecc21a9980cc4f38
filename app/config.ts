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
  /** GATEWAY_ID; undefined: derived from the host name and the port (gatewayIdOf in roles.ts). */
  gatewayId: string | undefined;
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

/** `true` or `false` (unset or empty: the default); anything else is refused, not read as false. */
function boolean(env: NodeJS.ProcessEnv, name: string, fallback: boolean): boolean {
  const raw = env[name];
  if (raw === undefined || raw === '') return fallback;
  if (raw === 'true' || raw === 'false') return raw === 'true';
  // SYNC_WRITES=1 read as false would leave an operator believing in fsync that is not there.
  throw new ConfigError(`${name} must be "true" or "false", not "${raw}"`);
}

/** host:port, the host a name, an IPv4 address or a bracketed IPv6 one, the port 1 to 65535. */
const BROKER = /^(?:[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(\d{1,5})$/;

function brokersOf(raw: string | undefined): string[] | undefined {
  const brokers = raw
    ?.split(',')
    .map((b) => b.trim())
    .filter(Boolean);
  if (!brokers || brokers.length === 0) return undefined;
  for (const broker of brokers) {
    const port = Number(BROKER.exec(broker)?.[1]);
    if (!(port >= 1 && port <= 65535))
      throw new ConfigError(`KAFKA_BROKERS must be host:port[,host:port...], not "${broker}"`);
  }
  return brokers;
}

function registryUrlOf(raw: string | undefined): string | undefined {
  if (!raw) return undefined;
  const protocol = URL.canParse(raw) ? new URL(raw).protocol : undefined;
  if (protocol !== 'http:' && protocol !== 'https:')
    throw new ConfigError(`SCHEMA_REGISTRY_URL must be an http(s) URL, not "${redactUrl(raw)}"`);
  return raw;
}

/** A URL's password hidden, for logs: `http://svc:***@host/`. */
export function redactUrl(text: string): string {
  return text.replace(/(\/\/[^/@\s:]*):[^/@\s]*@/g, '$1:***@');
}

/**
 * GATEWAY_ID names a gateway's deliveries topic and its heartbeat: unique per gateway process,
 * stable across its restarts. 1 to 100 of a-z, 0-9, "_" and "-", as given (a value that would
 * need changing, empty, or too long is refused: two gateways whose ids became one would share a
 * topic and close each other's sessions).
 */
const GATEWAY_ID = /^[a-z0-9_-]{1,100}$/;

function gatewayIdOf(env: NodeJS.ProcessEnv): string | undefined {
  const raw = env.GATEWAY_ID;
  if (raw === undefined) return undefined;
  if (!GATEWAY_ID.test(raw))
    throw new ConfigError(
      `GATEWAY_ID must be 1 to 100 characters of a-z, 0-9, "_" and "-", not "${raw}"`,
    );
  return raw;
}

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
  return {
    port: integer(env, 'PORT', 8080, 0, 65535),
    host: env.HOST || '0.0.0.0',
    dataDir: resolve(env.DATA_DIR || './data'),
    kafkaBrokers: brokersOf(env.KAFKA_BROKERS),
    schemaRegistryUrl: registryUrlOf(env.SCHEMA_REGISTRY_URL),
    gatewayId: gatewayIdOf(env),
    partitions: integer(env, 'PARTITIONS', 12, 1, 1000),
    syncWrites: boolean(env, 'SYNC_WRITES', false),
    logLevel,
    trustProxy: boolean(env, 'TRUST_PROXY', false),
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
