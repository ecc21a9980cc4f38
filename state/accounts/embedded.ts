/**
 * The accounts repositories on a RocksDB database of their own (the embedded twin of the
 * MongoDB adapter). Keys:
 *
 *   a/<userId>             the account (AccountRecord)
 *   o/<userId>             the outbox: its public Account, until published to chat.accounts
 *   t/<hash>               a refresh token's grant and state (active, used or revoked)
 *   f/<familyId>/<hash>    the family index: every token of a family
 *   r/<familyId>           the family is revoked (kept as long as its longest-lived token)
 *
 * Every read-check-write runs under a per-key lock (KeyedLock): accounts by userId, tokens by
 * hash, families by familyId. Lock order is family before token, never the reverse.
 */
import { mkdir } from 'node:fs/promises';
import { RocksLevel } from '@nxtedition/rocksdb';
import { silentLogger, type Logger } from '../../observability/logger.ts';
import { KeyedLock } from './keyed-lock.ts';
import {
  AccountExistsError,
  publicPart,
  type Account,
  type AccountRecord,
  type AccountRepository,
  type AccountStores,
  type ConsumeOutcome,
  type RefreshTokenGrant,
  type RefreshTokenRepository,
} from './port.ts';

type TokenState = 'active' | 'used' | 'revoked';
type StoredToken = RefreshTokenGrant & { state: TokenState };
/**
 * A revoked family, remembered as long as its longest-lived token. `done: false` while its
 * tokens are being revoked: written first, so that a crash midway leaves no token of it usable
 * (consume refuses a token whose family is revoked), and the purge finishes it.
 */
type FamilyRevocation = { expiresAt: number; done?: boolean };

const accountKey = (userId: string) => `a/${userId}`;
const outboxKey = (userId: string) => `o/${userId}`;
const tokenKey = (hash: string) => `t/${hash}`;
const familyPrefix = (familyId: string) => `f/${familyId}/`;
const familyKey = (familyId: string, hash: string) => `${familyPrefix(familyId)}${hash}`;
const revocationKey = (familyId: string) => `r/${familyId}`;
/** The first string after every key that starts with `prefix` ('/' + 1 is '0'). */
const after = (prefix: string) => `${prefix.slice(0, -1)}0`;

const samePublicAccount = (a: Account, b: Account) =>
  a.userId === b.userId && a.displayName === b.displayName && a.createdAt === b.createdAt;

/** A revoked family with no token left is still remembered this long. */
const EMPTY_FAMILY_REVOCATION_MS = 24 * 3600_000;
const DEFAULT_PURGE_INTERVAL_MS = 3600_000;
/** Tokens a purge reads at a time. */
export const PURGE_PAGE = 1_000;

export interface EmbeddedAccountStoresOptions {
  now?: () => number;
  logger?: Logger;
  /** How often expired tokens are deleted; 0: only when purgeExpired() is called. */
  purgeIntervalMs?: number;
}

export class EmbeddedAccountStores implements AccountStores {
  readonly accounts: AccountRepository;
  readonly refreshTokens: RefreshTokenRepository;
  private readonly lock = new KeyedLock();
  private readonly now: () => number;
  private purgeTimer: NodeJS.Timeout | undefined;
  private purging: Promise<number> | undefined;

  private constructor(
    private readonly db: RocksLevel<string, unknown>,
    options: EmbeddedAccountStoresOptions,
  ) {
    this.now = options.now ?? Date.now;
    this.accounts = {
      create: (account) => this.createAccount(account),
      get: (userId) => this.read<AccountRecord>(accountKey(userId)),
      updateDisplayName: (userId, displayName) => this.updateDisplayName(userId, displayName),
      unpublished: (limit) => this.unpublished(limit),
      markPublished: (account) => this.markPublished(account),
    };
    this.refreshTokens = {
      store: (hash, grant) => this.storeToken(hash, grant),
      consume: (hash) => this.consumeToken(hash),
      revoke: (hash) => this.revokeToken(hash),
      revokeFamily: (familyId) => this.revokeFamily(familyId),
    };
  }

