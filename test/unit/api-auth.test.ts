/**
 * The accounts part of the REST API over real HTTP: the Koa app listening on a free port,
 * Node's fetch as the client, the embedded repositories in a temporary directory. Only the
 * outbox's send is a fake (it records what would go to `chat.accounts`).
 */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { mkdtemp, readFile, rm, stat, writeFile } from 'node:fs/promises';
import type { Server } from 'node:http';
import { connect, type AddressInfo } from 'node:net';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { gzipSync } from 'node:zlib';
import { Writable } from 'node:stream';
import { SignJWT } from 'jose';
import { pino } from 'pino';
import { createApi, type ApiDeps } from '../../api/app.ts';
import { AccountOutbox } from '../../api/account-outbox.ts';
import { MAX_BODY_BYTES } from '../../api/body.ts';
import { clientOf, DEFAULT_LOGIN_LIMITS } from '../../api/throttles.ts';
import {
  MAX_CONCURRENT_HASHES,
  MAX_WAITING_HASHES,
  PasswordHasher,
  PasswordsBusyError,
  type PasswordCost,
} from '../../api/passwords.ts';
import {
  InvalidAccessTokenError,
  TokenService,
  jwtSecret,
  loadOrCreateJwtSecret,
} from '../../api/tokens.ts';
import { silentLogger, type Logger } from '../../observability/logger.ts';
import { Metrics } from '../../observability/metrics.ts';
import { EmbeddedAccountStores } from '../../state/accounts/embedded.ts';
import type { Account } from '../../state/accounts/port.ts';

/** scrypt at 1 MiB: fast enough for tests, the same code path as production. */
const CHEAP: PasswordCost = { log2N: 10, r: 8, p: 1 };
const SECRET = new TextEncoder().encode('a test secret of at least thirty-two bytes');
const START = Date.UTC(2025, 0, 1);
const DAY_S = 24 * 3600;

interface Answer {
  status: number;
  headers: Headers;
  // eslint-disable-next-line @typescript-eslint/no-explicit-any
  body: any;
}

/** A PasswordHasher that records every hash it is asked to verify against. */
class CountingHasher extends PasswordHasher {
  readonly verified: Array<string | undefined> = [];
  override verify(password: string, encoded: string | undefined): Promise<boolean> {
    this.verified.push(encoded);
    return super.verify(password, encoded);
  }
}

/** A running API on a fresh data directory, with a clock the test moves. */
class Harness {
  clock = START;
  readonly published: Account[] = [];
  outbox!: AccountOutbox;
  /** While set, sending to `chat.accounts` fails with it (the log unreachable). */
  sendFails: Error | undefined;
  readonly logLines: string[] = [];
  readonly passwords = new CountingHasher(CHEAP);
  readonly tokens = new TokenService({ secret: SECRET, now: () => this.clock });
  private server!: Server;
  private stores!: EmbeddedAccountStores;
  private dir!: string;
  base!: string;

  async start(overrides: Partial<ApiDeps> = {}): Promise<this> {
    this.dir = await mkdtemp(join(tmpdir(), 'kchat-api-'));
    this.stores = await EmbeddedAccountStores.open(join(this.dir, 'accounts'));
    const lines = this.logLines;
    const logger: Logger = pino(
      { level: 'debug' },
      new Writable({
        write(chunk: Buffer, _encoding, callback) {
          lines.push(chunk.toString('utf8'));
          callback();
        },
      }),
    );
    this.outbox = new AccountOutbox({
      accounts: overrides.accounts ?? this.stores.accounts,
      send: async (account) => {
        if (this.sendFails) throw this.sendFails;
        this.published.push(account);
      },
      logger,
    });
    const app = createApi({
      accounts: this.stores.accounts,
      refreshTokens: this.stores.refreshTokens,
      tokens: this.tokens,
      passwords: this.passwords,
      outbox: this.outbox,
      logger,
      now: () => this.clock,
      ...overrides,
    });
    this.server = app.listen(0, '127.0.0.1');
    await once(this.server, 'listening');
    this.base = `http://127.0.0.1:${(this.server.address() as AddressInfo).port}`;
    return this;
  }

  async stop(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise((resolve) => this.server.close(resolve));
    await this.stores.close();
    await rm(this.dir, { recursive: true, force: true });
  }

  async call(
    method: string,
    path: string,
    options: { json?: unknown; raw?: BodyInit; token?: string; headers?: HeadersInit } = {},
  ): Promise<Answer> {
    const headers = new Headers(options.headers);
    if (options.json !== undefined) headers.set('content-type', 'application/json');
    if (options.token !== undefined) headers.set('authorization', `Bearer ${options.token}`);
    const response = await fetch(this.base + path, {
      method,
      headers,
      body: options.json !== undefined ? JSON.stringify(options.json) : options.raw,
      ...(options.raw instanceof ReadableStream ? { duplex: 'half' } : {}),
    } as RequestInit);
    const text = await response.text();
    return {
      status: response.status,
      headers: response.headers,
      body: text === '' ? undefined : JSON.parse(text),
    };
  }

  register(username: string, password = 'correct horse', displayName?: string) {
    return this.call('POST', '/v1/auth/register', { json: { username, password, displayName } });
  }

  login(username: string, password = 'correct horse') {
    return this.call('POST', '/v1/auth/login', { json: { username, password } });
  }

  refresh(refreshToken: string) {
    return this.call('POST', '/v1/auth/refresh', { json: { refreshToken } });
  }
}

/** Asserts PROTOCOL.md's error shape, exactly. */
function assertError(answer: Answer, status: number, code: string, field?: string): void {
  assert.equal(answer.status, status, JSON.stringify(answer.body));
  assert.match(answer.headers.get('content-type') ?? '', /^application\/json/);
  assert.deepEqual(Object.keys(answer.body), ['error']);
  const { error } = answer.body;
  assert.deepEqual(
    Object.keys(error).sort(),
    field === undefined ? ['code', 'message'] : ['code', 'field', 'message'],
  );
  assert.equal(error.code, code);
  assert.equal(typeof error.message, 'string');
  assert.ok(error.message.length > 0);
  if (field !== undefined) assert.equal(error.field, field);
}

function assertTokenPair(answer: Answer, status: number, userId: string): void {
  assert.equal(answer.status, status, JSON.stringify(answer.body));
  assert.deepEqual(Object.keys(answer.body).sort(), [
    'accessToken',
    'expiresIn',
    'refreshToken',
    'userId',
  ]);
  assert.equal(answer.body.userId, userId);
  assert.equal(answer.body.expiresIn, 900);
  assert.match(answer.body.accessToken, /^[\w-]+\.[\w-]+\.[\w-]+$/);
  assert.match(answer.body.refreshToken, /^[\w-]{43}$/, '32 bytes, base64url');
  assert.equal(answer.headers.get('cache-control'), 'no-store');
}

let counter = 0;
/** A username no other test uses. */
const fresh = (prefix = 'user') => `${prefix}${++counter}`;

