/**
 * PROTOCOL.md's process interface, on `npm start` as a user runs it: it prints its URL, answers
 * /healthz, /readyz and /metrics, closes within 10 s on SIGTERM or SIGINT to its process group,
 * releases PORT and DATA_DIR, and starts again on the same DATA_DIR.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { once } from 'node:events';
import { connect } from 'node:net';
import { mkdtemp, readdir, rm, stat } from 'node:fs/promises';
import { existsSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, startServer } from '../support/process.ts';
import { Client, register } from '../support/chat-client.ts';
import { eventually } from '../support/log-helpers.ts';

/** Sends raw request bytes and reads the reply up to the server closing or 2 s passing. */
async function rawRequest(port: number, text: string): Promise<string> {
  const socket = connect(port, '127.0.0.1');
  socket.setTimeout(2000, () => socket.destroy());
  socket.end(text);
  let reply = '';
  for await (const chunk of socket) {
    reply += String(chunk);
    if (reply.includes('\r\n\r\n') && reply.includes('}')) break;
  }
  socket.destroy();
  return reply;
}

describe('npm start (embedded shape)', function () {
  this.timeout(90000);
  let dataDir: string;

  before(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'kchat-e2e-'));
  });
  after(async () => {
    await rm(dataDir, { recursive: true, force: true });
  });

  it('serves health, readiness and metrics, then stops cleanly on SIGTERM and restarts on the same data', async () => {
    const port = await freePort();
    const env = { PORT: String(port), DATA_DIR: dataDir };
    const server = await startServer(env);
    await eventually(
      async () => (await fetch(`${server.url}/readyz`)).status === 200,
      20000,
      'readiness',
    );
    assert.match(server.output(), new RegExp(`listening on http://127\\.0\\.0\\.1:${port}`));
    const metrics = await (await fetch(`${server.url}/metrics`)).text();
    assert.match(metrics, /^kchat_process_resident_memory_bytes/m);
    assert.match(metrics, /^kchat_log_write_batches/m);
    const posted = await fetch(`${server.url}/metrics`, { method: 'POST' });
    assert.equal(posted.status, 405);
    assert.equal(posted.headers.get('allow'), 'GET, HEAD');
    // The WebSocket path asked without a handshake: 426, naming the upgrade it takes.
    const plain = await fetch(`${server.url}/v1/ws`);
    assert.equal(plain.status, 426);
    assert.equal(plain.headers.get('upgrade'), 'websocket');
    assert.equal(((await plain.json()) as { error: { code: string } }).error.code, 'bad_request');
    const missing = await fetch(`${server.url}/nope`);
    assert.equal(missing.status, 404);
    assert.deepEqual(Object.keys(((await missing.json()) as { error: object }).error).sort(), [
      'code',
      'message',
    ]);
    // A request target that is not a URL (Node's parser lets it through) answers 400, and the
    // process goes on.
    for (const target of ['http://[/healthz', 'http://[/v1/auth/login']) {
      const reply = await rawRequest(port, `GET ${target} HTTP/1.1\r\nHost: x\r\n\r\n`);
      assert.match(reply, /^HTTP\/1\.1 400 /, reply);
      assert.match(reply, /"code":"bad_request"/, reply);
    }
    // What Node's parser refuses before there is a request answers in the same shape.
    for (const [request, status, code] of [
      [
        `GET /v1/me HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer ${'a'.repeat(20_000)}\r\n\r\n`,
        431,
        'too_large',
      ],
      [
        'POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 1x\r\n\r\n{}',
        400,
        'bad_request',
      ],
      ['NOT HTTP AT ALL\r\n\r\n', 400, 'bad_request'],
    ] as const) {
      const reply = await rawRequest(port, request);
      assert.match(reply, new RegExp(`^HTTP/1\\.1 ${status} `), reply);
      const body = JSON.parse(reply.slice(reply.indexOf('\r\n\r\n') + 4));
      assert.equal(body.error.code, code, reply);
      assert.match(reply, /\r\nCache-Control: no-store\r\n/i, reply);
    }
    for (const path of ['/healthz', '/readyz', '/metrics', '/nowhere']) {
      const answer = await fetch(`${server.url}${path}`);
      assert.equal(answer.headers.get('cache-control'), 'no-store', path);
    }
    assert.equal((await fetch(`${server.url}/healthz`)).status, 200);
    // An upgrade to anything but a WebSocket (`curl --http2` on http:// asks for h2c) is
    // answered as a plain request; one with a body cannot be read, and is refused.
    const h2c =
      'Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n';
    let reply = await rawRequest(port, `GET /healthz HTTP/1.1\r\nHost: x\r\n${h2c}\r\n`);
    assert.match(reply, /^HTTP\/1\.1 200 [\s\S]*"status":"ok"/, reply);
    reply = await rawRequest(port, `GET /v1/auth/verify HTTP/1.1\r\nHost: x\r\n${h2c}\r\n`);
    assert.match(reply, /^HTTP\/1\.1 401 [\s\S]*"code":"unauthorized"/, reply);
    reply = await rawRequest(
      port,
      `POST /v1/auth/login HTTP/1.1\r\nHost: x\r\n${h2c}Content-Length: 2\r\n\r\n{}`,
    );
    assert.match(reply, /^HTTP\/1\.1 400 [\s\S]*"code":"bad_request"/, reply);
    // A client that keeps its side of such a connection open after the answer: the server
    // closes the connection anyway, or it would hold up the shutdown below.
    const idle = connect({ port, host: '127.0.0.1', allowHalfOpen: true });
    idle.write(`GET /healthz HTTP/1.1\r\nHost: x\r\n${h2c}\r\n`);
    idle.resume();
    await once(idle, 'end');
    assert.equal((await fetch(`${server.url}/healthz`)).status, 200);

    // npm re-raises the signal on itself, so its own exit code says nothing: the server's
    // "stopped" line, written after the log is closed, does.
    const { ms } = await server.stop('SIGTERM');
    idle.destroy();
    assert.match(server.output(), /"msg":"stopped"/, server.output());
    assert.ok(ms < 10000, `stopped in ${ms} ms`);

    // The same PORT and DATA_DIR are free again: a second start opens the same log.
    const again = await startServer(env);
    await eventually(
      async () => (await fetch(`${again.url}/readyz`)).status === 200,
      20000,
      'readiness again',
    );
    await again.stop('SIGINT');
    assert.match(again.output(), /"signal":"SIGINT"[\s\S]*"msg":"stopped"/, again.output());
  });

  it('stops cleanly on SIGTERM to its process group while clients flood it with sends', async () => {
    // The signal reaches every process of the group at once. A wrapper that relays it to the
    // server (tsx's CLI does) and kills the server when it does not confirm within a few
    // milliseconds would kill a busy one.
    const dir = await mkdtemp(join(tmpdir(), 'kchat-e2e-flood-'));
    const server = await startServer({
      PORT: String(await freePort()),
      DATA_DIR: dir,
      RATE_LIMIT_PER_S: '100000',
    });
    try {
      const alice = await Client.open(server.url, await register(server.url, 'alice'), 'phone');
      const bob = await Client.open(server.url, await register(server.url, 'bob'), 'phone');
      const closed = [alice, bob].map(
        (c) => new Promise<number>((resolve) => c.ws.once('close', (code) => resolve(code))),
      );
      const flood = (from: Client, to: string, rounds: number) => {
        for (let i = 0; i < rounds && from.ws.readyState === from.ws.OPEN; i++)
          from.send({ type: 'send', id: `m${i}`, to, body: { text: 'x'.repeat(100) } });
      };
      // Enough to keep the event loop busy for a while (each round: 400 sends a client).
      for (let round = 0; round < 5; round++) {
        flood(alice, 'bob', 400);
        flood(bob, 'alice', 400);
        await new Promise((resolve) => setTimeout(resolve, 20));
      }
      const { ms } = await server.stop('SIGTERM');
      assert.match(server.output(), /"msg":"stopped"/, server.output().slice(-3000));
      assert.ok(ms < 10000, `stopped in ${ms} ms`);
      assert.deepEqual(await Promise.all(closed), [1001, 1001], 'clients told "going away"');
    } finally {
      await server.stop('SIGKILL').catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('creates DATA_DIR and everything in it readable by its own user alone', async () => {
    const parent = await mkdtemp(join(tmpdir(), 'kchat-e2e-modes-'));
    const dataDir = join(parent, 'data');
    const server = await startServer({ PORT: String(await freePort()), DATA_DIR: dataDir });
    try {
      await register(server.url, 'dora');
    } finally {
      await server.stop();
    }
    const open: string[] = [];
    const walk = async (path: string): Promise<void> => {
      const info = await stat(path);
      if ((info.mode & 0o077) !== 0) open.push(`${path} ${(info.mode & 0o777).toString(8)}`);
      if (info.isDirectory()) for (const name of await readdir(path)) await walk(join(path, name));
    };
    await walk(dataDir);
    await rm(parent, { recursive: true, force: true });
    assert.deepEqual(open, [], 'group or others may read these');
  });

  it('registers an account over HTTP, and keeps it across a restart', async () => {
    const env = { PORT: String(await freePort()), DATA_DIR: dataDir };
    const post = (url: string, path: string, body: unknown) =>
      fetch(`${url}${path}`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify(body),
      });
    let server = await startServer(env);
    const registered = await post(server.url, '/v1/auth/register', {
      username: 'Carol',
      password: 'correct horse',
    });
    assert.equal(registered.status, 201, await registered.clone().text());
    const { userId, accessToken } = (await registered.json()) as {
      userId: string;
      accessToken: string;
    };
    assert.equal(userId, 'carol');
    const me = await fetch(`${server.url}/v1/me`, {
      headers: { authorization: `Bearer ${accessToken}` },
    });
    assert.equal(((await me.json()) as { userId: string }).userId, 'carol');
    await server.stop();

    server = await startServer(env);
    const login = await post(server.url, '/v1/auth/login', {
      username: 'carol',
      password: 'correct horse',
    });
    assert.equal(login.status, 200);
    // The access token signed before the restart is still valid: the secret is kept in DATA_DIR.
    const again = await fetch(`${server.url}/v1/auth/verify`, {
      headers: { authorization: `Bearer ${accessToken}` },
    });
    assert.equal(again.status, 204);
    assert.equal(again.headers.get('x-user-id'), 'carol');
    await server.stop();
  });

  it('answers requests that come while it stops with 503 unavailable, never 500', async () => {
    const server = await startServer({ PORT: String(await freePort()), DATA_DIR: dataDir });
    const registered = await fetch(`${server.url}/v1/auth/register`, {
      method: 'POST',
      body: JSON.stringify({ username: 'stopping', password: 'correct horse' }),
    });
    const { accessToken } = (await registered.json()) as { accessToken: string };
    const statuses = new Map<string, number>();
    let stopping = false;
    const deadline = Date.now() + 10_000;
    // Clients reading their account all along, each on its keep-alive connection.
    const client = async () => {
      while (Date.now() < deadline) {
        const at = stopping ? 'stopping' : 'running';
        try {
          const answer = await fetch(`${server.url}/v1/me`, {
            headers: { authorization: `Bearer ${accessToken}` },
          });
          const body = await answer.text();
          const key = `${at} ${answer.status}`;
          statuses.set(key, (statuses.get(key) ?? 0) + 1);
          if (answer.status === 503) {
            assert.equal(JSON.parse(body).error.code, 'unavailable');
            assert.equal(answer.headers.get('cache-control'), 'no-store');
          }
        } catch {
          if (stopping) return; // the port is closed
        }
      }
    };
    const clients = Array.from({ length: 8 }, client);
    await eventually(() => (statuses.get('running 200') ?? 0) > 20, 5_000, 'requests served');
    stopping = true;
    await server.stop('SIGTERM');
    await Promise.all(clients);
    assert.match(server.output(), /"msg":"stopped"/, server.output());
    // (A request sent just before the signal may be answered after it: 503 whenever.)
    const seen = Object.fromEntries(statuses);
    assert.deepEqual(
      Object.keys(seen).filter((k) => !/ (200|503)$/.test(k)),
      [],
      JSON.stringify(seen),
    );
    assert.ok((seen['stopping 503'] ?? 0) > 0, JSON.stringify(seen));
    assert.doesNotMatch(server.output(), /request failed/);
  });

  it('refuses a second process on the same DATA_DIR instead of corrupting it', async () => {
    const first = await startServer({ PORT: String(await freePort()), DATA_DIR: dataDir });
    const secondPort = await freePort();
    await assert.rejects(
      () => startServer({ PORT: String(secondPort), DATA_DIR: dataDir }, 20000),
      /exited with 1: kchat: cannot start: .* is in use by another process/,
    );
    assert.equal((await fetch(`${first.url}/readyz`)).status, 200, 'the first one is unharmed');
    await first.stop();
    assert.match(first.output(), /"msg":"stopped"/);
  });

  it('takes PORT before anything else: a second process on a port in use fails before it opens its DATA_DIR or joins anything', async () => {
    // On Kafka, a second gateway that got as far as its heartbeat made the users actor close
    // the first one's sessions, and a second processor took tasks for seconds (a review helper).
    const first = await startServer({ PORT: String(await freePort()), DATA_DIR: dataDir });
    try {
      const otherDir = join(dataDir, 'never-opened');
      const second = spawn('npm', ['start', '--silent'], {
        env: {
          ...process.env,
          HOST: '127.0.0.1',
          PORT: new URL(first.url).port,
          DATA_DIR: otherDir,
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let output = '';
      second.stderr!.on('data', (d) => (output += d));
      const [code] = (await once(second, 'close')) as [number];
      assert.equal(code, 1);
      assert.match(output, /kchat: cannot start: listen EADDRINUSE/);
      assert.equal(existsSync(otherDir), false, 'DATA_DIR was opened');
      assert.equal((await fetch(`${first.url}/readyz`)).status, 200, 'the first one is unharmed');
    } finally {
      await first.stop();
    }
  });

  for (const [role, expected] of [
    [['gateway'], /the gateway role runs alone only against Kafka \(set KAFKA_BROKERS\)/],
    [['processor', 'users'], /the processor users role runs alone only against Kafka/],
    [
      ['processor', 'nobody'],
      /unknown role "processor nobody"; this build runs: all, api, gateway, processor users/,
    ],
  ] as const) {
    it(`refuses \`npm start -- ${role.join(' ')}\` on the embedded log with exit code 2 and why`, async () => {
      const child = spawn('npm', ['start', '--silent', '--', ...role], {
        env: {
          ...process.env,
          PORT: String(await freePort()),
          DATA_DIR: dataDir,
          KAFKA_BROKERS: '',
        },
        stdio: ['ignore', 'pipe', 'pipe'],
      });
      let output = '';
      child.stdout!.on('data', (d) => (output += d));
      child.stderr!.on('data', (d) => (output += d));
      const [code] = (await once(child, 'close')) as [number];
      assert.equal(code, 2, output);
      assert.match(output, expected);
    });
  }
});