  static async open(
    directory: string,
    options: EmbeddedAccountStoresOptions = {},
  ): Promise<EmbeddedAccountStores> {
    await mkdir(directory, { recursive: true });
    const db = new RocksLevel<string, unknown>(directory, {
      keyEncoding: 'utf8',
      valueEncoding: 'json',
    });
    await db.open({ createIfMissing: true });
    const stores = new EmbeddedAccountStores(db, options);
    const interval = options.purgeIntervalMs ?? DEFAULT_PURGE_INTERVAL_MS;
    const logger = options.logger ?? silentLogger;
    if (interval > 0) {
      stores.purgeTimer = setInterval(() => {
        stores
          .purgeExpired()
          .then((purged) => purged > 0 && logger.debug({ purged }, 'expired refresh tokens purged'))
          .catch((error: unknown) => logger.warn({ err: error }, 'refresh token purge failed'));
      }, interval);
      stores.purgeTimer.unref();
    }
    return stores;
  }

  /** Deletes the tokens and family revocations that have expired; answers how many tokens. */
  purgeExpired(): Promise<number> {
    this.purging ??= this.purge().finally(() => (this.purging = undefined));
    return this.purging;
  }

  async close(): Promise<void> {
    clearInterval(this.purgeTimer);
    await this.purging?.catch(() => {});
    await this.db.close();
  }

  private createAccount(account: AccountRecord): Promise<void> {
    return this.lock.run(accountKey(account.userId), async () => {
      if ((await this.read(accountKey(account.userId))) !== undefined)
        throw new AccountExistsError(account.userId);
      const { userId, displayName, createdAt, passwordHash } = account;
      const record: AccountRecord = { userId, displayName, createdAt, passwordHash };
      await this.db
        .batch()
        .put(accountKey(userId), record)
        .put(outboxKey(userId), publicPart(record))
        .write();
    });
  }

  private async unpublished(limit: number): Promise<Account[]> {
    const entries = await this.db.values({ gte: 'o/', lt: 'o0', limit }).all();
    return entries as Account[];
  }

  private markPublished(account: Account): Promise<void> {
    return this.lock.run(accountKey(account.userId), async () => {
      const pending = await this.read<Account>(outboxKey(account.userId));
      if (pending === undefined || !samePublicAccount(pending, account)) return;
      await this.db.del(outboxKey(account.userId));
    });
  }

  private updateDisplayName(
    userId: string,
    displayName: string,
  ): Promise<AccountRecord | undefined> {
    return this.lock.run(accountKey(userId), async () => {
      const account = await this.read<AccountRecord>(accountKey(userId));
      if (account === undefined) return undefined;
      const updated = { ...account, displayName };
      await this.db
        .batch()
        .put(accountKey(userId), updated)
        .put(outboxKey(userId), publicPart(updated))
        .write();
      return updated;
    });
  }

  private storeToken(hash: string, grant: RefreshTokenGrant): Promise<void> {
    return this.lock.run(revocationKey(grant.familyId), async () => {
      const revocation = await this.read<FamilyRevocation>(revocationKey(grant.familyId));
      const token: StoredToken = {
        userId: grant.userId,
        familyId: grant.familyId,
        expiresAt: grant.expiresAt,
        state: revocation === undefined ? 'active' : 'revoked',
      };
      const batch = this.db
        .batch()
        .put(tokenKey(hash), token)
        .put(familyKey(grant.familyId, hash), '');
      if (revocation !== undefined && revocation.expiresAt < grant.expiresAt)
        batch.put(revocationKey(grant.familyId), { expiresAt: grant.expiresAt });
      await batch.write();
    });
  }

  private consumeToken(hash: string): Promise<ConsumeOutcome | undefined> {
    return this.lock.run(tokenKey(hash), async () => {
      const token = await this.read<StoredToken>(tokenKey(hash));
      if (token === undefined) return undefined;
      const { state, ...grant } = token;
      if (state === 'revoked') return { state: 'revoked', grant };
      // Its family being revoked (or left half revoked by a crash): as good as revoked.
      if ((await this.read(revocationKey(token.familyId))) !== undefined)
        return { state: 'revoked', grant };
      if (state === 'used') return { state: 'reused', grant };
      await this.db.put(tokenKey(hash), { ...token, state: 'used' });
      return { state: 'consumed', grant };
    });
  }

