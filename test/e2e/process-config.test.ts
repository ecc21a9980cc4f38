/**
 * PROTOCOL.md's process interface, the environment it reads: a value it cannot use stops the
 * program at once, before it opens DATA_DIR or contacts Kafka, with exit code 2 and one line
 * that says why (as PORT, PARTITIONS and a missing JWT_SECRET already do); what it prints and
 * logs is usable as it is.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { existsSync } from 'node:fs';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort } from '../support/process.ts';

/** Runs `npm start` in its own process group; kills the group after `timeoutMs`. */
async function run(
  env: Record<string, string>,
  timeoutMs = 15_000,
): Promise<{ code: number | null; output: string; timedOut: boolean }> {
  const child = spawn('npm', ['start', '--silent'], {
    env: { ...process.env, HOST: '127.0.0.1', LOG_LEVEL: 'info', ...env },
    detached: true,
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  let output = '';
  child.stdout!.on('data', (d) => (output += d));
  child.stderr!.on('data', (d) => (output += d));
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    try {
      process.kill(-child.pid!, 'SIGKILL');
    } catch {
      // already gone
    }
  }, timeoutMs);
  const [code] = (await once(child, 'close')) as [number | null];
  clearTimeout(timer);
  return { code, output, timedOut };
}

describe('npm start: the environment it reads', function () {
  this.timeout(60_000);
  let parent: string;
  before(async () => {
    parent = await mkdtemp(join(tmpdir(), 'kchat-config-'));
  });
  after(async () => {
    await rm(parent, { recursive: true, force: true });
  });

  // The others ('0', '-1', 'Infinity', ...) are refused by the same check: test/unit/process-interface.test.ts.
  for (const value of ['abc', '1e400']) {
    it(`refuses RATE_LIMIT_PER_S="${value}" before it opens DATA_DIR, with exit code 2 and why`, async () => {
      const dataDir = join(parent, `rate-${value}`);
      const { code, output } = await run({
        PORT: String(await freePort()),
        DATA_DIR: dataDir,
        RATE_LIMIT_PER_S: value,
      });
      assert.equal(code, 2, output);
      assert.match(output, /RATE_LIMIT_PER_S must be a positive number/, output);
      assert.doesNotMatch(output, /\n\s+at /, 'a configuration error, not a stack trace');
      assert.equal(existsSync(dataDir), false, 'nothing was opened or created');
    });
  }

  it('refuses a JWT_SECRET under 32 bytes with exit code 2 before it contacts Kafka', async () => {
    // Nothing listens on port 1: a program that tried to reach Kafka first would retry and
    // never say what is wrong with its configuration.
    const { code, output, timedOut } = await run(
      {
        PORT: String(await freePort()),
        DATA_DIR: join(parent, 'short-secret'),
        KAFKA_BROKERS: '127.0.0.1:1',
        JWT_SECRET: 'too short',
      },
      10_000,
    );
    assert.equal(timedOut, false, `still running after 10 s: ${output.slice(-500)}`);
    assert.equal(code, 2, output);
    assert.match(output, /JWT_SECRET must be at least 32 bytes/, output);
    assert.doesNotMatch(output, /ECONNREFUSED/, 'it never tried Kafka');
  });

  it('refuses an unknown LOG_LEVEL with exit code 2 and why', async () => {
    const dataDir = join(parent, 'log-level');
    const { code, output } = await run({
      PORT: String(await freePort()),
      DATA_DIR: dataDir,
      LOG_LEVEL: 'verbose',
    });
    assert.equal(code, 2, output);
    assert.match(output, /LOG_LEVEL must be one of/, output);
    assert.doesNotMatch(output, /\n\s+at /, 'a configuration error, not a stack trace');
  });

  it('refuses SYNC_WRITES=1 with exit code 2 (not read as false: fsync an operator believes in)', async () => {
    const dataDir = join(parent, 'sync-writes');
    const { code, output } = await run({
      PORT: String(await freePort()),
      DATA_DIR: dataDir,
      SYNC_WRITES: '1',
    });
    assert.equal(code, 2, output);
    assert.match(output, /SYNC_WRITES must be "true" or "false"/, output);
    assert.equal(existsSync(dataDir), false, 'nothing was opened or created');
  });

  it('fails to start on a registry it cannot reach with one line, exit code 1, and the password hidden', async () => {
    const { code, output, timedOut } = await run(
      {
        PORT: String(await freePort()),
        DATA_DIR: join(parent, 'registry-down'),
        SCHEMA_REGISTRY_URL: 'http://svc:hunter2-registry-pw@127.0.0.1:1/',
      },
      30_000,
    );
    assert.equal(timedOut, false, `still running after 30 s: ${output.slice(-500)}`);
    assert.equal(code, 1, output);
    assert.match(output, /kchat: cannot start: /, output);
    assert.doesNotMatch(output, /hunter2/, 'the registry password was printed');
    assert.doesNotMatch(output, /\n\s+at /, 'one line, not a stack trace');
  });

  it('prints a URL a client can use when HOST is an IPv6 address, and logs lines without repeated keys', async () => {
    const port = await freePort();
    const child = spawn('npm', ['start', '--silent'], {
      env: {
        ...process.env,
        HOST: '::1',
        PORT: String(port),
        DATA_DIR: join(parent, 'ipv6'),
        LOG_LEVEL: 'info',
      },
      detached: true,
      stdio: ['ignore', 'pipe', 'pipe'],
    });
    let output = '';
    child.stdout!.on('data', (d) => (output += d));
    child.stderr!.on('data', (d) => (output += d));
    const closed = once(child, 'close');
    try {
      const deadline = Date.now() + 30_000;
      while (!/listening on (\S+)/.test(output) && Date.now() < deadline && child.exitCode === null)
        await new Promise((r) => setTimeout(r, 100));
      const printed = /listening on (\S+)/.exec(output)?.[1];
      assert.ok(printed, output);
      const url = new URL(printed); // throws on http://::1:port
      assert.equal(url.port, String(port));
      assert.equal((await fetch(new URL('/healthz', url))).status, 200);
      // A gateway and an API line at least: each key once (log shippers such as Elasticsearch
      // refuse a document with a duplicate field).
      const lines = output.split('\n').filter((line) => line.startsWith('{'));
      assert.ok(
        lines.some((line) => line.includes('"gateway started"')),
        output,
      );
      for (const line of lines)
        assert.equal(JSON.stringify(JSON.parse(line)).length, line.length, `repeated key: ${line}`);
    } finally {
      try {
        process.kill(-child.pid!, 'SIGTERM');
      } catch {
        // already gone
      }
      await closed;
    }
  });
});
