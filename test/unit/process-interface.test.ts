/** PROTOCOL.md's process interface, the parts that need no process: readConfig and the rate limit. */
import assert from 'node:assert/strict';
import { once } from 'node:events';
import { connect as connectTcp, type AddressInfo } from 'node:net';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { ConfigError, readConfig, redactUrl } from '../../app/config.ts';
import { openInfrastructure } from '../../app/infrastructure.ts';
import { createHttpServer } from '../../app/http.ts';
import { TokenBucket } from '../../gateway/rate-limit.ts';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { Metrics } from '../../observability/metrics.ts';
import { silentLogger } from '../../observability/logger.ts';

describe('process interface: configuration', () => {
  it('reads RATE_LIMIT_PER_S into the configuration, and refuses what is not a positive number', () => {
    assert.equal(readConfig({}).rateLimitPerSecond, 50);
    assert.equal(readConfig({ RATE_LIMIT_PER_S: '1000' }).rateLimitPerSecond, 1000);
    assert.equal(readConfig({ RATE_LIMIT_PER_S: '0.5' }).rateLimitPerSecond, 0.5);
    for (const value of ['abc', '0', '-1', '1e400', 'Infinity', '1e-400'])
      assert.throws(() => readConfig({ RATE_LIMIT_PER_S: value }), ConfigError, value);
  });

  it('refuses a JWT_SECRET under 32 bytes, in either mode', () => {
    const secret = 'x'.repeat(32);
    assert.doesNotThrow(() => readConfig({ JWT_SECRET: secret }));
    assert.doesNotThrow(() => readConfig({ JWT_SECRET: secret, KAFKA_BROKERS: 'k:9092' }));
    assert.throws(() => readConfig({ JWT_SECRET: 'short' }), ConfigError);
    assert.throws(() => readConfig({ JWT_SECRET: 'short', KAFKA_BROKERS: 'k:9092' }), ConfigError);
  });

  it('reads SYNC_WRITES and TRUST_PROXY as true or false, and refuses anything else (1 is not true, and not false either)', () => {
    for (const name of ['SYNC_WRITES', 'TRUST_PROXY'] as const) {
      const key = name === 'SYNC_WRITES' ? 'syncWrites' : 'trustProxy';
      assert.equal(readConfig({})[key], false, name);
      assert.equal(readConfig({ [name]: '' })[key], false, name);
      assert.equal(readConfig({ [name]: 'true' })[key], true, name);
      assert.equal(readConfig({ [name]: 'false' })[key], false, name);
      for (const value of ['1', 'yes', 'TRUE', 'on', '0'])
        assert.throws(() => readConfig({ [name]: value }), ConfigError, `${name}=${value}`);
    }
  });

  it('refuses a KAFKA_BROKERS entry that is not host:port', () => {
    const secret = 'a secret of thirty-two bytes or more!';
    const brokers = (value: string) => readConfig({ JWT_SECRET: secret, KAFKA_BROKERS: value });
    assert.deepEqual(brokers('k1:9092, 10.0.0.2:9093,[::1]:9094').kafkaBrokers, [
      'k1:9092',
      '10.0.0.2:9093',
      '[::1]:9094',
    ]);
    for (const value of [
      'localhost',
      'foo:bar',
      'http://127.0.0.1:9092',
      'k:0',
      'k:70000',
      'k:9092,x',
    ])
      assert.throws(() => brokers(value), ConfigError, value);
  });

  it('refuses a SCHEMA_REGISTRY_URL that is not http(s), and never shows its password', () => {
    assert.equal(
      readConfig({ SCHEMA_REGISTRY_URL: 'https://r:8081/apis/ccompat/v7' }).schemaRegistryUrl,
      'https://r:8081/apis/ccompat/v7',
    );
    for (const value of ['not a url', 'ftp://r/', 'r:8081'])
      assert.throws(() => readConfig({ SCHEMA_REGISTRY_URL: value }), ConfigError, value);
    assert.equal(
      redactUrl('put http://svc:pw@r:8081/config/x'),
      'put http://svc:***@r:8081/config/x',
    );
    assert.equal(redactUrl('http://r:8081/x'), 'http://r:8081/x');
  });

  it('takes GATEWAY_ID as given, or refuses it (empty, upper case, dots, over 100 characters)', () => {
    assert.equal(readConfig({ GATEWAY_ID: 'gw-a_1' }).gatewayId, 'gw-a_1');
    assert.equal(readConfig({}).gatewayId, undefined);
    for (const value of ['', 'Gw-A', 'gw.a', 'g'.repeat(101), 'gw a'])
      assert.throws(() => readConfig({ GATEWAY_ID: value }), ConfigError, JSON.stringify(value));
  });

  it('refuses an unknown LOG_LEVEL', () => {
    assert.equal(readConfig({ LOG_LEVEL: 'debug' }).logLevel, 'debug');
    assert.throws(() => readConfig({ LOG_LEVEL: 'verbose' }), ConfigError);
  });
});

