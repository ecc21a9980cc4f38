import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash, randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedAccountStores, PURGE_PAGE } from '../../state/accounts/embedded.ts';
import { KeyedLock } from '../../state/accounts/keyed-lock.ts';
import { accountsConformance } from './accounts.suite.ts';

let suiteDir: string;
let suiteStores: EmbeddedAccountStores;

accountsConformance(
  'embedded',
  async () => {
    suiteDir = await mkdtemp(join(tmpdir(), 'kchat-accounts-'));
    suiteStores = await EmbeddedAccountStores.open(join(suiteDir, 'accounts'));
    return suiteStores;
  },
  async () => {
    await suiteStores.close();
    await rm(suiteDir, { recursive: true, force: true });
  },
);

const hashOf = (token: string) => createHash('sha256').update(token).digest('hex');

describe('embedded account stores', () => {
  let dir: string;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'kchat-accounts-'));
  });
  afterEach(async () => {
    await rm(dir, { recursive: true, force: true });
  });

  it('keeps accounts and token states across a restart', async () => {
    let stores = await EmbeddedAccountStores.open(dir);
    const account = { userId: 'alice', displayName: 'Alice', createdAt: 1, passwordHash: 'h' };
    await stores.accounts.create(account);
    const grant = { userId: 'alice', familyId: randomUUID(), expiresAt: Date.now() + 60_000 };
    await stores.refreshTokens.store(hashOf('used'), grant);
    await stores.refreshTokens.store(hashOf('fresh'), grant);
    await stores.refreshTokens.consume(hashOf('used'));
    await stores.close();

    stores = await EmbeddedAccountStores.open(dir);
    try {
      assert.deepEqual(await stores.accounts.get('alice'), account);
      assert.equal((await stores.refreshTokens.consume(hashOf('used')))?.state, 'reused');
      assert.equal((await stores.refreshTokens.consume(hashOf('fresh')))?.state, 'consumed');
    } finally {
      await stores.close();
    }
  });

  it('refuses a second opening of the same directory (RocksDB LOCK)', async () => {
    const stores = await EmbeddedAccountStores.open(dir);
    try {
      await assert.rejects(EmbeddedAccountStores.open(dir));
    } finally {
      await stores.close();
    }
  });

  it('purges expired tokens and revocations, and nothing else', async () => {
    let now = 1_000_000;
    const stores = await EmbeddedAccountStores.open(dir, { now: () => now, purgeIntervalMs: 0 });
    try {
      const family = randomUUID();
      await stores.refreshTokens.store(hashOf('short'), {
        userId: 'bob',
        familyId: family,
        expiresAt: now + 1000,
      });
      await stores.refreshTokens.store(hashOf('long'), {
        userId: 'bob',
        familyId: randomUUID(),
        expiresAt: now + 10_000,
      });
      await stores.refreshTokens.revokeFamily(family);
      assert.equal(await stores.purgeExpired(), 0);

      now += 1000;
      assert.equal(await stores.purgeExpired(), 1);
      assert.equal(await stores.refreshTokens.consume(hashOf('short')), undefined);
      assert.equal((await stores.refreshTokens.consume(hashOf('long')))?.state, 'consumed');

      // The revocation of the emptied family outlives its tokens, then goes too.
      await stores.refreshTokens.store(hashOf('late'), {
        userId: 'bob',
        familyId: family,
        expiresAt: now + 1000,
      });
      assert.equal((await stores.refreshTokens.consume(hashOf('late')))?.state, 'revoked');
      now += 2 * 24 * 3600_000;
      assert.equal(await stores.purgeExpired(), 2, "'late' and 'long'");
      await stores.refreshTokens.store(hashOf('after'), {
        userId: 'bob',
        familyId: family,
        expiresAt: now + 1000,
      });
      assert.equal((await stores.refreshTokens.consume(hashOf('after')))?.state, 'consumed');
    } finally {
      await stores.close();
    }
  });
});

