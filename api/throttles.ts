/**
 * Throttles on the REST API's unauthenticated doors: registrations and refreshes per client
 * address, and password guessing. A client address is an IPv4 address or an IPv6 /64
 * (`clientOf`).
 *
 * Logins: throttled on `POST /v1/auth/login`, after OWASP's authentication cheat
 * sheet and rate-limiter-flexible's login recipe. Only failures count:
 *
 * - failed logins in a row for one username from one client address: the 10th blocks that pair
 *   for 15 minutes (a success clears the count). Other addresses can still log the user in, so
 *   a guesser cannot lock the owner out;
 * - failed logins from one client address, whatever the usernames (password spraying): the
 *   100th in a day blocks the address for a day.
 *
 * And every login, failed or not, from one client address: at most 30 a minute. A right
 * password costs the same scrypt hash as a wrong one, and the hashes are a shared pool (2 at a
 * time, 32 waiting, 503 past that): without it, one client looping on its own account's
 * login filled the pool, and everyone else's logins and registrations answered 503.
 *
 * A blocked login answers 429 `rate_limited` with `Retry-After` before any password is hashed,
 * so a guesser also stops costing scrypt's CPU. Each login takes its try before it is verified
 * (and a success gives it back), so concurrent guesses are counted as they come, not after. The counts live in this process's memory (one
 * api process per deployment until accounts move to MongoDB), and are lost on a restart.
 */
import ipaddr from 'ipaddr.js';
import { LRUCache } from 'lru-cache';
import { RateLimiterMemory, type RateLimiterRes } from 'rate-limiter-flexible';
import { HttpError } from './errors.ts';

/**
 * The client an address stands for, as the throttles count it: an IPv4 address (an IPv4-mapped
 * IPv6 one as its IPv4), or an IPv6 address's /64, which one subscriber holds whole (RFC 6177):
 * counted address by address, one IPv6 client had 2^64 fresh allowances.
 */
export function clientOf(address: string): string {
  if (!ipaddr.isValid(address)) return address;
  const parsed = ipaddr.process(address);
  if (parsed.kind() === 'ipv4') return parsed.toString();
  return `${Buffer.from(parsed.toByteArray().slice(0, 8)).toString('hex')}/64`;
}

export interface LoginLimits {
  /** Failed logins in a row for a username from an address that block the pair. */
  consecutiveFails: number;
  consecutiveBlockS: number;
  /** Failed logins from an address in a day that block the address. */
  failsPerDay: number;
  dailyBlockS: number;
  /** Logins, failed or not, from an address in a minute. */
  perMinute: number;
}

export const DEFAULT_LOGIN_LIMITS: LoginLimits = {
  consecutiveFails: 10,
  consecutiveBlockS: 15 * 60,
  failsPerDay: 100,
  dailyBlockS: 24 * 3600,
  perMinute: 30,
};

const DAY_S = 24 * 3600;

/**
 * Client addresses (or username and address pairs) one limit holds at once, at most: past it,
 * the least recently seen is forgotten, as nginx's `limit_req_zone` does when its zone is full.
 * Each costs some 430 bytes and a timer for as long as its window lasts (a day for failed
 * logins): a client with many addresses (an IPv6 /48 holds 65,536 /64s) made the process
 * hold 20,000 of them in 12 s. A forgotten client starts again with a full allowance, a blocked
 * one too: a deployment that sees more than this many clients within a limit's window (a day,
 * for failed logins) lifts the oldest blocks early.
 */
export const MAX_CLIENTS_PER_LIMIT = 50_000;

/**
 * A RateLimiterMemory that holds at most `capacity` keys, forgetting the least recent. Its
 * recency is an lru-cache (constant time): a Map evicting its oldest with keys().next() steps
 * over the holes its deletions leave, 39 µs an eviction at 100,000 keys (state/store-cache.ts).
 */
export class BoundedLimiter {
  /** Its keys: one evicted past the capacity is deleted from the limiter, timer included. */
  private readonly keys: LRUCache<string, true>;

  constructor(
    readonly limiter: RateLimiterMemory,
    capacity = MAX_CLIENTS_PER_LIMIT,
  ) {
    this.keys = new LRUCache({
      max: capacity,
      dispose: (_value, key, reason) => {
        if (reason === 'evict') void limiter.delete(key);
      },
    });
  }

  /** Keys held (some may have expired in the limiter already). */
  get size(): number {
    return this.keys.size;
  }

  consume(key: string): Promise<RateLimiterRes> {
    this.keys.set(key, true);
    return this.limiter.consume(key);
  }

  reward(key: string, points: number): Promise<RateLimiterRes> {
    this.keys.set(key, true);
    return this.limiter.reward(key, points);
  }

