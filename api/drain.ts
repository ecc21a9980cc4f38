/**
 * Shutting down without a 500: once the process is stopping, a new request answers 503
 * `unavailable` (and its connection closes), and the stores close only when the requests
 * already inside have been answered, or after a bound.
 */
import type { Middleware } from 'koa';
import { HttpError } from './errors.ts';

export class RequestDrain {
  private inFlight = 0;
  private closing = false;
  private idle: (() => void) | undefined;

  /** Between the error handler (which shapes the 503) and the routes. */
  middleware(): Middleware {
    return async (_ctx, next) => {
      if (this.closing)
        throw new HttpError(503, 'the server is shutting down; try again', {
          headers: { Connection: 'close', 'Retry-After': '1' },
        });
      this.inFlight++;
      try {
        await next();
      } finally {
        if (--this.inFlight === 0) this.idle?.();
      }
    };
  }

  /** Refuses new requests from now on; resolves once none is inside, or after `timeoutMs`. */
  async close(timeoutMs: number): Promise<void> {
    this.closing = true;
    if (this.inFlight === 0) return;
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      new Promise<void>((resolve) => (this.idle = resolve)),
      new Promise<void>((resolve) => (timer = setTimeout(resolve, timeoutMs))),
    ]);
    clearTimeout(timer);
  }
}
