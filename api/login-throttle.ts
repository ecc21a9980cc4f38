/**
 * Throttles password guessing on `POST /v1/auth/login`, after OWASP's authentication cheat
 * sheet and rate-limiter-flexible's login recipe. Only failures count:
 *
 * - failed logins in a row for one username from one client address: the 10th blocks that pair
 *   for 15 minutes (a success clears the count). Other addresses can still log the user in, so
 *   a guesser cannot lock the owner out;
 * - failed logins from one client address, whatever the usernames (password spraying): the
 *   100th in a day blocks the address for a day.
 *
 * A blocked login answers 429 `rate_limited` with `Retry-After` before any password is hashed,
 * so a guesser also stops costing scrypt's CPU. The counts live in this process's memory (one
 * api process per deployment until accounts move to MongoDB), and are lost on a restart.
 */
import { RateLimiterMemory, type RateLimiterRes } from 'rate-limiter-flexible';
import { HttpError } from './errors.ts';

export interface LoginLimits {
  /** Failed logins in a row for a username from an address that block the pair. */
  consecutiveFails: number;
  consecutiveBlockS: number;
  /** Failed logins from an address in a day that block the address. */
  failsPerDay: number;
  dailyBlockS: number;
}

export const DEFAULT_LOGIN_LIMITS: LoginLimits = {
  consecutiveFails: 10,
  consecutiveBlockS: 15 * 60,
  failsPerDay: 100,
  dailyBlockS: 24 * 3600,
};

const DAY_S = 24 * 3600;

export class LoginThrottle {
  private readonly byUserAndAddress: RateLimiterMemory;
  private readonly byAddress: RateLimiterMemory;

  constructor(limits: LoginLimits = DEFAULT_LOGIN_LIMITS) {
    // A limiter blocks once more than `points` are consumed: the failure that reaches the limit.
    this.byUserAndAddress = new RateLimiterMemory({
      keyPrefix: 'login-user-address',
      points: limits.consecutiveFails - 1,
      duration: DAY_S,
      blockDuration: limits.consecutiveBlockS,
    });
    this.byAddress = new RateLimiterMemory({
      keyPrefix: 'login-address',
      points: limits.failsPerDay - 1,
      duration: DAY_S,
      blockDuration: limits.dailyBlockS,
    });
  }

  /** Throws 429 when this login may not be tried now. */
  async check(username: string, address: string): Promise<void> {
    const blocked = [
      [await this.byAddress.get(address), this.byAddress.points],
      [await this.byUserAndAddress.get(pair(username, address)), this.byUserAndAddress.points],
    ] as const;
    for (const [state, points] of blocked) {
      if (state && state.consumedPoints > points) {
        const retryAfterS = Math.max(1, Math.ceil(state.msBeforeNext / 1000));
        throw new HttpError(429, `too many failed logins; try again in ${retryAfterS} s`, {
          headers: { 'Retry-After': String(retryAfterS) },
        });
      }
    }
  }

  async failed(username: string, address: string): Promise<void> {
    // consume() rejects with the state once over the limit: the block is set either way.
    const count = (limiter: RateLimiterMemory, key: string) =>
      limiter.consume(key).catch((state: RateLimiterRes) => state);
    await count(this.byAddress, address);
    await count(this.byUserAndAddress, pair(username, address));
  }

  async succeeded(username: string, address: string): Promise<void> {
    await this.byUserAndAddress.delete(pair(username, address));
  }
}

const pair = (username: string, address: string) => `${username}\u0000${address}`;
