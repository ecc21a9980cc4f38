/**
 * The rate limit of PROTOCOL.md: a token bucket per connection over `send` and `typing` frames,
 * refilled at RATE_LIMIT_PER_S tokens a second and holding up to RATE_LIMIT_BURST_FACTOR times
 * that. A frame that finds the bucket empty is dropped and answered `rate_limited`.
 */
import { RATE_LIMIT_BURST_FACTOR } from './limits.ts';
import type { ClientFrameType } from './frames.ts';

/** The frame types the bucket is charged for. */
export const rateLimitedTypes: ReadonlySet<ClientFrameType> = new Set(['send', 'typing']);

export class TokenBucket {
  readonly capacity: number;
  private tokens: number;
  private refilledAt: number;

  constructor(
    readonly ratePerSecond: number,
    private readonly now: () => number = Date.now,
  ) {
    if (!(ratePerSecond > 0)) throw new RangeError('the rate must be a positive number per second');
    // At least one token: under 0.25 per second, four times the rate is less than one frame,
    // and a bucket that can never hold one would refuse every frame.
    this.capacity = Math.max(1, ratePerSecond * RATE_LIMIT_BURST_FACTOR);
    this.tokens = this.capacity;
    this.refilledAt = now();
  }

  /** Takes one token: false when the bucket is empty (the frame is over the limit). */
  take(): boolean {
    const now = this.now();
    const elapsed = Math.max(0, now - this.refilledAt);
    this.tokens = Math.min(this.capacity, this.tokens + (elapsed * this.ratePerSecond) / 1000);
    this.refilledAt = now;
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }
}
