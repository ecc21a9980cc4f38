/**
 * Password hashing with scrypt (memory-hard, in node:crypto). A hash is one PHC-format string
 * carrying its parameters and salt, `$scrypt$ln=15,r=8,p=1$<salt>$<hash>` (unpadded base64),
 * so the cost can be raised later without breaking the hashes already stored. Passwords are
 * never logged, and never leave this file but as a hash.
 */
import { randomBytes, scrypt, timingSafeEqual, type ScryptOptions } from 'node:crypto';
import pLimit, { type LimitFunction } from 'p-limit';

export interface PasswordCost {
  /** log2 of scrypt's N (CPU and memory cost). */
  log2N: number;
  /** Block size. */
  r: number;
  /** Parallelization. */
  p: number;
}

/** 32 MiB and about 100 ms per hash: a login costs an attacker as much as it costs us. */
export const DEFAULT_PASSWORD_COST: PasswordCost = { log2N: 15, r: 8, p: 1 };

/**
 * Hashes run at once, at most. scrypt runs on libuv's thread pool (4 threads), which RocksDB's
 * reads and writes share: a burst of logins left every store read waiting seconds behind them.
 * Two leave the pool's other threads to the stores.
 */
export const MAX_CONCURRENT_HASHES = 2;
/** Hashes waiting for their turn, at most (about 1.5 s of them); past it: PasswordsBusyError. */
export const MAX_WAITING_HASHES = 32;

/** Too many hashes waiting: the request is refused (503) rather than queued without end. */
export class PasswordsBusyError extends Error {
  constructor() {
    super(`over ${MAX_WAITING_HASHES} password hashes are waiting`);
    this.name = 'PasswordsBusyError';
  }
}

const SALT_BYTES = 16;
const KEY_BYTES = 32;
const PHC = /^\$scrypt\$ln=(\d{1,2}),r=(\d{1,3}),p=(\d{1,3})\$([A-Za-z0-9+/]+)\$([A-Za-z0-9+/]+)$/;

function derive(password: string, salt: Buffer, cost: PasswordCost): Promise<Buffer> {
  const N = 2 ** cost.log2N;
  // scrypt needs 128·N·r bytes; node refuses above maxmem (32 MiB by default).
  const options: ScryptOptions = { N, r: cost.r, p: cost.p, maxmem: 256 * N * cost.r };
  return new Promise((resolve, reject) =>
    scrypt(password, salt, KEY_BYTES, options, (error, key) =>
      error ? reject(error) : resolve(key),
    ),
  );
}

const b64 = (data: Buffer) => data.toString('base64').replace(/=+$/, '');

export class PasswordHasher {
  /** A hash of no one's password, to spend a verification on for unknown users. */
  private decoy: Promise<string> | undefined;
  private readonly limit: LimitFunction;

  constructor(
    private readonly cost: PasswordCost = DEFAULT_PASSWORD_COST,
    concurrency = MAX_CONCURRENT_HASHES,
  ) {
    this.limit = pLimit(concurrency);
  }

  /** Hashes running and waiting now. */
  get load(): { running: number; waiting: number } {
    return { running: this.limit.activeCount, waiting: this.limit.pendingCount };
  }

  /** One scrypt, in turn. */
  private derive(password: string, salt: Buffer, cost: PasswordCost): Promise<Buffer> {
    if (this.limit.pendingCount >= MAX_WAITING_HASHES) throw new PasswordsBusyError();
    return this.limit(() => derive(password, salt, cost));
  }

  async hash(password: string): Promise<string> {
    const salt = randomBytes(SALT_BYTES);
    const key = await this.derive(password, salt, this.cost);
    const { log2N, r, p } = this.cost;
    return `$scrypt$ln=${log2N},r=${r},p=${p}$${b64(salt)}$${b64(key)}`;
  }

  /**
   * Whether the password matches the hash. Without a hash (no such user) it still spends a
   * verification, so that the time taken does not tell which usernames exist.
   */
  async verify(password: string, encoded: string | undefined): Promise<boolean> {
    if (encoded === undefined) {
      // Made again if it failed (the hashes were busy), not kept failed.
      this.decoy ??= this.hash(randomBytes(16).toString('hex')).catch((error: unknown) => {
        this.decoy = undefined;
        throw error;
      });
      await this.verify(password, await this.decoy);
      return false;
    }
    const match = PHC.exec(encoded);
    if (!match) throw new Error('the stored password hash is not an scrypt PHC string');
    const [, log2N, r, p, salt, expected] = match as unknown as string[];
    const expectedKey = Buffer.from(expected!, 'base64');
    const key = await this.derive(password, Buffer.from(salt!, 'base64'), {
      log2N: Number(log2N),
      r: Number(r),
      p: Number(p),
    });
    return key.length === expectedKey.length && timingSafeEqual(key, expectedKey);
  }
}
