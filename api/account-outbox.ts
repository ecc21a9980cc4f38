/**
 * Publishes public accounts to `chat.accounts` through the accounts repository's outbox.
 *
 * The repository stores an account and its outbox entry in one write; `publish` then sends it
 * and confirms. When the log is unreachable the account stays in the outbox, and `flush` (at
 * start and every `intervalMs`) sends it again: an account is never stored without being
 * published sooner or later. `chat.accounts` is compacted and keyed by userId, so publishing one
 * account twice changes nothing.
 */
import type { Logger } from '../observability/logger.ts';
import { KeyedLock } from '../state/accounts/keyed-lock.ts';
import { publicPart, type Account, type AccountRepository } from '../state/accounts/port.ts';

export const OUTBOX_INTERVAL_MS = 5000;
/** Accounts read from the outbox per round of a flush. */
const FLUSH_BATCH = 500;

export interface AccountOutboxDeps {
  accounts: AccountRepository;
  /** Sends the public account to `chat.accounts`, resolving once the log has it. */
  send(account: Account): Promise<void>;
  logger: Logger;
}

export class AccountOutbox {
  private timer: NodeJS.Timeout | undefined;
  private flushing: Promise<number> | undefined;
  private readonly publishing = new KeyedLock();

  constructor(private readonly deps: AccountOutboxDeps) {}

  /**
   * Sends and confirms one account; false (logged) when it stays in the outbox for later. What
   * goes out is the account as stored now, not as `account` had it, one publication of a user at
   * a time: a flush holding a copy read before a rename would otherwise send the old name after
   * the rename's own publication confirmed the new one, and leave the old name last on the
   * topic, with nothing left in the outbox to correct it.
   */
  async publish(account: Account): Promise<boolean> {
    try {
      await this.publishing.run(account.userId, async () => {
        const stored = await this.deps.accounts.get(account.userId);
        if (stored === undefined) return;
        const current = publicPart(stored);
        await this.deps.send(current);
        await this.deps.accounts.markPublished(current);
      });
      return true;
    } catch (error) {
      this.deps.logger.warn(
        { err: error, userId: account.userId },
        'account not published yet; the outbox will retry',
      );
      return false;
    }
  }

  /** Publishes everything in the outbox; answers how many were published. One flush at a time. */
  flush(): Promise<number> {
    this.flushing ??= this.drain().finally(() => (this.flushing = undefined));
    return this.flushing;
  }

  /** Flushes now and then every intervalMs, until close. */
  start(intervalMs = OUTBOX_INTERVAL_MS): void {
    const run = () =>
      void this.flush().then(
        (published) => published > 0 && this.deps.logger.info({ published }, 'outbox flushed'),
        (error: unknown) => this.deps.logger.warn({ err: error }, 'outbox flush failed'),
      );
    run();
    this.timer = setInterval(run, intervalMs);
    this.timer.unref();
  }

  async close(): Promise<void> {
    clearInterval(this.timer);
    await this.flushing?.catch(() => undefined);
  }

  private async drain(): Promise<number> {
    let published = 0;
    for (;;) {
      const pending = await this.deps.accounts.unpublished(FLUSH_BATCH);
      let progress = 0;
      for (const account of pending) if (await this.publish(account)) progress++;
      published += progress;
      // Stop when the outbox is empty, or when this round could publish nothing (log down).
      if (pending.length < FLUSH_BATCH || progress === 0) return published;
    }
  }
}
