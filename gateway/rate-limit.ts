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
    /** Tokens it holds when full; PROTOCOL's four seconds' worth by default. */
    capacity?: number,
  ) {
    if (!(ratePerSecond > 0)) throw new RangeError('the rate must be a positive number per second');
    // At least one token: under 0.25 per second, four times the rate is less than one frame,
    // and a bucket that can never hold one would refuse every frame.
    this.capacity = Math.max(1, capacity ?? ratePerSecond * RATE_LIMIT_BURST_FACTOR);
    this.tokens = this.capacity;
    this.refilledAt = now();
  }

  /** Takes one token: false when the bucket is empty (the frame is over the limit). */
  take(): boolean {
    this.refill();
    if (this.tokens < 1) return false;
    this.tokens -= 1;
    return true;
  }

  /** Whether the bucket has filled up again: nothing taken lately counts any more. */
  get full(): boolean {
    this.refill();
    return this.tokens >= this.capacity;
  }

  /** Seconds until the next token. */
  get secondsToNext(): number {
    this.refill();
    return Math.max(0, (1 - this.tokens) / this.ratePerSecond);
  }

  private refill(): void {
    const now = this.now();
    const elapsed = Math.max(0, now - this.refilledAt);
    this.tokens = Math.min(this.capacity, this.tokens + (elapsed * this.ratePerSecond) / 1000);
    this.refilledAt = now;
  }
}

/**
 * A token bucket per key (a user's new connections). A key whose bucket has filled up again is
 * forgotten by `forgetFull`, so the map holds only the keys taken from lately.
 */
export class KeyedTokenBuckets {
  private readonly buckets = new Map<string, TokenBucket>();

  constructor(
    private readonly ratePerSecond: number,
    private readonly capacity: number,
    private readonly now: () => number = Date.now,
  ) {}

  /** Takes a token of the key's bucket: false when it is empty. */
  take(key: string): boolean {
    let bucket = this.buckets.get(key);
    if (bucket === undefined) {
      bucket = new TokenBucket(this.ratePerSecond, this.now, this.capacity);
      this.buckets.set(key, bucket);
    }
    return bucket.take();
  }

  /** Seconds until the key's bucket holds a token again. */
  secondsToNext(key: string): number {
    return this.buckets.get(key)?.secondsToNext ?? 0;
  }

  forgetFull(): void {
    for (const [key, bucket] of this.buckets) if (bucket.full) this.buckets.delete(key);
  }

  get size(): number {
    return this.buckets.size;
  }
}
