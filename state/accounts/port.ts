/**
 * The accounts repository ports: who is registered (with a password hash), and which refresh
 * tokens are outstanding. What the rest of the system may know of an account is the public
 * `Account` of `chat.accounts`; the password hash never leaves these repositories and the API.
 *
 * Adapters: `embedded.ts` (RocksDB under DATA_DIR) and, for the distributed shape, MongoDB.
 * One conformance suite: test/conformance/accounts.suite.ts.
 */
import type { Account } from '../../schemas/types.generated.ts';

export type { Account };

/** An account as the repository holds it: the public account and its password hash. */
export interface AccountRecord extends Account {
  /** A self-describing password hash (api/passwords.ts); never a password. */
  passwordHash: string;
}

/** The public account of a record (or of an account), without anything else it holds. */
export const publicPart = ({ userId, displayName, createdAt }: Account): Account => ({
  userId,
  displayName,
  createdAt,
});

export interface AccountRepository {
  /** Adds an account; AccountExistsError when its userId is taken, even by a concurrent call. */
  create(account: AccountRecord): Promise<void>;
  /** undefined when there is no such account. */
  get(userId: string): Promise<AccountRecord | undefined>;
  /** Sets the display name and answers the updated account; undefined when there is none. */
  updateDisplayName(userId: string, displayName: string): Promise<AccountRecord | undefined>;
  /**
   * The outbox of `chat.accounts`: every public account that `create` or `updateDisplayName`
   * changed and whose publication `markPublished` has not yet confirmed, at most `limit`.
   * create and update write the account and its outbox entry atomically, so an account is never
   * stored without being, sooner or later, published.
   */
  unpublished(limit: number): Promise<Account[]>;
  /**
   * Confirms that `account` is on `chat.accounts`. Removes its outbox entry only when the entry
   * still holds this same public account (a change made meanwhile stays to be published).
   */
  markPublished(account: Account): Promise<void>;
}

/** What a refresh token stands for. */
export interface RefreshTokenGrant {
  userId: string;
  /**
   * Every token rotated from one login shares its family: the reuse of a used token revokes
   * the whole family (refresh token rotation, OAuth 2.0 Security BCP, RFC 9700).
   */
  familyId: string;
  /** Milliseconds since the epoch. Adapters may forget a token once it has expired. */
  expiresAt: number;
}

/**
 * The outcome of presenting a refresh token:
 * - `consumed`: its first use; it is now used, and only the caller holds the grant;
 * - `reused`: it was consumed before (by a rotation): a sign that it leaked;
 * - `revoked`: logged out, or its family was revoked.
 * Expiry is the caller's to check, against `grant.expiresAt`.
 */
export type ConsumeOutcome =
  | { state: 'consumed'; grant: RefreshTokenGrant }
  | { state: 'reused'; grant: RefreshTokenGrant }
  | { state: 'revoked'; grant: RefreshTokenGrant };

/**
 * Refresh tokens by the SHA-256 of the token (`hash`, computed by the caller), so that the
 * tokens themselves are never stored.
 */
export interface RefreshTokenRepository {
  /** Keeps a new token. A token stored in a revoked family is stored revoked. */
  store(hash: string, grant: RefreshTokenGrant): Promise<void>;
  /** Takes the token, atomically: of concurrent calls for one token, one only is `consumed`. */
  consume(hash: string): Promise<ConsumeOutcome | undefined>;
  /** Revokes one token (logout); an unknown token is no error. */
  revoke(hash: string): Promise<void>;
  /**
   * Revokes every token of the family, and any stored in it afterwards (by a rotation that was
   * in flight), for as long as the family's tokens would have lived.
   */
  revokeFamily(familyId: string): Promise<void>;
}

/** Both repositories of one adapter, closed together. */
export interface AccountStores {
  readonly accounts: AccountRepository;
  readonly refreshTokens: RefreshTokenRepository;
  close(): Promise<void>;
}

export class AccountExistsError extends Error {
  constructor(readonly userId: string) {
    super(`an account "${userId}" already exists`);
    this.name = new.target.name;
  }
}