describe('REST API: accounts', () => {
  let api: Harness;
  before(async () => {
    api = await new Harness().start();
  });
  after(async () => {
    await api.stop();
  });
  beforeEach(() => {
    api.clock = START;
  });

  describe('POST /v1/auth/register', () => {
    it('answers 201 with a token pair and publishes the public account', async () => {
      const answer = await api.register('alice', 'correct horse', 'Alice Liddell');
      assertTokenPair(answer, 201, 'alice');
      assert.deepEqual(api.published.at(-1), {
        userId: 'alice',
        displayName: 'Alice Liddell',
        createdAt: START,
      });
    });

    it('case-folds the username to lower case; the displayName defaults to the userId', async () => {
      const answer = await api.register('Bob.Smith_2-x');
      assertTokenPair(answer, 201, 'bob.smith_2-x');
      assert.deepEqual(api.published.at(-1), {
        userId: 'bob.smith_2-x',
        displayName: 'bob.smith_2-x',
        createdAt: START,
      });
    });

    it('trims the displayName; null means none', async () => {
      await api.register(fresh(), 'correct horse', '  Carol  ');
      assert.equal(api.published.at(-1)?.displayName, 'Carol');
      const userId = fresh();
      const answer = await api.call('POST', '/v1/auth/register', {
        json: { username: userId, password: 'correct horse', displayName: null },
      });
      assert.equal(answer.status, 201);
      assert.equal(api.published.at(-1)?.displayName, userId);
    });

    it('never publishes a password or its hash', async () => {
      const published = api.published.length;
      await api.register(fresh(), 'a secret password');
      assert.equal(api.published.length, published + 1);
      const account = api.published.at(-1)!;
      assert.deepEqual(Object.keys(account).sort(), ['createdAt', 'displayName', 'userId']);
      assert.doesNotMatch(JSON.stringify(api.published), /scrypt|a secret password/);
    });

    it('answers 409 for a taken username, also in another case, and publishes nothing', async () => {
      const userId = fresh('dave');
      assert.equal((await api.register(userId)).status, 201);
      const published = api.published.length;
      assertError(await api.register(userId, 'another password'), 409, 'conflict');
      assertError(await api.register(userId.toUpperCase()), 409, 'conflict');
      assert.equal(api.published.length, published);
      // The first account keeps its password.
      assert.equal((await api.login(userId, 'another password')).status, 401);
      assert.equal((await api.login(userId)).status, 200);
    });

    it("'Alice' after 'alice' is a 409", async () => {
      assertError(await api.register('Alice'), 409, 'conflict');
    });

    it('of 10 concurrent registrations of one username, one gets 201 and the others 409', async () => {
      const userId = fresh('erin');
      const answers = await Promise.all(
        Array.from({ length: 10 }, (_, i) => api.register(i % 2 ? userId : userId.toUpperCase())),
      );
      assert.deepEqual(
        answers.map((a) => a.status).sort(),
        [201, 409, 409, 409, 409, 409, 409, 409, 409, 409],
      );
      assert.equal(api.published.filter((a) => a.userId === userId).length, 1);
    });

    const badUsernames: Array<[string, unknown]> = [
      ['too short', 'ab'],
      ['too long', 'a'.repeat(33)],
      ['a space', 'al ice'],
      ['an @', 'al@ice'],
      ['a non-ASCII letter', 'zoë'],
      ['the Kelvin sign, whose lower case is an ASCII k', 'mar\u212Aus'],
      ['an empty string', ''],
      ['a number', 12345],
      ['null', null],
      ['an object', { name: 'alice' }],
    ];
    for (const [what, username] of badUsernames) {
      it(`answers 400 field username for ${what}`, async () => {
        const answer = await api.call('POST', '/v1/auth/register', {
          json: { username, password: 'correct horse' },
        });
        assertError(answer, 400, 'bad_request', 'username');
      });
    }

    it('answers 400 field username when it is missing', async () => {
      const answer = await api.call('POST', '/v1/auth/register', {
        json: { password: 'correct horse' },
      });
      assertError(answer, 400, 'bad_request', 'username');
      assert.match(answer.body.error.message, /required/);
    });

    it('accepts usernames of 3 and 32 characters', async () => {
      assertTokenPair(await api.register('x_3'), 201, 'x_3');
      const long = `${fresh('long')}-`.padEnd(32, 'z');
      assertTokenPair(await api.register(long), 201, long);
    });

    const badPasswords: Array<[string, unknown]> = [
      ['7 characters', '1234567'],
      ['257 characters', 'p'.repeat(257)],
      ['a number', 12345678],
      ['missing', undefined],
      ['null', null],
    ];
    for (const [what, password] of badPasswords) {
      it(`answers 400 field password for ${what}`, async () => {
        const answer = await api.call('POST', '/v1/auth/register', {
          json: { username: fresh(), password },
        });
        assertError(answer, 400, 'bad_request', 'password');
      });
    }

    it('accepts passwords of 8 and 256 characters, counted in code points', async () => {
      for (const password of ['12345678', 'p'.repeat(256), '😀'.repeat(256), '😀'.repeat(8)]) {
        const userId = fresh();
        assert.equal((await api.register(userId, password)).status, 201, `${password.length}`);
        assert.equal((await api.login(userId, password)).status, 200);
      }
      const answer = await api.register(fresh(), '😀'.repeat(7));
      assertError(answer, 400, 'bad_request', 'password');
    });

    const badDisplayNames: Array<[string, unknown]> = [
      ['empty', ''],
      ['only spaces', '   '],
      ['65 characters', 'd'.repeat(65)],
      ['a newline', 'two\nlines'],
      ['a number', 42],
      ['an array', ['Zed']],
      ['a right-to-left override', 'admin\u202Egnp.exe'],
      ['a bidi isolate', '\u2066support\u2069'],
      ['a zero-width space', 'ad\u200Bmin'],
      ['a byte order mark inside', 'sup\uFEFFport'],
    ];
    for (const [what, displayName] of badDisplayNames) {
      it(`answers 400 field displayName for ${what}`, async () => {
        const answer = await api.call('POST', '/v1/auth/register', {
          json: { username: fresh(), password: 'correct horse', displayName },
        });
        assertError(answer, 400, 'bad_request', 'displayName');
      });
    }

    it('accepts the joiners that scripts and emoji need (ZWNJ, ZWJ)', async () => {
      for (const displayName of [
        '\u0645\u06CC\u200C\u062E\u0648\u0627\u0647\u0645',
        '\u{1F468}\u200D\u{1F469}\u200D\u{1F467}',
      ]) {
        assert.equal((await api.register(fresh(), 'correct horse', displayName)).status, 201);
        assert.equal(api.published.at(-1)?.displayName, displayName);
      }
    });

    it('accepts a displayName of 64 characters, any script', async () => {
      const displayName = 'Ж'.repeat(32) + '名'.repeat(31) + '😀';
      assert.equal((await api.register(fresh(), 'correct horse', displayName)).status, 201);
      assert.equal(api.published.at(-1)?.displayName, displayName);
    });

    it('names the first field at fault when several are', async () => {
      const answer = await api.call('POST', '/v1/auth/register', {
        json: { username: 1, password: 2 },
      });
      assertError(answer, 400, 'bad_request', 'username');
    });

    it('ignores unknown fields', async () => {
      const userId = fresh();
      const answer = await api.call('POST', '/v1/auth/register', {
        json: { username: userId, password: 'correct horse', admin: true, passwordHash: 'x' },
      });
      assertTokenPair(answer, 201, userId);
      assert.equal((await api.login(userId)).status, 200);
    });

    it('ignores an unknown field named __proto__, as any other', async () => {
      const userId = fresh();
      const answer = await api.call('POST', '/v1/auth/register', {
        raw: `{"username":"${userId}","password":"correct horse","__proto__":{"admin":true}}`,
        headers: { 'content-type': 'application/json' },
      });
      assertTokenPair(answer, 201, userId);
    });

    it('answers 400 for a body that is not valid UTF-8, not reading it as U+FFFD', async () => {
      const userId = fresh();
      const body = (bytes: number[]) =>
        Buffer.concat([
          Buffer.from(`{"username":"${userId}","password":"correct `),
          Buffer.from(bytes),
          Buffer.from('"}'),
        ]);
      // Latin-1 "hörse": one byte that is no UTF-8, which a lenient reader makes U+FFFD.
      assertError(
        await api.call('POST', '/v1/auth/register', { raw: body([0x68, 0xf6, 0x72, 0x73, 0x65]) }),
        400,
        'bad_request',
      );
      assertError(
        await api.call('POST', '/v1/auth/login', { raw: body([0x68, 0xe4, 0x72, 0x73, 0x65]) }),
        400,
        'bad_request',
      );
      assert.equal((await api.register(userId, 'correct h\u00f6rse')).status, 201);
    });

    it('reads the body as JSON whatever its Content-Type', async () => {
      const userId = fresh();
      const answer = await api.call('POST', '/v1/auth/register', {
        raw: JSON.stringify({ username: userId, password: 'correct horse' }),
        headers: { 'content-type': 'text/plain' },
      });
      assertTokenPair(answer, 201, userId);
    });

    it('answers 400 without a field for malformed JSON', async () => {
      const answer = await api.call('POST', '/v1/auth/register', {
        raw: '{"username": "frank", "password": ',
        headers: { 'content-type': 'application/json' },
      });
      assertError(answer, 400, 'bad_request');
    });

    it('answers 400 without a field for a body that is not an object', async () => {
      for (const raw of ['[1, 2]', '"alice"', '42', 'null']) {
        const answer = await api.call('POST', '/v1/auth/register', {
          raw,
          headers: { 'content-type': 'application/json' },
        });
        assertError(answer, 400, 'bad_request');
      }
    });

    it('answers 400 field username for an empty body', async () => {
      const answer = await api.call('POST', '/v1/auth/register');
      assertError(answer, 400, 'bad_request', 'username');
    });

    it('answers 400 for a body that does not decode as its Content-Encoding says', async () => {
      for (const [encoding, raw] of [
        ['gzip', 'not gzip at all'],
        ['gzip', ''],
        ['deflate', 'xxxx'],
        ['br', 'xxxx'],
      ]) {
        const answer = await api.call('POST', '/v1/auth/register', {
          raw,
          headers: { 'content-type': 'application/json', 'content-encoding': encoding! },
        });
        assertError(answer, 400, 'bad_request');
      }
    });

    it('answers 413 for a body over 1 MiB', async () => {
      const raw = JSON.stringify({ username: fresh(), password: 'correct horse', pad: '' });
      const over = raw.replace(
        '"pad":""',
        `"pad":"${'x'.repeat(MAX_BODY_BYTES - raw.length + 1)}"`,
      );
      assert.equal(Buffer.byteLength(over), MAX_BODY_BYTES + 1);
      const answer = await api.call('POST', '/v1/auth/register', {
        raw: over,
        headers: { 'content-type': 'application/json' },
      });
      assertError(answer, 413, 'too_large');
    });

    it('answers 413 for a chunked body over 1 MiB, with no Content-Length', async () => {
      const chunk = new Uint8Array(64 * 1024).fill(0x20);
      let sent = 0;
      const raw = new ReadableStream<Uint8Array>({
        pull(controller) {
          if (sent === 0) controller.enqueue(new TextEncoder().encode('{"pad": "'));
          if (sent > 2 * MAX_BODY_BYTES) controller.close();
          else controller.enqueue(chunk);
          sent += chunk.length;
        },
      });
      const answer = await api.call('POST', '/v1/auth/register', { raw });
      assertError(answer, 413, 'too_large');
    });

    it('answers 413 for a gzip body over 1 MiB once inflated, and reads the rest of the upload', async () => {
      // Text that gzip shrinks only to about half: megabytes still to come when the limit hits.
      const gzipped = gzipSync(
        Buffer.from(`{"pad": "${randomBytes(3 * MAX_BODY_BYTES).toString('base64')}"}`),
      );
      let at = 0;
      const raw = new ReadableStream<Uint8Array>({
        pull(controller) {
          if (at >= gzipped.length) return controller.close();
          controller.enqueue(gzipped.subarray(at, at + 64 * 1024));
          at += 64 * 1024;
        },
      });
      const answer = await api.call('POST', '/v1/auth/register', {
        raw,
        headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' },
      });
      assertError(answer, 413, 'too_large');
      // On one connection: the 413, then the answer to the next request, which the server
      // reaches only by reading the rest of the upload (a decoder left in the way stalled it).
      const socket = connect(Number(new URL(api.base).port), '127.0.0.1');
      socket.write(
        'POST /v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n' +
          `Content-Length: ${gzipped.length}\r\n\r\n`,
      );
      socket.write(gzipped);
      socket.write('GET /v1/auth/verify HTTP/1.1\r\nHost: x\r\n\r\n');
      let replies = '';
      socket.setTimeout(5000, () => socket.destroy());
      for await (const chunk of socket) {
        replies += String(chunk);
        if (/HTTP\/1\.1 401/.test(replies)) break;
      }
      socket.destroy();
      assert.match(replies, /^HTTP\/1\.1 413 [\s\S]*HTTP\/1\.1 401 /);
    });

    it('accepts a body of exactly 1 MiB', async () => {
      const userId = fresh();
      const raw = JSON.stringify({ username: userId, password: 'correct horse', pad: '' });
      const exact = raw.replace('"pad":""', `"pad":"${'x'.repeat(MAX_BODY_BYTES - raw.length)}"`);
      assert.equal(Buffer.byteLength(exact), MAX_BODY_BYTES);
      const answer = await api.call('POST', '/v1/auth/register', {
        raw: exact,
        headers: { 'content-type': 'application/json' },
      });
      assertTokenPair(answer, 201, userId);
    });
  });

  describe('POST /v1/auth/login', () => {
    it('answers 200 with a token pair whose access token works', async () => {
      const userId = fresh('gina');
      await api.register(userId, 'gina password');
      const answer = await api.login(userId, 'gina password');
      assertTokenPair(answer, 200, userId);
      const me = await api.call('GET', '/v1/me', { token: answer.body.accessToken });
      assert.equal(me.status, 200);
      assert.equal(me.body.userId, userId);
    });

    it('takes the username in any case', async () => {
      const userId = fresh('hank');
      await api.register(userId);
      assertTokenPair(await api.login(userId.toUpperCase()), 200, userId);
    });

    it('answers the same 401 body for a wrong password and an unknown user', async () => {
      const userId = fresh('ivan');
      await api.register(userId);
      const wrongPassword = await api.login(userId, 'not the password');
      const unknownUser = await api.login(fresh('nobody'), 'correct horse');
      assertError(wrongPassword, 401, 'unauthorized');
      assertError(unknownUser, 401, 'unauthorized');
      assert.deepEqual(wrongPassword.body, unknownUser.body);
      // Every 401 carries a challenge (RFC 9110 §15.5.2), the login's too.
      assert.equal(wrongPassword.headers.get('www-authenticate'), 'Bearer realm="kchat"');
      assert.equal(
        wrongPassword.headers.get('www-authenticate'),
        unknownUser.headers.get('www-authenticate'),
      );
    });

    it('answers 503 unavailable while too many hashes wait, counting no failed login', async () => {
      class SometimesBusy extends PasswordHasher {
        busy = true;
        override verify(password: string, encoded: string | undefined): Promise<boolean> {
          return this.busy
            ? Promise.reject(new PasswordsBusyError())
            : super.verify(password, encoded);
        }
      }
      const passwords = new SometimesBusy(CHEAP);
      const busy = await new Harness().start({
        passwords,
        loginLimits: { ...DEFAULT_LOGIN_LIMITS, consecutiveFails: 3 },
      });
      try {
        await busy.register('busy');
        // More than the failures in a row that block: none of them was a failure.
        for (let i = 0; i < 5; i++) {
          const answer = await busy.login('busy');
          assertError(answer, 503, 'unavailable');
          assert.equal(answer.headers.get('retry-after'), '1');
        }
        passwords.busy = false;
        assert.equal((await busy.login('busy')).status, 200);
        assert.ok(!busy.logLines.some((line) => line.includes('request failed')));
      } finally {
        await busy.stop();
      }
    });

    it('spends a password verification for an unknown user too', async () => {
      api.passwords.verified.length = 0;
      await api.login(fresh('nobody'), 'correct horse');
      // The first call has no hash to check; it checks the same password against a decoy.
      assert.equal(api.passwords.verified.length, 2);
      assert.equal(api.passwords.verified[0], undefined);
      assert.match(api.passwords.verified[1]!, /^\$scrypt\$ln=10,r=8,p=1\$/);
    });

    it('normalizes passwords to NFC: a decomposed é matches a composed one', async () => {
      const userId = fresh('jose');
      await api.register(userId, 'caf\u00e9 au lait');
      assert.equal((await api.login(userId, 'cafe\u0301 au lait')).status, 200);
    });

    it('answers 400 for a malformed username or password, 401 for a short password', async () => {
      assertError(
        await api.call('POST', '/v1/auth/login', { json: { username: 42, password: 'x' } }),
        400,
        'bad_request',
        'username',
      );
      assertError(
        await api.call('POST', '/v1/auth/login', { json: { username: 'alice' } }),
        400,
        'bad_request',
        'password',
      );
      assertError(await api.login('alice', 'p'.repeat(257)), 400, 'bad_request', 'password');
      assertError(await api.login('alice', 'short'), 401, 'unauthorized');
    });

    it('refuses a password or display name holding a lone surrogate, which UTF-8 cannot keep', async () => {
      // Both would become U+FFFD in UTF-8: two different passwords, one hash.
      const userId = fresh('sam');
      const lone = 'correct horse \ud800';
      assertError(await api.register(userId, lone), 400, 'bad_request', 'password');
      assertError(await api.login(userId, lone), 400, 'bad_request', 'password');
      assertError(
        await api.register(userId, 'correct horse', 'Sam \udfff'),
        400,
        'bad_request',
        'displayName',
      );
      // A pair is one character, and fine.
      assert.equal((await api.register(userId, 'correct horse \ud83d\ude00')).status, 201);
      assert.equal((await api.login(userId, 'correct horse \ud83d\ude00')).status, 200);
      assert.equal((await api.login(userId, 'correct horse \ufffd')).status, 401);
    });
  });

  describe('POST /v1/auth/refresh', () => {
    it('answers a new pair, rotating the refresh token every time', async () => {
      const userId = fresh('kim');
      const first = (await api.register(userId)).body;
      const second = await api.refresh(first.refreshToken);
      assertTokenPair(second, 200, userId);
      assert.notEqual(second.body.refreshToken, first.refreshToken);
      const third = await api.refresh(second.body.refreshToken);
      assertTokenPair(third, 200, userId);
      const me = await api.call('GET', '/v1/me', { token: third.body.accessToken });
      assert.equal(me.body.userId, userId);
    });

    it('a used refresh token answers 401, and revokes the tokens rotated from it', async () => {
      const userId = fresh('leo');
      const first = (await api.register(userId)).body.refreshToken;
      const second = (await api.refresh(first)).body.refreshToken;
      const other = (await api.login(userId)).body.refreshToken; // another family
      assertError(await api.refresh(first), 401, 'unauthorized');
      assertError(await api.refresh(second), 401, 'unauthorized');
      assertTokenPair(await api.refresh(other), 200, userId);
      assert.ok(api.logLines.some((line) => line.includes('refresh token reused')));
    });

    it('a reuse after several rotations revokes the latest token of the family', async () => {
      const userId = fresh('mia');
      const tokens = [(await api.register(userId)).body.refreshToken as string];
      for (let i = 0; i < 3; i++)
        tokens.push((await api.refresh(tokens.at(-1)!)).body.refreshToken);
      assertError(await api.refresh(tokens[1]!), 401, 'unauthorized');
      assertError(await api.refresh(tokens.at(-1)!), 401, 'unauthorized');
    });

    it('answers 401 for an unknown refresh token', async () => {
      assertError(
        await api.refresh('bm90IGEgcmVmcmVzaCB0b2tlbiB3ZSBpc3N1ZWQ'),
        401,
        'unauthorized',
      );
    });

    it('answers 401 for an expired refresh token (30 days)', async () => {
      const userId = fresh('ned');
      const { refreshToken } = (await api.register(userId)).body;
      const { refreshToken: stillFresh } = (await api.login(userId)).body;
      api.clock = START + 30 * DAY_S * 1000 - 1;
      assertTokenPair(await api.refresh(stillFresh), 200, userId);
      api.clock = START + 30 * DAY_S * 1000;
      assertError(await api.refresh(refreshToken), 401, 'unauthorized');
    });

    it('answers 400 field refreshToken when it is missing or not a string', async () => {
      for (const json of [{}, { refreshToken: 123 }, { refreshToken: '' }]) {
        const answer = await api.call('POST', '/v1/auth/refresh', { json });
        assertError(answer, 400, 'bad_request', 'refreshToken');
      }
    });
  });

  describe('POST /v1/auth/logout', () => {
    it('answers 204 and revokes the refresh token, not the access token', async () => {
      const userId = fresh('olga');
      const { accessToken, refreshToken } = (await api.register(userId)).body;
      const answer = await api.call('POST', '/v1/auth/logout', { json: { refreshToken } });
      assert.equal(answer.status, 204);
      assert.equal(answer.body, undefined);
      assertError(await api.refresh(refreshToken), 401, 'unauthorized');
      assert.equal((await api.call('GET', '/v1/me', { token: accessToken })).status, 200);
    });

    it('revokes the whole family for a token already rotated, as a refresh with it would', async () => {
      const { refreshToken: first } = (await api.register(fresh())).body;
      const { refreshToken: second } = (await api.refresh(first)).body;
      assert.equal(
        (await api.call('POST', '/v1/auth/logout', { json: { refreshToken: first } })).status,
        204,
      );
      assertError(await api.refresh(second), 401, 'unauthorized');
    });

    it('answers 204 for an unknown token, and for one already logged out', async () => {
      const { refreshToken } = (await api.register(fresh())).body;
      for (const token of ['unknown-token', refreshToken, refreshToken]) {
        const answer = await api.call('POST', '/v1/auth/logout', {
          json: { refreshToken: token },
        });
        assert.equal(answer.status, 204);
      }
    });

    it('answers 400 field refreshToken when it is missing', async () => {
      const answer = await api.call('POST', '/v1/auth/logout', { json: {} });
      assertError(answer, 400, 'bad_request', 'refreshToken');
    });
  });

  describe('GET /v1/auth/verify', () => {
    let userId: string;
    let accessToken: string;
    before(async () => {
      userId = fresh('pia');
      api.clock = START;
      ({ accessToken } = (await api.register(userId)).body);
    });

    it('answers 204 with X-User-Id for a valid bearer token', async () => {
      const answer = await api.call('GET', '/v1/auth/verify', { token: accessToken });
      assert.equal(answer.status, 204);
      assert.equal(answer.headers.get('x-user-id'), userId);
      assert.equal(answer.body, undefined);
    });

    it('takes the scheme in any case', async () => {
      const answer = await api.call('GET', '/v1/auth/verify', {
        headers: { authorization: `bearer ${accessToken}` },
      });
      assert.equal(answer.status, 204);
    });

    it('answers 401 without a token, saying how to authenticate', async () => {
      const answer = await api.call('GET', '/v1/auth/verify');
      assertError(answer, 401, 'unauthorized');
      assert.equal(answer.headers.get('www-authenticate'), 'Bearer realm="kchat"');
      assert.equal(answer.headers.get('x-user-id'), null);
    });

    it('answers 401 for another scheme', async () => {
      const answer = await api.call('GET', '/v1/auth/verify', {
        headers: { authorization: `Basic ${Buffer.from('pia:pw').toString('base64')}` },
      });
      assertError(answer, 401, 'unauthorized');
      assert.match(answer.headers.get('www-authenticate')!, /error="invalid_request"/);
    });

    it('answers 401 for a tampered token', async () => {
      const [header, payload, signature] = accessToken.split('.');
      const claims = JSON.parse(Buffer.from(payload!, 'base64url').toString());
      const forged = Buffer.from(JSON.stringify({ ...claims, sub: 'admin' })).toString('base64url');
      const flipped = (signature!.startsWith('A') ? 'B' : 'A') + signature!.slice(1);
      for (const token of [`${header}.${forged}.${signature}`, `${header}.${payload}.${flipped}`]) {
        const answer = await api.call('GET', '/v1/auth/verify', { token });
        assertError(answer, 401, 'unauthorized');
        assert.match(answer.headers.get('www-authenticate')!, /error="invalid_token"/);
      }
    });

    it('answers 401 for a token signed with another secret, or unsigned', async () => {
      const iat = Math.floor(START / 1000);
      const otherSecret = await new SignJWT({})
        .setProtectedHeader({ alg: 'HS256' })
        .setSubject(userId)
        .setIssuedAt(iat)
        .setExpirationTime(iat + 900)
        .sign(new TextEncoder().encode('another secret of at least thirty-two bytes'));
      const none = [
        Buffer.from(JSON.stringify({ alg: 'none', typ: 'JWT' })).toString('base64url'),
        Buffer.from(JSON.stringify({ sub: userId, iat, exp: iat + 900 })).toString('base64url'),
        '',
      ].join('.');
      for (const token of [otherSecret, none, 'not-a-jwt']) {
        assertError(await api.call('GET', '/v1/auth/verify', { token }), 401, 'unauthorized');
      }
    });

    it('answers 401 once the access token has expired (900 s)', async () => {
      api.clock = START + 899_000;
      assert.equal((await api.call('GET', '/v1/auth/verify', { token: accessToken })).status, 204);
      api.clock = START + 900_000;
      assertError(
        await api.call('GET', '/v1/auth/verify', { token: accessToken }),
        401,
        'unauthorized',
      );
    });
  });

  describe('GET /v1/me', () => {
    it('answers the account', async () => {
      const userId = fresh('quinn');
      api.clock = START + 1234;
      const { accessToken } = (await api.register(userId, 'correct horse', 'Quinn')).body;
      const answer = await api.call('GET', '/v1/me', { token: accessToken });
      assert.equal(answer.status, 200);
      assert.deepEqual(answer.body, { userId, displayName: 'Quinn', createdAt: START + 1234 });
    });

    it('answers 401 without a token, with an expired token, with a tampered token', async () => {
      const { accessToken } = (await api.register(fresh('rosa'))).body;
      assertError(await api.call('GET', '/v1/me'), 401, 'unauthorized');
      const tampered = accessToken.slice(0, -2) + (accessToken.endsWith('AA') ? 'BB' : 'AA');
      assertError(await api.call('GET', '/v1/me', { token: tampered }), 401, 'unauthorized');
      api.clock = START + 900_000;
      assertError(await api.call('GET', '/v1/me', { token: accessToken }), 401, 'unauthorized');
    });

    it('answers 401 for a valid token whose account does not exist', async () => {
      const { accessToken } = await api.tokens.issueAccessToken('ghost');
      assertError(await api.call('GET', '/v1/me', { token: accessToken }), 401, 'unauthorized');
    });
  });

  describe('errors', () => {
    it('answers 404 not_found in the error shape for an unknown route', async () => {
      for (const [method, path] of [
        ['GET', '/'],
        ['GET', '/v1/nothing'],
        ['POST', '/v1/auth/nothing'],
        ['GET', '/v2/me'],
      ] as const) {
        assertError(await api.call(method, path), 404, 'not_found');
      }
    });

    it('answers 503 unavailable, not 404 or 405, on the routes PROTOCOL names that are not built yet', async () => {
      for (const [method, path] of [
        ['PATCH', '/v1/me'],
        ['GET', '/v1/users/alice'],
        ['POST', '/v1/contacts/sync'],
        ['PUT', '/v1/devices/phone'],
        ['DELETE', '/v1/devices/phone'],
        ['POST', '/v1/groups'],
        ['GET', '/v1/groups'],
        ['GET', '/v1/groups/g1'],
        ['PATCH', '/v1/groups/g1'],
        ['POST', '/v1/groups/g1/members'],
        ['DELETE', '/v1/groups/g1/members/alice'],
        ['PUT', '/v1/groups/g1/members/alice/role'],
        ['GET', '/v1/messages?with=alice'],
      ] as const) {
        const answer = await api.call(method, path);
        assertError(answer, 503, 'unavailable');
        assert.match(String(answer.body.error.message), /not available in this version/);
      }
      // Around them, the router answers as before.
      assertError(await api.call('GET', '/v1/users'), 404, 'not_found');
      assertError(await api.call('POST', '/v1/users/alice'), 405, 'bad_request');
    });

    it('answers 405 with Allow for a known path and another method', async () => {
      const answer = await api.call('GET', '/v1/auth/login');
      assertError(answer, 405, 'bad_request');
      assert.match(answer.headers.get('allow') ?? '', /POST/);
      assertError(await api.call('DELETE', '/v1/me'), 405, 'bad_request');
    });

    it('lets a browser page on another origin call it (CORS): preflight, and errors it can read', async () => {
      const origin = { origin: 'https://chat.example' };
      const preflight = await api.call('OPTIONS', '/v1/auth/login', {
        headers: {
          ...origin,
          'access-control-request-method': 'POST',
          'access-control-request-headers': 'content-type',
        },
      });
      assert.equal(preflight.status, 204);
      assert.equal(preflight.headers.get('access-control-allow-origin'), '*');
      assert.match(preflight.headers.get('access-control-allow-methods') ?? '', /POST/);
      assert.match(preflight.headers.get('access-control-allow-headers') ?? '', /Authorization/);
      assert.equal(preflight.headers.get('access-control-allow-credentials'), null);
      const refused = await api.call('POST', '/v1/auth/login', {
        json: { username: fresh(), password: 'wrong password' },
        headers: origin,
      });
      assertError(refused, 401, 'unauthorized');
      assert.equal(refused.headers.get('access-control-allow-origin'), '*');
      assert.match(refused.headers.get('access-control-expose-headers') ?? '', /WWW-Authenticate/);
      // An OPTIONS that is no preflight is answered by the router: 200 with Allow.
      const options = await api.call('OPTIONS', '/v1/auth/login');
      assert.equal(options.status, 200);
      assert.match(options.headers.get('allow') ?? '', /POST/);
    });

    it('never logs a password, its hash, or a refresh token', async () => {
      const password = 'a very secret passphrase';
      const userId = fresh('sam');
      const { refreshToken } = (await api.register(userId, password)).body;
      await api.login(userId, password);
      await api.login(userId, `${password}!`);
      await api.refresh(refreshToken);
      await api.refresh(refreshToken);
      const logs = api.logLines.join('');
      assert.ok(logs.includes(userId), 'the logs do mention the user');
      assert.ok(!logs.includes('secret passphrase'));
      assert.ok(!logs.includes('$scrypt$'));
      assert.ok(!logs.includes(refreshToken));
    });
  });

  describe('failures', () => {
    let broken: Harness;
    afterEach(async () => {
      await broken.stop();
    });

    it('answers 500 internal without the cause, and logs it', async () => {
      broken = await new Harness().start({
        accounts: {
          get: async () => {
            throw new Error('disk on fire at /var/lib/secret-path');
          },
          create: async () => {},
          updateDisplayName: async () => undefined,
          unpublished: async () => [],
          markPublished: async () => {},
        },
      });
      const answer = await broken.login('alice');
      assertError(answer, 500, 'internal');
      assert.doesNotMatch(JSON.stringify(answer.body), /disk on fire|secret-path/);
      assert.ok(broken.logLines.some((line) => line.includes('disk on fire')));
    });

    it('registers while chat.accounts is unreachable, and the outbox publishes the account once it is back', async () => {
      broken = await new Harness().start();
      broken.sendFails = new Error('log unreachable');
      assertTokenPair(await broken.register('tom'), 201, 'tom');
      assertTokenPair(await broken.register('uma', 'correct horse', 'Uma'), 201, 'uma');
      assert.equal(broken.published.length, 0);
      assert.ok(broken.logLines.some((line) => line.includes('log unreachable')));
      assert.equal(await broken.outbox.flush(), 0, 'still down: nothing published');

      broken.sendFails = undefined;
      assert.equal(await broken.outbox.flush(), 2);
      assert.deepEqual(broken.published.map((a) => [a.userId, a.displayName]).sort(), [
        ['tom', 'tom'],
        ['uma', 'Uma'],
      ]);
      assert.equal(await broken.outbox.flush(), 0, 'confirmed: the outbox is empty');
      assertTokenPair(await broken.login('tom'), 200, 'tom');
    });
  });
});

