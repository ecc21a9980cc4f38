/**
 * The accounts path end to end, in one process (the roles of `npm start`), with real HTTP and
 * WebSocket clients: once `POST /v1/auth/register` has answered 201, the user exists for every
 * gateway. The account is on `chat.accounts` before the answer (the api awaits its publication),
 * but the gateway answers from a global table that follows the topic: a follower that lags (a
 * Kafka consumer waits up to 100 ms per fetch, and seconds to join its group at start; on the
 * embedded log, a busy event loop) made a `send` to a user registered a moment before answer
 * `unknown_recipient`. Here the table's follower is slowed by a fixed delay per batch.
 */
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { AddressInfo } from 'node:net';
import { randomBytes } from 'node:crypto';
import { WebSocket } from 'ws';
import type { Consumer, ConsumerHandlers, Log } from '../../log/port.ts';
import { openInfrastructure, type Infrastructure } from '../../app/infrastructure.ts';
import { readConfig } from '../../app/config.ts';
import { bootstrap } from '../../app/bootstrap.ts';
import { startRoles, type Roles } from '../../app/roles.ts';
import { silentLogger } from '../../observability/logger.ts';
import { Metrics } from '../../observability/metrics.ts';
import { topics } from '../../schemas/topics.ts';

const FOLLOWER_LAG_MS = 300;

/** The log, with every consumer of `chat.accounts` handed its batches FOLLOWER_LAG_MS late. */
function withSlowAccountsFollower(log: Log): Log {
  return new Proxy(log, {
    get(target, property, receiver) {
      if (property !== 'consumer') return Reflect.get(target, property, receiver) as unknown;
      return (options: Parameters<Log['consumer']>[0]): Consumer => {
        const consumer = target.consumer(options);
        return new Proxy(consumer, {
          get(inner, name, innerReceiver) {
            if (name !== 'run') return Reflect.get(inner, name, innerReceiver) as unknown;
            return (handlers: ConsumerHandlers) =>
              inner.run({
                ...handlers,
                eachBatch: async (batch) => {
                  if (batch.topic === topics.accounts)
                    await new Promise((resolve) => setTimeout(resolve, FOLLOWER_LAG_MS));
                  await handlers.eachBatch(batch);
                },
              });
          },
        });
      };
    },
  });
}

describe('accounts: a registered user is known to the gateway at once', function () {
  this.timeout(60_000);
  let dataDir: string;
  let infrastructure: Infrastructure;
  let roles: Roles;
  let server: Server;
  let url: string;

  before(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'kchat-accounts-table-'));
    const config = readConfig({
      DATA_DIR: dataDir,
      PARTITIONS: '2',
      REGISTRATIONS_PER_HOUR: '0',
      JWT_SECRET: randomBytes(32).toString('base64url'),
    });
    const opened = await openInfrastructure(config, silentLogger);
    infrastructure = { ...opened, log: withSlowAccountsFollower(opened.log) };
    const codecs = await bootstrap(infrastructure.log, infrastructure.registry, config.partitions);
    roles = await startRoles('all', config, infrastructure, codecs, silentLogger, new Metrics());
    server = createServer(roles.api!.callback());
    roles.gateway!.attach(server);
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });

  after(async () => {
    await roles?.close();
    server?.closeAllConnections();
    await new Promise((resolve) => server?.close(resolve));
    await infrastructure?.close();
    await rm(dataDir, { recursive: true, force: true });
  });

  const register = async (username: string) => {
    const response = await fetch(`${url}/v1/auth/register`, {
      method: 'POST',
      headers: { 'content-type': 'application/json' },
      body: JSON.stringify({ username, password: 'a good password' }),
    });
    assert.equal(response.status, 201, await response.clone().text());
    return ((await response.json()) as { accessToken: string }).accessToken;
  };

  it('accepts a send to a user whose registration has just been answered 201', async () => {
    const alice = await register('alice');
    const frames: Array<{ type: string; id?: string; code?: string }> = [];
    const ws = new WebSocket(`${url.replace('http', 'ws')}/v1/ws?deviceId=phone`, {
      headers: { authorization: `Bearer ${alice}` },
    });
    ws.on('message', (data) => frames.push(JSON.parse(data.toString()) as (typeof frames)[0]));
    await new Promise((resolve, reject) => ws.once('open', resolve).once('error', reject));
    try {
      const answer = async (id: string) => {
        for (let waited = 0; waited < 10_000; waited += 10) {
          const frame = frames.find((f) => f.id === id);
          if (frame) return frame.type === 'error' ? frame.code : frame.type;
          await new Promise((resolve) => setTimeout(resolve, 10));
        }
        throw new Error(`no answer to ${id}`);
      };
      for (let i = 0; i < 3; i++) {
        await register(`bob${i}`);
        ws.send(JSON.stringify({ type: 'send', id: `c${i}`, to: `bob${i}`, body: { i } }));
        assert.equal(await answer(`c${i}`), 'sent', `bob${i} was registered (201) before the send`);
      }
      // A user that does not exist is still unknown, and answered without waiting long.
      const started = Date.now();
      ws.send(JSON.stringify({ type: 'send', id: 'x', to: 'nobody-here', body: 1 }));
      assert.equal(await answer('x'), 'unknown_recipient');
      assert.ok(Date.now() - started < 2_000, `unknown_recipient took ${Date.now() - started} ms`);
    } finally {
      ws.close();
    }
  });
});
