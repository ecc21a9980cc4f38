/**
 * Tokens. An access token is a short-lived JWT (HS256, `sub` = userId) that any process holding
 * the secret verifies on its own: the API, and the gateway before a WebSocket upgrade. A refresh
 * token is 32 random bytes, stored only as its SHA-256 (state/accounts/port.ts) and rotated on
 * every use.
 */
import { createHash, randomBytes } from 'node:crypto';
import { chmod, mkdir, open, readFile, rename } from 'node:fs/promises';
import { join } from 'node:path';
import { SignJWT, jwtVerify } from 'jose';

export const ACCESS_TOKEN_TTL_S = 900;
export const REFRESH_TOKEN_TTL_S = 30 * 24 * 3600;
/** RFC 7518 §3.2: an HS256 key must be at least as long as the hash, 256 bits. */
export const MIN_SECRET_BYTES = 32;
const REFRESH_TOKEN_BYTES = 32;
const SECRET_FILE = 'jwt-secret';

/** The access token is malformed, forged, expired, or not ours. */
export class InvalidAccessTokenError extends Error {
  constructor(reason: string, options?: { cause?: unknown }) {
    super(`invalid access token: ${reason}`, options);
    this.name = new.target.name;
  }
}

export interface IssuedAccessToken {
  accessToken: string;
  /** Seconds from now until it expires. */
  expiresIn: number;
}

export interface IssuedRefreshToken {
  /** Given to the client, never stored. */
  refreshToken: string;
  /** What is stored instead: hashRefreshToken(refreshToken). */
  hash: string;
  /** Milliseconds since the epoch. */
  expiresAt: number;
}

export interface TokenServiceOptions {
  /** At least 32 bytes; a string is taken as its UTF-8 bytes. */
  secret: Uint8Array | string;
  accessTokenTtlS?: number;
  refreshTokenTtlS?: number;
  /** Milliseconds since the epoch; injectable so tests can make tokens expire. */
  now?: () => number;
}

export const hashRefreshToken = (refreshToken: string): string =>
  createHash('sha256').update(refreshToken, 'utf8').digest('hex');

export class TokenService {
  readonly accessTokenTtlS: number;
  readonly refreshTokenTtlS: number;
  private readonly key: Uint8Array;
  private readonly now: () => number;

  constructor(options: TokenServiceOptions) {
    this.key =
      typeof options.secret === 'string'
        ? new TextEncoder().encode(options.secret)
        : options.secret;
    if (this.key.length < MIN_SECRET_BYTES)
      throw new Error(`the JWT secret must be at least ${MIN_SECRET_BYTES} bytes`);
    this.accessTokenTtlS = options.accessTokenTtlS ?? ACCESS_TOKEN_TTL_S;
    this.refreshTokenTtlS = options.refreshTokenTtlS ?? REFRESH_TOKEN_TTL_S;
    this.now = options.now ?? Date.now;
  }

  async issueAccessToken(userId: string): Promise<IssuedAccessToken> {
    const now = this.now() / 1000;
    // JWT times are whole seconds, and a token is refused once its exp is reached: exp rounds
    // up, so that it stays valid for the whole expiresIn the client is told.
    const accessToken = await new SignJWT({})
      .setProtectedHeader({ alg: 'HS256', typ: 'JWT' })
      .setSubject(userId)
      .setIssuedAt(Math.floor(now))
      .setExpirationTime(Math.ceil(now) + this.accessTokenTtlS)
      .sign(this.key);
    return { accessToken, expiresIn: this.accessTokenTtlS };
  }

  /**
   * The userId the token was issued to; InvalidAccessTokenError when it is not valid now.
   * Bound, so that the gateway can take it as a plain function.
   */
  readonly verifyAccessToken = async (accessToken: string): Promise<string> => {
    let sub: unknown;
    try {
      ({
        payload: { sub },
      } = await jwtVerify(accessToken, this.key, {
        algorithms: ['HS256'],
        requiredClaims: ['sub', 'exp'],
        currentDate: new Date(this.now()),
      }));
    } catch (error) {
      throw new InvalidAccessTokenError((error as Error).message, { cause: error });
    }
    if (typeof sub !== 'string' || sub === '') throw new InvalidAccessTokenError('no subject');
    return sub;
  };

  newRefreshToken(): IssuedRefreshToken {
    const refreshToken = randomBytes(REFRESH_TOKEN_BYTES).toString('base64url');
    return {
      refreshToken,
      hash: hashRefreshToken(refreshToken),
      expiresAt: this.now() + this.refreshTokenTtlS * 1000,
    };
  }
}

/**
 * The JWT secret: JWT_SECRET's bytes when it is set, else (embedded mode) the data directory's
 * own. Distributed mode must set JWT_SECRET, so every process signs and verifies alike.
 */
export async function jwtSecret(
  jwtSecretVariable: string | undefined,
  dataDir: string,
): Promise<Uint8Array> {
  if (jwtSecretVariable) return new TextEncoder().encode(jwtSecretVariable);
  return loadOrCreateJwtSecret(dataDir);
}

/**
 * A random secret generated on the first start and kept in `<dataDir>/jwt-secret` (mode 0600),
 * so that tokens survive a restart on the same data directory. Written to a temporary file and
 * renamed: a crash never leaves a half-written secret.
 */
export async function loadOrCreateJwtSecret(dataDir: string): Promise<Uint8Array> {
  const path = join(dataDir, SECRET_FILE);
  try {
    return decodeSecret(await readFile(path, 'utf8'), path);
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
  }
  await mkdir(dataDir, { recursive: true });
  const secret = randomBytes(MIN_SECRET_BYTES);
  const temporary = `${path}.${process.pid}.tmp`;
  const file = await open(temporary, 'w', 0o600);
  try {
    await file.writeFile(`${secret.toString('base64url')}\n`);
    await file.sync();
  } finally {
    await file.close();
  }
  await chmod(temporary, 0o600); // in case a stale temporary file had another mode
  await rename(temporary, path);
  return new Uint8Array(secret);
}

function decodeSecret(text: string, path: string): Uint8Array {
  const secret = Buffer.from(text.trim(), 'base64url');
  if (secret.length < MIN_SECRET_BYTES)
    throw new Error(`${path} holds no valid JWT secret; remove it to generate a new one`);
  return new Uint8Array(secret);
}