describe('process interface: RATE_LIMIT_PER_S under 1', () => {
  it('still lets a frame through at the rate (a bucket of four times 0.2 holds less than one token)', () => {
    let now = 0;
    const bucket = new TokenBucket(0.2, () => now);
    assert.equal(bucket.take(), true, 'the first frame');
    assert.equal(bucket.take(), false);
    now += 5_000; // one token at 0.2 per second
    assert.equal(bucket.take(), true);
    assert.equal(bucket.take(), false);
  });
});

describe('process interface: liveness when the embedded log can no longer write', () => {
  it('answers /healthz and /readyz 503 unavailable once a write failed (only a restart recovers)', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-liveness-'));
    const infrastructure = await openInfrastructure(readConfig({ DATA_DIR: dir }), silentLogger);
    const server = createHttpServer(new Metrics({ role: 'all' }), {
      notReadyBecause: async () => undefined,
      deadBecause: () => infrastructure.deadBecause(),
    });
    try {
      const log = infrastructure.log;
      assert.ok(log instanceof EmbeddedLog);
      await log.admin.createTopics([{ topic: 't', partitions: 1 }]);
      const producer = await log.producer();
      await producer.send([{ topic: 't', key: Buffer.from('k'), value: Buffer.from('v') }]);
      server.listen(0, '127.0.0.1');
      await once(server, 'listening');
      const url = `http://127.0.0.1:${(server.address() as { port: number }).port}`;
      assert.equal((await fetch(`${url}/healthz`)).status, 200);
      // A write that fails, as on a full disk: the database refuses the batch.
      await (log.store as unknown as { db: { close(): Promise<void> } }).db.close();
      await assert.rejects(
        producer.send([{ topic: 't', key: Buffer.from('k'), value: Buffer.from('v') }]),
      );
      for (const path of ['/healthz', '/readyz']) {
        const answer = await fetch(`${url}${path}`);
        assert.equal(answer.status, 503, path);
        const body = (await answer.json()) as { error: { code: string; message: string } };
        assert.equal(body.error.code, 'unavailable');
        assert.match(body.error.message, /embedded log failed to write/);
      }
    } finally {
      server.close();
      await infrastructure.close().catch(() => undefined);
      await rm(dir, { recursive: true, force: true });
    }
  });
});

describe('process interface: requests that arrive too slowly', () => {
  it('answers 408 to headers that never end, and cuts off a body that stalls', async () => {
    const server = createHttpServer(
      new Metrics({ role: 'all' }),
      { notReadyBecause: async () => undefined },
      {
        api: (request, response) => {
          request.resume();
          request.on('end', () => response.end('read'));
        },
        timeouts: { headersMs: 300, requestMs: 600, checkEveryMs: 50 },
      },
    );
    server.listen(0, '127.0.0.1');
    await once(server, 'listening');
    const { port } = server.address() as AddressInfo;
    /** Writes `text`, then waits for the server to answer and close (at most 5 s). */
    const stall = async (text: string) => {
      const socket = connectTcp(port, '127.0.0.1');
      const started = Date.now();
      socket.write(text);
      let reply = '';
      const timer = setTimeout(() => socket.destroy(), 5_000);
      for await (const chunk of socket) reply += String(chunk);
      clearTimeout(timer);
      return { reply, ms: Date.now() - started };
    };
    try {
      const headers = await stall('GET /healthz HTTP/1.1\r\nHost: x\r\n');
      assert.match(headers.reply, /^HTTP\/1\.1 408 /);
      assert.match(headers.reply, /"code":"bad_request"/);
      assert.ok(headers.ms < 4_000, `cut after ${headers.ms} ms`);
      const body = await stall(
        'POST /v1/auth/login HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n{"user',
      );
      assert.ok(body.ms < 4_000, `a stalled body held its connection ${body.ms} ms`);
      assert.doesNotMatch(body.reply, /read/);
    } finally {
      server.close();
    }
  });
});