describe('embedded account stores: a purge of many tokens', () => {
  it('reads them a page at a time and purges every expired one across pages', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-accounts-'));
    let now = 1_000_000;
    const stores = await EmbeddedAccountStores.open(dir, { now: () => now, purgeIntervalMs: 0 });
    try {
      const count = 2 * PURGE_PAGE + 10;
      for (let i = 0; i < count; i++) {
        await stores.refreshTokens.store(hashOf(`t${i}`), {
          userId: 'bob',
          familyId: randomUUID(),
          // Every third one lives longer: expired and kept ones alternate across pages.
          expiresAt: now + (i % 3 === 0 ? 10_000 : 1000),
        });
      }
      now += 1000;
      const kept = Math.ceil(count / 3);
      assert.equal(await stores.purgeExpired(), count - kept);
      assert.equal((await stores.refreshTokens.consume(hashOf('t0')))?.state, 'consumed');
      assert.equal(await stores.refreshTokens.consume(hashOf('t1')), undefined);
      assert.equal(await stores.purgeExpired(), 0);
    } finally {
      await stores.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('embedded account stores: a family revocation cut short by SIGKILL', () => {
  it('leaves no token of the family usable, and the purge finishes it', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-accounts-'));
    const DAY = 24 * 3600_000;
    const familyId = randomUUID();
    const count = 4000;
    // A child stores a family of `count` tokens, says so, revokes the family and is killed.
    const child = spawn(
      process.execPath,
      [
        '--import',
        'tsx',
        '--input-type=module',
        '-e',
        `
        import { createHash } from 'node:crypto';
        import { EmbeddedAccountStores } from ${JSON.stringify(new URL('../../state/accounts/embedded.ts', import.meta.url).pathname)};
        const stores = await EmbeddedAccountStores.open(process.argv[1], { purgeIntervalMs: 0 });
        const hashOf = (t) => createHash('sha256').update(t).digest('hex');
        for (let i = 0; i < ${count}; i += 500)
          await Promise.all(Array.from({ length: 500 }, (_, j) => stores.refreshTokens.store(
            hashOf('f' + (i + j)),
            { userId: 'mallory', familyId: process.argv[2], expiresAt: Date.now() + 30 * ${DAY} },
          )));
        console.log('revoking');
        await stores.refreshTokens.revokeFamily(process.argv[2]);
        console.log('finished');
        `,
        dir,
        familyId,
      ],
      { stdio: ['ignore', 'pipe', 'inherit'] },
    );
    let output = '';
    const exited = new Promise((resolve) => child.once('exit', resolve));
    await new Promise<void>((resolve) =>
      child.stdout!.on('data', (chunk: Buffer) => {
        output += String(chunk);
        if (output.includes('revoking')) resolve();
      }),
    );
    await new Promise((resolve) => setTimeout(resolve, 20));
    child.kill('SIGKILL');
    await exited;
    assert.ok(!output.includes('finished'), 'the test needs the revocation unfinished');

    let now = Date.now();
    const stores = await EmbeddedAccountStores.open(dir, { now: () => now, purgeIntervalMs: 0 });
    try {
      let usable = 0;
      for (let i = 0; i < count; i++)
        if ((await stores.refreshTokens.consume(hashOf(`f${i}`)))?.state !== 'revoked') usable++;
      assert.equal(usable, 0, 'tokens of the revoked family still refreshed');
      await stores.purgeExpired(); // finishes the revocation
      // Remembered as long as its tokens live (30 days), not the day of an empty family.
      now += 2 * DAY;
      await stores.purgeExpired();
      assert.equal((await stores.refreshTokens.consume(hashOf(`f${count - 1}`)))?.state, 'revoked');
      await stores.refreshTokens.store(hashOf('late'), {
        userId: 'mallory',
        familyId,
        expiresAt: now + DAY,
      });
      assert.equal((await stores.refreshTokens.consume(hashOf('late')))?.state, 'revoked');
    } finally {
      await stores.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('embedded account stores: the purge timer', () => {
  it('purges expired tokens on its own', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-accounts-'));
    let now = 1_000_000;
    const stores = await EmbeddedAccountStores.open(dir, { now: () => now, purgeIntervalMs: 10 });
    try {
      const grant = { userId: 'carol', familyId: randomUUID(), expiresAt: now + 1000 };
      await stores.refreshTokens.store(hashOf('expiring'), grant);
      now += 1000;
      await new Promise((resolve) => setTimeout(resolve, 100));
      assert.equal(await stores.refreshTokens.consume(hashOf('expiring')), undefined);
    } finally {
      await stores.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('KeyedLock', () => {
  it('runs tasks on one key one at a time, in order, and others concurrently', async () => {
    const lock = new KeyedLock();
    const events: string[] = [];
    const task = (name: string, ms: number) => async () => {
      events.push(`start ${name}`);
      await new Promise((resolve) => setTimeout(resolve, ms));
      events.push(`end ${name}`);
      return name;
    };
    const results = await Promise.all([
      lock.run('a', task('a1', 20)),
      lock.run('a', task('a2', 1)),
      lock.run('b', task('b1', 1)),
    ]);
    assert.deepEqual(results, ['a1', 'a2', 'b1']);
    assert.ok(events.indexOf('end a1') < events.indexOf('start a2'));
    assert.ok(events.indexOf('end b1') < events.indexOf('end a1'), 'b does not wait for a');
    await new Promise((resolve) => setImmediate(resolve));
    assert.equal(lock.size, 0, 'no key is kept once its tasks are done');
  });

  it('a failing task fails alone: the next task on its key still runs', async () => {
    const lock = new KeyedLock();
    const failing = lock.run('a', async () => {
      throw new Error('boom');
    });
    const next = lock.run('a', async () => 'ran');
    await assert.rejects(failing, /boom/);
    assert.equal(await next, 'ran');
  });
});