  delete(key: string): Promise<boolean> {
    this.keys.delete(key);
    return this.limiter.delete(key);
  }
}

/**
 * Registrations from one client address in an hour. Every attempt counts, a taken username too,
 * so that one client cannot fill the accounts store.
 */
export const DEFAULT_REGISTRATIONS_PER_HOUR = 100;

/**
 * Refreshes from one client address in an hour (REFRESHES_PER_HOUR sets it). A client
 * refreshes about every 15 minutes, so this is room for some 900 clients behind one address
 * (a NAT, an office); each refresh keeps the used token (for reuse detection) for 30 days, so
 * a client looping on refresh would otherwise fill the token store.
 */
export const REFRESHES_PER_HOUR = 3_600;

/**
 * `perHour` attempts at something from one client address: past them, the next answer 429
 * `rate_limited` with `Retry-After` until the hour is over (0: no limit).
 */
export class AddressLimit {
  readonly byAddress: BoundedLimiter | undefined;

  constructor(
    private readonly what: string,
    perHour: number,
    capacity = MAX_CLIENTS_PER_LIMIT,
  ) {
    if (perHour > 0)
      this.byAddress = new BoundedLimiter(
        new RateLimiterMemory({ keyPrefix: `${what}-address`, points: perHour, duration: 3600 }),
        capacity,
      );
  }

  /** Takes one attempt for the address, or throws 429. */
  async attempt(address: string): Promise<void> {
    if (this.byAddress) await take(this.byAddress, clientOf(address), `too many ${this.what}`);
  }
}

export class LoginThrottle {
  readonly byUserAndAddress: BoundedLimiter;
  readonly byAddress: BoundedLimiter;
  readonly everyByAddress: BoundedLimiter;

  constructor(limits: LoginLimits = DEFAULT_LOGIN_LIMITS, capacity = MAX_CLIENTS_PER_LIMIT) {
    const bounded = (options: ConstructorParameters<typeof RateLimiterMemory>[0]) =>
      new BoundedLimiter(new RateLimiterMemory(options), capacity);
    this.everyByAddress = bounded({
      keyPrefix: 'login-every-address',
      points: limits.perMinute,
      duration: 60,
    });
    // A limiter refuses, and blocks the key, once more than `points` tries are taken.
    this.byUserAndAddress = bounded({
      keyPrefix: 'login-user-address',
      points: limits.consecutiveFails,
      duration: DAY_S,
      blockDuration: limits.consecutiveBlockS,
    });
    this.byAddress = bounded({
      keyPrefix: 'login-address',
      points: limits.failsPerDay,
      duration: DAY_S,
      blockDuration: limits.dailyBlockS,
    });
  }

  /**
   * Takes a try for this login before its password is verified, and throws 429 when the pair or
   * the address may not try now. A try counts as a failure until `succeeded` gives it back:
   * taken first, so that guesses sent at once cannot all pass before any failure is counted.
   */
  async attempt(username: string, from: string): Promise<void> {
    const address = clientOf(from);
    await take(this.everyByAddress, address, 'too many logins');
    await take(this.byAddress, address, 'too many failed logins');
    try {
      await take(this.byUserAndAddress, pair(username, address), 'too many failed logins');
    } catch (refused) {
      // Refused before any hashing: not a failure of the address.
      await this.byAddress.reward(address, 1);
      throw refused;
    }
  }

  /**
   * The password was never checked (the hashes busy, a store error): the try is given back to
   * both counts, since it told the client nothing.
   */
  async unchecked(username: string, from: string): Promise<void> {
    const address = clientOf(from);
    await this.byUserAndAddress.reward(pair(username, address), 1);
    await this.byAddress.reward(address, 1);
    await this.everyByAddress.reward(address, 1);
  }

  /** The login succeeded: its try was no failure, and the failures in a row are forgotten. */
  async succeeded(username: string, from: string): Promise<void> {
    const address = clientOf(from);
    await this.byUserAndAddress.delete(pair(username, address));
    await this.byAddress.reward(address, 1);
  }
}

/** Takes one point, or throws 429 with how long the key is blocked for. */
async function take(limiter: BoundedLimiter, key: string, what: string): Promise<void> {
  try {
    await limiter.consume(key);
  } catch (refused) {
    if (refused instanceof Error) throw refused;
    const retryAfterS = Math.max(1, Math.ceil((refused as RateLimiterRes).msBeforeNext / 1000));
    throw new HttpError(429, `${what}; try again in ${retryAfterS} s`, {
      headers: { 'Retry-After': String(retryAfterS) },
    });
  }
}

const pair = (username: string, address: string) => `${username}\u0000${address}`;