describe('REST API: metrics', () => {
  it('times every answer by method, route (never the raw path) and status, and counts the outbox backlog', async () => {
    const metrics = new Metrics();
    const api = await new Harness().start({ metrics });
    try {
      await api.register('mia');
      await api.login('mia', 'wrong password');
      await api.call('GET', '/v1/users/someone-secret');
      await api.call('GET', '/v1/nowhere/else');
      api.sendFails = new Error('log unreachable');
      await api.register('nia');
      const text = await metrics.text();
      const count = (labels: string) =>
        Number(new RegExp(`kchat_api_request_seconds_count\\{${labels}\\} (\\d+)`).exec(text)?.[1]);
      assert.equal(count('method="POST",route="/v1/auth/register",status="201"'), 2);
      assert.equal(count('method="POST",route="/v1/auth/login",status="401"'), 1);
      assert.equal(count('method="GET",route="/v1/users/:userId",status="503"'), 1);
      assert.equal(count('method="GET",route="unmatched",status="404"'), 1);
      assert.doesNotMatch(text, /someone-secret|nowhere/, 'a raw path as a label');
      assert.match(text, /kchat_api_outbox_pending 1\b/, 'nia is not on chat.accounts yet');
    } finally {
      await api.stop();
    }
  });
});

describe('AccountOutbox', () => {
  it('never leaves an older version of an account last on chat.accounts (a flush racing a rename)', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-outbox-'));
    const stores = await EmbeddedAccountStores.open(dir, { purgeIntervalMs: 0 });
    try {
      const topic: Account[] = [];
      let release!: () => void;
      const gate = new Promise<void>((resolve) => (release = resolve));
      let sends = 0;
      const outbox = new AccountOutbox({
        accounts: stores.accounts,
        send: async (account) => {
          // The first send (the flush's) is slow; the rename's goes straight through.
          if (sends++ === 0) await gate;
          topic.push(account);
        },
        logger: silentLogger,
      });
      await stores.accounts.create({
        userId: 'ana',
        displayName: 'Ana',
        createdAt: 1,
        passwordHash: 'h',
      });
      const flushed = outbox.flush(); // holds 'Ana' from the outbox, and sends it slowly
      await new Promise((resolve) => setTimeout(resolve, 20));
      const renamed = await stores.accounts.updateDisplayName('ana', 'Ana B.');
      const published = outbox.publish({
        userId: 'ana',
        displayName: renamed!.displayName,
        createdAt: renamed!.createdAt,
      });
      await new Promise((resolve) => setTimeout(resolve, 20));
      release();
      await Promise.all([flushed, published]);
      await outbox.flush();
      assert.equal(topic.at(-1)?.displayName, 'Ana B.', JSON.stringify(topic));
      assert.deepEqual(await stores.accounts.unpublished(10), []);
    } finally {
      await stores.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('PasswordHasher', () => {
  const hasher = new PasswordHasher(CHEAP);

  it('hashes to a PHC string with a fresh salt each time, and verifies', async () => {
    const [a, b] = [await hasher.hash('correct horse'), await hasher.hash('correct horse')];
    assert.match(a, /^\$scrypt\$ln=10,r=8,p=1\$[A-Za-z0-9+/]{22}\$[A-Za-z0-9+/]{43}$/);
    assert.notEqual(a, b);
    assert.equal(await hasher.verify('correct horse', a), true);
    assert.equal(await hasher.verify('correct horse!', a), false);
    assert.equal(await hasher.verify('correct horse', undefined), false);
  });

  it('verifies with the parameters stored in the hash, not its own', async () => {
    const old = await new PasswordHasher({ log2N: 11, r: 4, p: 2 }).hash('correct horse');
    assert.equal(await hasher.verify('correct horse', old), true);
  });

  it('refuses a stored hash that is not its format', async () => {
    await assert.rejects(hasher.verify('x', 'plain text'), /not an scrypt PHC string/);
  });

  it(`runs ${MAX_CONCURRENT_HASHES} hashes at once, queues ${MAX_WAITING_HASHES}, and refuses more`, async () => {
    const limited = new PasswordHasher(CHEAP);
    const stored = await limited.hash('correct horse');
    let most = 0;
    const sampler = setInterval(() => (most = Math.max(most, limited.load.running)), 0);
    const asked = MAX_CONCURRENT_HASHES + MAX_WAITING_HASHES + 5;
    const outcomes = await Promise.allSettled(
      Array.from({ length: asked }, () => limited.verify('correct horse', stored)),
    );
    clearInterval(sampler);
    const refused = outcomes.filter((o) => o.status === 'rejected');
    assert.equal(refused.length, 5);
    for (const o of refused) assert.ok(o.reason instanceof PasswordsBusyError);
    assert.ok(outcomes.every((o) => o.status === 'rejected' || o.value === true));
    assert.ok(most >= 1 && most <= MAX_CONCURRENT_HASHES, `${most} ran at once`);
    // And then it takes hashes again, the unknown user's decoy too.
    assert.equal(await limited.verify('correct horse', undefined), false);
  });

  it('does not keep a decoy that failed: the next unknown user gets one made', async () => {
    const limited = new PasswordHasher(CHEAP);
    const stored = await limited.hash('correct horse');
    const busy = Array.from({ length: MAX_CONCURRENT_HASHES + MAX_WAITING_HASHES }, () =>
      limited.verify('correct horse', stored),
    );
    await assert.rejects(limited.verify('x', undefined), PasswordsBusyError);
    await Promise.all(busy);
    assert.equal(await limited.verify('x', undefined), false);
  });
});

describe('TokenService', () => {
  let now = START;
  const tokens = new TokenService({ secret: SECRET, now: () => now });

  it('issues access tokens with sub, iat and exp, valid for 900 s by default', async () => {
    now = START;
    const { accessToken, expiresIn } = await tokens.issueAccessToken('alice');
    assert.equal(expiresIn, 900);
    const header = JSON.parse(Buffer.from(accessToken.split('.')[0]!, 'base64url').toString());
    const claims = JSON.parse(Buffer.from(accessToken.split('.')[1]!, 'base64url').toString());
    assert.deepEqual(header, { alg: 'HS256', typ: 'JWT' });
    assert.deepEqual(claims, { sub: 'alice', iat: START / 1000, exp: START / 1000 + 900 });
    assert.equal(await tokens.verifyAccessToken(accessToken), 'alice');
    now = START + 900_000;
    await assert.rejects(tokens.verifyAccessToken(accessToken), InvalidAccessTokenError);
  });

  it('stays valid for the whole expiresIn, whatever the millisecond it was issued at', async () => {
    now = START + 999;
    const { accessToken, expiresIn } = await tokens.issueAccessToken('alice');
    now += expiresIn * 1000 - 1;
    assert.equal(await tokens.verifyAccessToken(accessToken), 'alice');
    now = START + 1_000 + expiresIn * 1000;
    await assert.rejects(tokens.verifyAccessToken(accessToken), InvalidAccessTokenError);
  });

  it('verifies as a plain function, as the gateway takes it', async () => {
    now = START;
    const { accessToken } = await tokens.issueAccessToken('carol');
    const verify: (token: string) => Promise<string> = tokens.verifyAccessToken;
    assert.equal(await verify(accessToken), 'carol');
  });

  it('refuses a well-signed token without an expiry or a subject', async () => {
    now = START;
    const iat = START / 1000;
    const noExpiry = await new SignJWT({})
      .setProtectedHeader({ alg: 'HS256' })
      .setSubject('alice')
      .setIssuedAt(iat)
      .sign(SECRET);
    const noSubject = await new SignJWT({})
      .setProtectedHeader({ alg: 'HS256' })
      .setIssuedAt(iat)
      .setExpirationTime(iat + 900)
      .sign(SECRET);
    for (const token of [noExpiry, noSubject])
      await assert.rejects(tokens.verifyAccessToken(token), InvalidAccessTokenError);
  });

  it('takes another lifetime', async () => {
    const short = new TokenService({ secret: SECRET, accessTokenTtlS: 60, now: () => START });
    assert.equal((await short.issueAccessToken('bob')).expiresIn, 60);
  });

  it('refuses a secret shorter than 32 bytes', () => {
    assert.throws(() => new TokenService({ secret: 'short' }), /at least 32 bytes/);
    assert.throws(() => new TokenService({ secret: new Uint8Array(31) }), /at least 32 bytes/);
  });

  it('makes refresh tokens of 32 random bytes, expiring in 30 days, stored by hash', () => {
    now = START;
    const a = tokens.newRefreshToken();
    const b = tokens.newRefreshToken();
    assert.equal(Buffer.from(a.refreshToken, 'base64url').length, 32);
    assert.notEqual(a.refreshToken, b.refreshToken);
    assert.match(a.hash, /^[0-9a-f]{64}$/);
    assert.notEqual(a.hash, a.refreshToken);
    assert.equal(a.expiresAt, START + 30 * DAY_S * 1000);
  });

  describe('the JWT secret', () => {
    let dir: string;
    beforeEach(async () => {
      dir = await mkdtemp(join(tmpdir(), 'kchat-secret-'));
    });
    afterEach(async () => {
      await rm(dir, { recursive: true, force: true });
    });

    it('is generated once per data directory, kept with mode 0600', async () => {
      const dataDir = join(dir, 'data');
      const first = await loadOrCreateJwtSecret(dataDir);
      assert.equal(first.length, 32);
      assert.equal((await stat(join(dataDir, 'jwt-secret'))).mode & 0o777, 0o600);
      assert.deepEqual(await loadOrCreateJwtSecret(dataDir), first);
      assert.notDeepEqual(await loadOrCreateJwtSecret(join(dir, 'other')), first);
      // Tokens signed before a restart verify after it.
      const before = new TokenService({ secret: first });
      const after = new TokenService({ secret: await loadOrCreateJwtSecret(dataDir) });
      const { accessToken } = await before.issueAccessToken('alice');
      assert.equal(await after.verifyAccessToken(accessToken), 'alice');
    });

    it('is JWT_SECRET when set, and then nothing is written', async () => {
      const secret = await jwtSecret('a configured secret of at least 32 bytes', dir);
      assert.equal(new TextDecoder().decode(secret), 'a configured secret of at least 32 bytes');
      await assert.rejects(readFile(join(dir, 'jwt-secret')), { code: 'ENOENT' });
      assert.equal((await jwtSecret(undefined, dir)).length, 32);
    });

    it('refuses a damaged secret file instead of replacing it', async () => {
      await writeFile(join(dir, 'jwt-secret'), 'short\n');
      await assert.rejects(loadOrCreateJwtSecret(dir), /no valid JWT secret/);
    });
  });
});

describe('REST API: the bodies read at once, bounded together and per client address', () => {
  let api: Harness;
  let held: ReturnType<typeof connect> | undefined;
  afterEach(async () => {
    held?.destroy();
    await api.stop();
  });

  it('answers 503 with Retry-After while other bodies hold the budget, reads one alone whatever its size, and frees the budget when a body is read', async () => {
    api = await new Harness().start({ bodyBudgetBytes: 4096 });
    const port = Number(new URL(api.base).port);
    // A slow upload of 3,000 bytes: its headers, then only the start of its body.
    const body = JSON.stringify({ username: 'slow', password: 'correct horse' });
    const padded = body + ' '.repeat(3000 - body.length);
    held = connect(port, '127.0.0.1');
    let replies = '';
    held.on('data', (chunk) => (replies += String(chunk)));
    held.write(
      'POST /v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n' +
        `Content-Length: ${padded.length}\r\n\r\n${padded.slice(0, 10)}`,
    );
    // 2,000 more bytes would go over 4,096: refused once the slow one is being read.
    const second = { username: 'fast', password: 'short', pad: 'x'.repeat(1900) };
    let answer = await api.call('POST', '/v1/auth/register', { json: second });
    for (let i = 0; i < 100 && answer.status !== 503; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      answer = await api.call('POST', '/v1/auth/register', { json: second });
    }
    assertError(answer, 503, 'unavailable');
    assert.equal(answer.headers.get('retry-after'), '1');
    // Requests without a body are not held up.
    assertError(await api.call('GET', '/v1/auth/verify'), 401, 'unauthorized');
    // The slow upload ends and is answered; the budget is free again.
    held.write(padded.slice(10));
    for (let i = 0; i < 100 && !/\r\n\r\n/.test(replies); i++)
      await new Promise((resolve) => setTimeout(resolve, 20));
    assert.match(replies, /^HTTP\/1\.1 201 /);
    assertError(
      await api.call('POST', '/v1/auth/register', { json: second }),
      400,
      'bad_request',
      'password',
    );
    // A body larger than the whole budget, alone, is read.
    const large = { username: 'large', password: 'correct horse', pad: 'x'.repeat(8000) };
    assert.equal((await api.call('POST', '/v1/auth/register', { json: large })).status, 201);
  });

  it("answers 429 to an address over its share while others are read (found by a security review: one address's idle uploads made every POST answer 503)", async () => {
    api = await new Harness().start({
      bodyBudgetPerClientBytes: 4096,
      trustProxy: true,
    });
    const port = Number(new URL(api.base).port);
    // 10.0.0.1 holds 3,000 bytes open.
    held = connect(port, '127.0.0.1');
    held.write(
      'POST /v1/auth/register HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 10.0.0.1\r\n' +
        'Content-Length: 3000\r\n\r\n{"username"',
    );
    const from = (address: string) =>
      api.call('POST', '/v1/auth/register', {
        json: { username: 'fast', password: 'short', pad: 'x'.repeat(1900) },
        headers: { 'x-forwarded-for': address },
      });
    let answer = await from('10.0.0.1');
    for (let i = 0; i < 100 && answer.status !== 429; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      answer = await from('10.0.0.1');
    }
    assertError(answer, 429, 'rate_limited');
    assert.equal(answer.headers.get('retry-after'), '1');
    // Another address is read meanwhile (and answered: the password is too short).
    assertError(await from('10.0.0.2'), 400, 'bad_request', 'password');
  });

  it('gives back what a compressed upload cut off mid-body had reserved (found by a review helper: it was held for good)', async () => {
    api = await new Harness().start({ bodyBudgetBytes: 4096 });
    const port = Number(new URL(api.base).port);
    const gzipped = gzipSync(
      Buffer.from(JSON.stringify({ pad: randomBytes(4096).toString('hex') })),
    );
    held = connect(port, '127.0.0.1');
    await once(held, 'connect');
    held.write(
      'POST /v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Encoding: gzip\r\n' +
        `Content-Length: ${gzipped.length}\r\n\r\n`,
    );
    held.write(gzipped.subarray(0, 100));
    const small = () =>
      api.call('POST', '/v1/auth/register', { json: { username: 'smallone', password: 'short' } });
    let answer = await small();
    for (let i = 0; i < 100 && answer.status !== 503; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      answer = await small();
    }
    assertError(answer, 503, 'unavailable'); // the upload holds its 1 MiB
    held.destroy(); // the client goes away mid-body
    for (let i = 0; i < 100 && answer.status === 503; i++) {
      await new Promise((resolve) => setTimeout(resolve, 20));
      answer = await small();
    }
    assertError(answer, 400, 'bad_request', 'password');
  });

  it('answers 413 to a declared length over 1 MiB whatever the budget holds', async () => {
    api = await new Harness().start({ bodyBudgetBytes: 4096, bodyBudgetPerClientBytes: 4096 });
    const port = Number(new URL(api.base).port);
    held = connect(port, '127.0.0.1');
    held.write('POST /v1/auth/register HTTP/1.1\r\nHost: x\r\nContent-Length: 3000\r\n\r\n{"user');
    await new Promise((resolve) => setTimeout(resolve, 100));
    const over = await api.call('POST', '/v1/auth/register', {
      raw: `{"pad":"${'x'.repeat(MAX_BODY_BYTES)}"}`,
      headers: { 'content-type': 'application/json' },
    });
    assertError(over, 413, 'too_large');
  });

  it('refuses a body that nests deeper than 64 levels or holds more than 20,000 values, before parsing it', async () => {
    api = await new Harness().start();
    const nested = (levels: number) =>
      `{"username":"${fresh()}","password":"correct horse","pad":${'['.repeat(levels)}${']'.repeat(levels)}}`;
    const register = (raw: string) =>
      api.call('POST', '/v1/auth/register', {
        raw,
        headers: { 'content-type': 'application/json' },
      });
    assert.equal((await register(nested(63))).status, 201, '64 levels with the object');
    const deep = await register(nested(64));
    assertError(deep, 400, 'bad_request');
    assert.match(deep.body.error.message, /nests deeper than 64 levels/);
    // The gzip of half a million levels is about 1 KB.
    const bomb = await api.call('POST', '/v1/auth/login', {
      raw: gzipSync(`{"x":${'['.repeat(500_000)}${']'.repeat(500_000)}}`),
      headers: { 'content-type': 'application/json', 'content-encoding': 'gzip' },
    });
    assertError(bomb, 400, 'bad_request');
    const many = await register(
      `{"username":"${fresh()}","password":"correct horse","pad":[${'1,'.repeat(20_000)}1]}`,
    );
    assertError(many, 400, 'bad_request');
    assert.match(many.body.error.message, /more than 20000 values/);
    // Brackets and separators inside strings are text.
    const text = `{"username":"${fresh()}","password":"correct horse","pad":"${'[,:'.repeat(30_000)}"}`;
    assert.equal((await register(text)).status, 201);
  });
});

describe('REST API: registrations are limited per client address', () => {
  let api: Harness;
  afterEach(async () => {
    await api.stop();
  });
  const registerFrom = (address: string, username: string) =>
    api.call('POST', '/v1/auth/register', {
      json: { username, password: 'correct horse' },
      headers: { 'x-forwarded-for': address },
    });

  it('answers 429 with Retry-After after 3 in an hour from an address, a taken name counted too; other addresses go on', async () => {
    api = await new Harness().start({ registrationsPerHour: 3, trustProxy: true });
    assert.equal((await registerFrom('10.0.0.1', 'ann')).status, 201);
    assertError(await registerFrom('10.0.0.1', 'ann'), 409, 'conflict');
    assert.equal((await registerFrom('10.0.0.1', 'bea')).status, 201);
    const refused = await registerFrom('10.0.0.1', 'cal');
    assertError(refused, 429, 'rate_limited');
    const retryAfter = Number(refused.headers.get('retry-after'));
    assert.ok(retryAfter > 3000 && retryAfter <= 3600, `Retry-After ${retryAfter}`);
    assert.equal((await api.login('cal')).status, 401, 'no account made');
    assert.equal((await registerFrom('10.0.0.2', 'cal')).status, 201);
  });

  it('takes no limit at 0', async () => {
    api = await new Harness().start({ registrationsPerHour: 0 });
    for (let i = 0; i < 120; i++) assert.equal((await api.register(`user${i}`)).status, 201);
  });
});

describe('REST API: refreshes are limited per address', () => {
  let api: Harness;
  afterEach(async () => {
    await api.stop();
  });

  it('answers 429 with Retry-After past the hour’s refreshes from an address', async () => {
    api = await new Harness().start({ refreshesPerHour: 3 });
    let { refreshToken } = (await api.register('gil')).body;
    for (let i = 0; i < 3; i++) {
      const answer = await api.refresh(refreshToken);
      assert.equal(answer.status, 200);
      refreshToken = answer.body.refreshToken;
    }
    const refused = await api.refresh(refreshToken);
    assertError(refused, 429, 'rate_limited');
    assert.ok(Number(refused.headers.get('retry-after')) > 3000);
  });
});

describe('REST API: failed logins are throttled', () => {
  const limits = {
    consecutiveFails: 3,
    consecutiveBlockS: 60,
    failsPerDay: 5,
    dailyBlockS: 3600,
    perMinute: 30,
  };
  let api: Harness;
  afterEach(async () => {
    await api.stop();
  });
  const loginFrom = (address: string, username: string, password = 'correct horse') =>
    api.call('POST', '/v1/auth/login', {
      json: { username, password },
      headers: { 'x-forwarded-for': address },
    });

  it('blocks a username from an address at the 3rd failure in a row, the right password too, before hashing; other usernames go on', async () => {
    api = await new Harness().start({ loginLimits: limits });
    await api.register('erin');
    await api.register('fred');
    for (let i = 0; i < 3; i++)
      assertError(await api.login('erin', 'wrong password'), 401, 'unauthorized');
    const verified = api.passwords.verified.length;
    const blocked = await api.login('erin');
    assertError(blocked, 429, 'rate_limited');
    const retryAfter = Number(blocked.headers.get('retry-after'));
    assert.ok(retryAfter >= 1 && retryAfter <= 60, `Retry-After ${retryAfter}`);
    assert.equal(api.passwords.verified.length, verified, 'no password hashed for a blocked login');
    assert.equal((await api.login('fred')).status, 200);
  });

  it('counts guesses sent at once as they come: only 3 of 12 concurrent ones are verified', async () => {
    api = await new Harness().start({ loginLimits: limits });
    await api.register('kim');
    const verified = api.passwords.verified.length;
    const answers = await Promise.all(
      Array.from({ length: 12 }, () => api.login('kim', 'wrong password')),
    );
    const statuses = answers.map((a) => a.status).sort();
    assert.deepEqual(statuses, [...Array(3).fill(401), ...Array(9).fill(429)]);
    assert.equal(api.passwords.verified.length - verified, 3);
  });

  it('forgets the failures in a row once a login succeeds', async () => {
    api = await new Harness().start({ loginLimits: limits });
    await api.register('gina');
    for (let i = 0; i < 2; i++)
      assertError(await api.login('gina', 'wrong password'), 401, 'unauthorized');
    assert.equal((await api.login('gina')).status, 200);
    for (let i = 0; i < 2; i++)
      assertError(await api.login('gina', 'wrong password'), 401, 'unauthorized');
    assert.equal((await api.login('gina')).status, 200);
  });

  it('blocks an address at its 5th failure of the day, whatever the usernames', async () => {
    api = await new Harness().start({ loginLimits: limits });
    await api.register('hana');
    for (const username of ['ann', 'bea', 'cal', 'dan', 'eve'])
      assertError(await api.login(username, 'wrong password'), 401, 'unauthorized');
    const blocked = await api.login('hana');
    assertError(blocked, 429, 'rate_limited');
    assert.ok(Number(blocked.headers.get('retry-after')) > 60, 'blocked for the day');
  });

  it('takes at most perMinute logins a minute from an address, right passwords too, before hashing; other addresses go on', async () => {
    api = await new Harness().start({ loginLimits: { ...limits, perMinute: 4 }, trustProxy: true });
    await api.register('lena');
    for (let i = 0; i < 4; i++) assert.equal((await loginFrom('10.0.0.1', 'lena')).status, 200);
    const verified = api.passwords.verified.length;
    const refused = await loginFrom('10.0.0.1', 'lena');
    assertError(refused, 429, 'rate_limited');
    const retryAfter = Number(refused.headers.get('retry-after'));
    assert.ok(retryAfter >= 1 && retryAfter <= 60, `Retry-After ${retryAfter}`);
    assert.equal(api.passwords.verified.length, verified, 'no password hashed for it');
    assert.equal((await loginFrom('10.0.0.2', 'lena')).status, 200, 'from another address');
  });

  it('ignores X-Forwarded-For unless told it is behind a proxy, so a spoofed header evades nothing', async () => {
    api = await new Harness().start({ loginLimits: limits });
    await api.register('ines');
    for (let i = 0; i < 3; i++)
      assertError(await loginFrom(`10.0.0.${i}`, 'ines', 'wrong password'), 401, 'unauthorized');
    assertError(await loginFrom('10.0.0.9', 'ines'), 429, 'rate_limited');
  });

  it('behind a proxy (trustProxy), counts each client address apart', async () => {
    api = await new Harness().start({ loginLimits: limits, trustProxy: true });
    await api.register('jude');
    for (let i = 0; i < 3; i++)
      assertError(await loginFrom('10.0.0.1', 'jude', 'wrong password'), 401, 'unauthorized');
    assertError(await loginFrom('10.0.0.1', 'jude'), 429, 'rate_limited');
    // The proxy appends the address it saw; what the client put before it is not believed.
    assertError(await loginFrom('10.0.0.2, 10.0.0.1', 'jude'), 429, 'rate_limited');
    assert.equal((await loginFrom('10.0.0.2', 'jude')).status, 200, 'the owner elsewhere logs in');
  });

  it('counts an IPv6 /64 as one client (one subscriber holds it whole), and an IPv4-mapped address as its IPv4', async () => {
    api = await new Harness().start({ loginLimits: limits, trustProxy: true });
    await api.register('kira');
    for (let i = 1; i <= 3; i++)
      assertError(
        await loginFrom(`2001:db8:0:7::${i.toString(16)}`, 'kira', 'wrong password'),
        401,
        'unauthorized',
      );
    // Found by a review: each of the /64's 2^64 addresses had a fresh allowance.
    assertError(await loginFrom('2001:db8:0:7:ffff::9', 'kira'), 429, 'rate_limited');
    assertError(await loginFrom('2001:0db8:0000:0007::1', 'kira'), 429, 'rate_limited');
    assert.equal((await loginFrom('2001:db8:0:8::1', 'kira')).status, 200, 'the next /64');

    await api.register('lino');
    for (let i = 0; i < 3; i++)
      assertError(await loginFrom('192.0.2.7', 'lino', 'wrong password'), 401, 'unauthorized');
    assertError(await loginFrom('::ffff:192.0.2.7', 'lino'), 429, 'rate_limited');
  });
});

describe('clientOf: the client an address stands for', () => {
  it('is the IPv4 address, the IPv4 of a mapped address, or the IPv6 /64', () => {
    assert.equal(clientOf('192.0.2.7'), '192.0.2.7');
    assert.equal(clientOf('::ffff:192.0.2.7'), '192.0.2.7');
    assert.equal(clientOf('2001:db8::1'), '20010db800000000/64');
    assert.equal(clientOf('2001:db8:0:0:ffff:ffff:ffff:ffff'), '20010db800000000/64');
    assert.equal(clientOf('::1'), '0000000000000000/64');
    assert.equal(clientOf('not an address'), 'not an address');
  });
});