  /**
   * Logout. A token already rotated is a reuse, as at refresh: its whole family goes (else the
   * logout of a stolen, rotated token would mark it revoked and hide its reuse for good).
   */
  private async revokeToken(hash: string): Promise<void> {
    const reused = await this.lock.run(tokenKey(hash), async () => {
      const token = await this.read<StoredToken>(tokenKey(hash));
      if (token?.state === 'used') return token.familyId;
      await this.setRevoked(hash);
      return undefined;
    });
    if (reused !== undefined) await this.revokeFamily(reused);
  }

  /**
   * Marks the family revoked first, then revokes its tokens a page at a time (a client that
   * refreshed for a month has thousands), then records how long to remember it.
   */
  private revokeFamily(familyId: string): Promise<void> {
    return this.lock.run(revocationKey(familyId), async () => {
      const previous = await this.read<FamilyRevocation>(revocationKey(familyId));
      let expiresAt = Math.max(previous?.expiresAt ?? 0, this.now() + EMPTY_FAMILY_REVOCATION_MS);
      await this.db.put(revocationKey(familyId), { expiresAt, done: false });
      const prefix = familyPrefix(familyId);
      for await (const [key] of this.scan(prefix, after(prefix))) {
        const hash = key.slice(prefix.length);
        const token = await this.lock.run(tokenKey(hash), () => this.setRevoked(hash));
        if (token !== undefined) expiresAt = Math.max(expiresAt, token.expiresAt);
      }
      await this.db.put(revocationKey(familyId), { expiresAt, done: true });
    });
  }

  /** Call under the token's lock. */
  private async setRevoked(hash: string): Promise<StoredToken | undefined> {
    const token = await this.read<StoredToken>(tokenKey(hash));
    if (token === undefined || token.state === 'revoked') return token;
    await this.db.put(tokenKey(hash), { ...token, state: 'revoked' });
    return token;
  }

  private async purge(): Promise<number> {
    const now = this.now();
    let purged = 0;
    for await (const [key, { familyId, expiresAt }] of this.scan<StoredToken>('t/', 't0')) {
      if (expiresAt > now) continue;
      const hash = key.slice('t/'.length);
      await this.lock.run(revocationKey(familyId), () =>
        this.lock.run(key, async () => {
          const token = await this.read<StoredToken>(key);
          if (token === undefined || token.expiresAt > now) return;
          await this.db.batch().del(key).del(familyKey(familyId, hash)).write();
          purged++;
        }),
      );
    }
    for await (const [key, { expiresAt, done }] of this.scan<FamilyRevocation>('r/', 'r0')) {
      // A revocation a crash cut short: its tokens are refused already; it is finished here.
      if (done === false) {
        await this.revokeFamily(key.slice('r/'.length));
        continue;
      }
      if (expiresAt > now) continue;
      await this.lock.run(key, async () => {
        const revocation = await this.read<FamilyRevocation>(key);
        if (revocation !== undefined && revocation.expiresAt <= now) await this.db.del(key);
      });
    }
    return purged;
  }

  /**
   * The entries of a key range, read PURGE_PAGE at a time: a purge holds one page in memory,
   * however many tokens the store keeps.
   */
  private async *scan<V>(gte: string, lt: string): AsyncGenerator<[string, V]> {
    let range: { gte: string } | { gt: string } = { gte };
    for (;;) {
      const page = (await this.db.iterator({ ...range, lt, limit: PURGE_PAGE }).all()) as Array<
        [string, V]
      >;
      yield* page;
      if (page.length < PURGE_PAGE) return;
      range = { gt: page.at(-1)![0] };
    }
  }

  private async read<V>(key: string): Promise<V | undefined> {
    try {
      return (await this.db.get(key)) as V;
    } catch (error) {
      if ((error as { code?: string }).code === 'LEVEL_NOT_FOUND') return undefined;
      throw error;
    }
  }
}
