// The WebSocket gateway end to end: real `ws` clients against a real http.Server on
// 127.0.0.1, the gateway attached, on a real embedded log and registry.
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { connect as connectTcp, type AddressInfo } from 'node:net';
import { SignJWT } from 'jose';
import { WebSocket, type ClientOptions } from 'ws';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { EmbeddedSchemaRegistry } from '../../schemas/registry/embedded.ts';
import type { ChatCodecs } from '../../app/bootstrap.ts';
import { avroTypeOptions, loadSchema } from '../../schemas/avro.ts';
import { Codecs, type TopicCodec } from '../../schemas/codec.ts';
import { deliveriesTopic, topics } from '../../schemas/topics.ts';
import { FROM_ACK } from '../../schemas/conventions.ts';
import {
  fullNames,
  type ConnectionEvent,
  type Delivery,
  type GatewayHeartbeat,
  type GroupMessage,
  type InboxCommand,
  type Sync,
  type UserCommand,
} from '../../schemas/types.generated.ts';
import type { GatewayDeps } from '../../gateway/gateway.ts';
import { messageIdFor } from '../../gateway/message-id.ts';
import { FORGET_SILENT_GATEWAY_MS, forgetSilentGateways } from '../../gateway/heartbeat.ts';
import {
  ACK_RATE_PER_S,
  DELIVERIES_RETENTION_MS,
  MAX_BODY_DEPTH,
  MAX_QUEUED_FRAMES,
  MAX_CONNECTIONS_PER_USER,
  MAX_UNANSWERED_FRAMES,
  REPLAY_RESUME_BYTES,
} from '../../gateway/limits.ts';
import { eventually, uniqueName, wrappingSends } from '../support/log-helpers.ts';
import {
  decodedRecords,
  serveGateway,
  TestClient,
  tokenFor,
  verifyAccessToken,
  type Frame,
  type Running,
} from '../support/gateway-harness.ts';
import { openEmbeddedChat, type EmbeddedChat } from '../support/embedded-chat.ts';

const PARTITIONS = 12;
describe('gateway (WebSocket, embedded log)', function () {
  this.timeout(30_000);
  let chat: EmbeddedChat;
  let log: EmbeddedLog;
  let registry: EmbeddedSchemaRegistry;
  let codecs: ChatCodecs;
  const users = new Set<string>();
  const groups = new Set<string>();
  const running: Running[] = [];
  let main: Running;

  async function startGateway(overrides: Partial<GatewayDeps> = {}): Promise<Running> {
    const started = await serveGateway({
      gatewayId: uniqueName('gw'),
      log,
      codecs,
      registry,
      verifyAccessToken,
      userExists: (userId) => {
        if (userId === 'explode') throw new Error('the accounts table is unreachable');
        return users.has(userId);
      },
      groupExists: (groupId) => groups.has(groupId),
      partitions: PARTITIONS,
      ...overrides,
    });
    running.push(started);
    return started;
  }

  before(async () => {
    chat = await openEmbeddedChat(PARTITIONS, 'kchat-gateway-');
    ({ log, registry, codecs } = chat);
    main = await startGateway({ rateLimitPerSecond: 10, limits: { heartbeatIntervalMs: 100 } });
  });

  after(async () => {
    for (const r of running) await r.stop();
    await chat?.close();
  });

  const newUser = (prefix = 'u') => {
    const userId = uniqueName(prefix);
    users.add(userId);
    return userId;
  };

  function wsUrl(at: Running, query: Record<string, string> = {}, path = '/v1/ws'): string {
    const search = new URLSearchParams(query).toString();
    return `${at.base}${path}${search ? `?${search}` : ''}`;
  }

  /** Opens a connection; `onOpen` runs as soon as the socket is open, before anything arrives. */
  async function open(
    userId: string,
    options: {
      at?: Running;
      deviceId?: string;
      via?: 'header' | 'query';
      ws?: ClientOptions;
      onOpen?: (client: TestClient) => void;
    } = {},
  ): Promise<TestClient> {
    const at = options.at ?? main;
    const token = await tokenFor(userId);
    const query: Record<string, string> = options.deviceId ? { deviceId: options.deviceId } : {};
    if (options.via === 'query') query.access_token = token;
    const headers: Record<string, string> =
      options.via === 'query' ? {} : { authorization: `Bearer ${token}` };
    const ws = new WebSocket(wsUrl(at, query), { ...options.ws, headers });
    const client = new TestClient(ws);
    await new Promise<void>((resolve, reject) => {
      ws.once('open', () => {
        options.onOpen?.(client);
        resolve();
      });
      ws.once('error', reject);
      ws.once('unexpected-response', (_request, response) =>
        reject(new Error(`upgrade refused with ${response.statusCode}`)),
      );
    });
    return client;
  }

  /** Opens a connection and reads its `ready`. */
  async function connect(userId: string, deviceId = 'default', at = main): Promise<TestClient> {
    const client = await open(userId, { deviceId, at });
    assert.deepEqual(await client.next(), { type: 'ready', userId, deviceId });
    return client;
  }

  /** The HTTP answer to an upgrade request that is refused. */
  async function refusedUpgrade(
    url: string,
    headers: Record<string, string> = {},
  ): Promise<{ status: number; body: unknown }> {
    const ws = new WebSocket(url, { headers });
    return new Promise((resolve, reject) => {
      ws.once('open', () => reject(new Error('the upgrade was accepted')));
      ws.once('error', reject);
      ws.once('unexpected-response', (_request, response) => {
        let text = '';
        response.on('data', (chunk: Buffer) => (text += chunk.toString()));
        response.on('end', () =>
          resolve({ status: response.statusCode ?? 0, body: JSON.parse(text) as unknown }),
        );
      });
    });
  }

  const records = <T>(topic: string, codec: TopicCodec<unknown>) =>
    decodedRecords<T>(log, topic, codec);

  const inboxCommands = () => records<InboxCommand>(topics.messages, codecs[topics.messages]);
  const userCommands = () => records<UserCommand>(topics.userCommands, codecs[topics.userCommands]);
  const connectionEvents = () =>
    records<ConnectionEvent>(topics.connections, codecs[topics.connections]);

  /** Waits up to 5 s for the connection's DISCONNECTED on chat.connections. */
  const disconnectedEventually = (connectionId: string, what: string) =>
    eventually(
      async () =>
        (await connectionEvents()).some(
          (e) => e.value?.connectionId === connectionId && e.value.state === 'DISCONNECTED',
        ),
      5_000,
      what,
    );

  async function connectionIdOf(at: Running, userId: string, deviceId: string): Promise<string> {
    const events = (await connectionEvents()).filter(
      (e) =>
        e.value?.userId === userId &&
        e.value.deviceId === deviceId &&
        e.value.gatewayId === at.gateway.gatewayId &&
        e.value.state === 'CONNECTED',
    );
    assert.ok(events.length > 0, `no CONNECTED event of ${userId}/${deviceId}`);
    return events[events.length - 1]!.value!.connectionId;
  }

  async function counter(at: Running, name: string, labels: Record<string, string> = {}) {
    const metric = at.metrics.registry.getSingleMetric(name);
    const { values } = await metric!.get();
    return values
      .filter((v) => Object.entries(labels).every(([k, l]) => v.labels[k] === l))
      .reduce((sum, v) => sum + v.value, 0);
  }

  // ---- authentication ----

  describe('authentication, before the upgrade', () => {
    const unauthorized = (message: string) => ({
      status: 401,
      body: { error: { code: 'unauthorized', message } },
    });
    const invalid = 'the access token is invalid or expired';

    it('refuses a missing token with 401', async () => {
      assert.deepEqual(
        await refusedUpgrade(wsUrl(main)),
        unauthorized(
          'an access token is required (Authorization: Bearer, or access_token in the query)',
        ),
      );
    });

    it('refuses a bad token with 401, in the header or in the query', async () => {
      assert.deepEqual(
        await refusedUpgrade(wsUrl(main), { authorization: 'Bearer not.a.token' }),
        unauthorized(invalid),
      );
      const forged = await new SignJWT({})
        .setProtectedHeader({ alg: 'HS256' })
        .setSubject('alice')
        .setExpirationTime('1h')
        .sign(new TextEncoder().encode('another secret of thirty-two bytes or more'));
      assert.deepEqual(
        await refusedUpgrade(wsUrl(main, { access_token: forged })),
        unauthorized(invalid),
      );
    });

    it('refuses an expired token with 401', async () => {
      const expired = await tokenFor(newUser(), Math.floor(Date.now() / 1000) - 60);
      assert.deepEqual(
        await refusedUpgrade(wsUrl(main), { authorization: `Bearer ${expired}` }),
        unauthorized(invalid),
      );
    });

    it('refuses a bad deviceId with 400 naming the field', async () => {
      const token = await tokenFor(newUser());
      const refused = await refusedUpgrade(wsUrl(main, { deviceId: 'a.b' }), {
        authorization: `Bearer ${token}`,
      });
      assert.equal(refused.status, 400);
      assert.deepEqual((refused.body as { error: { field: string } }).error.field, 'deviceId');
    });

    it('answers 404 on another path', async () => {
      const token = await tokenFor(newUser());
      const refused = await refusedUpgrade(wsUrl(main, {}, '/v1/elsewhere'), {
        authorization: `Bearer ${token}`,
      });
      assert.equal(refused.status, 404);
    });

    it(`refuses a user's connection past ${MAX_CONNECTIONS_PER_USER} on this gateway with 429, until one closes`, async () => {
      const userId = newUser();
      const token = await tokenFor(userId);
      const clients = await Promise.all(
        Array.from({ length: MAX_CONNECTIONS_PER_USER }, (_, i) => connect(userId, `tab-${i}`)),
      );
      const refused = await refusedUpgrade(wsUrl(main, { deviceId: 'one-more' }), {
        authorization: `Bearer ${token}`,
      });
      assert.equal(refused.status, 429);
      assert.equal((refused.body as { error: { code: string } }).error.code, 'rate_limited');
      const other = await connect(newUser(), 'phone');
      clients[0]!.close();
      await clients[0]!.closed;
      const again = await connect(userId, 'one-more');
      for (const client of [...clients.slice(1), other, again]) client.close();
    });

    it('accepts a token in the header and in the query; deviceId defaults to "default"', async () => {
      const userId = newUser();
      const byHeader = await open(userId, { via: 'header' });
      assert.deepEqual(await byHeader.next(), { type: 'ready', userId, deviceId: 'default' });
      const byQuery = await open(userId, { via: 'query', deviceId: 'browser-1' });
      assert.deepEqual(await byQuery.next(), { type: 'ready', userId, deviceId: 'browser-1' });
      byHeader.close();
      byQuery.close();
    });
  });

  // ---- the connection ----

  describe('a connection', () => {
    it('writes ready first, and handles a frame sent on open after it', async () => {
      const userId = newUser();
      const client = await open(userId, {
        deviceId: 'd1',
        onOpen: (c) => c.send({ type: 'ping', id: 'early' }),
      });
      assert.deepEqual(await client.next(), { type: 'ready', userId, deviceId: 'd1' });
      assert.deepEqual(await client.next(), { type: 'pong', id: 'early' });
      client.close();
    });

    it('produces CONNECTED before ready and DISCONNECTED on close, with one connectionId', async () => {
      const userId = newUser();
      const client = await connect(userId, 'phone');
      const connectionId = await connectionIdOf(main, userId, 'phone');
      client.close();
      await client.closed;
      await disconnectedEventually(connectionId, 'DISCONNECTED');
      const events = (await connectionEvents()).filter((e) => e.value?.userId === userId);
      assert.deepEqual(
        events.map((e) => [e.key, e.value!.state, e.value!.connectionId, e.value!.gatewayId]),
        [
          [userId, 'CONNECTED', connectionId, main.gateway.gatewayId],
          [userId, 'DISCONNECTED', connectionId, main.gateway.gatewayId],
        ],
      );
    });

    it('answers every one of a thousand pipelined frames, in order', async () => {
      const client = await connect(newUser());
      // Few socket reads hold them all: the queue passes its bound, reading pauses, resumes.
      for (let i = 0; i < 1000; i++) client.send({ type: 'ping', id: `p${i}` });
      for (let i = 0; i < 1000; i++)
        assert.deepEqual(await client.next(), { type: 'pong', id: `p${i}` });
      client.close();
    });

    it('writes heartbeats to chat.gateways', async () => {
      await eventually(
        async () => {
          const beats = (
            await records<GatewayHeartbeat>(topics.gateways, codecs[topics.gateways])
          ).filter((r) => r.key === main.gateway.gatewayId);
          return (
            beats.length >= 3 && beats.every((b) => b.value?.gatewayId === main.gateway.gatewayId)
          );
        },
        5000,
        'three heartbeats',
      );
    });

    it(`forgets the heartbeat of a gateway silent for over ${FORGET_SILENT_GATEWAY_MS / 3_600_000} hours, and no other`, async () => {
      const now = Date.now();
      const gone = uniqueName('gw-gone');
      const producer = await log.producer();
      const heartbeat = (gatewayId: string, at: number) => ({
        topic: topics.gateways,
        key: Buffer.from(gatewayId),
        value: codecs[topics.gateways].encode({ gatewayId, at, startedAt: at }),
      });
      await producer.send([heartbeat(gone, now - 2 * FORGET_SILENT_GATEWAY_MS)]);
      const latest = async () =>
        new Map(
          (await records<GatewayHeartbeat>(topics.gateways, codecs[topics.gateways])).map((r) => [
            r.key!,
            r.value,
          ]),
        );
      const table = [...(await latest())].filter(
        (e): e is [string, GatewayHeartbeat] => e[1] !== null && e[1] !== undefined,
      );
      // Every heartbeat a day old (a table whose reader stalled): none is forgotten.
      const stalled = table.map(([id, h]): [string, GatewayHeartbeat] => [
        id,
        { ...h, at: now - 2 * FORGET_SILENT_GATEWAY_MS },
      ]);
      assert.deepEqual(await forgetSilentGateways(producer, stalled, now), []);
      assert.deepEqual(await forgetSilentGateways(producer, table, now), [gone]);
      const after = await latest();
      assert.equal(after.get(gone), null, 'a tombstone');
      assert.ok(after.get(main.gateway.gatewayId), 'a live gateway kept');
      await producer.close();
    });
  });

  // ---- send ----

  describe('send', () => {
    it('answers sent once both copies are stored: one keyed by the recipient, one by the sender', async () => {
      const alice = newUser('alice');
      const bob = newUser('bob');
      const client = await connect(alice, 'phone');
      const before = Date.now();
      const sent = await client.request({
        type: 'send',
        id: 'c1',
        to: bob.toUpperCase(),
        from: 'mallory', // ignored: the sender is the token's user
        body: { text: 'hello', n: [1, 2] },
      });
      const messageId = messageIdFor(alice, 'phone', 'c1');
      assert.deepEqual(sent, { type: 'sent', id: 'c1', messageId, at: sent.at });
      assert.ok((sent.at as number) >= before);
      // Durable before `sent`: read back at once.
      const stored = (await inboxCommands()).filter((r) => {
        const entry = r.value?.entry;
        return (
          entry !== undefined &&
          fullNames.MessageCopy in entry &&
          entry[fullNames.MessageCopy].messageId === messageId
        );
      });
      const copy = {
        [fullNames.MessageCopy]: {
          messageId,
          from: alice,
          to: bob,
          group: null,
          body: '{"text":"hello","n":[1,2]}',
          sentAt: sent.at,
        },
      };
      const byKey = (a: { key: string }, b: { key: string }) => a.key.localeCompare(b.key);
      assert.deepEqual(
        stored.map((r) => ({ key: r.key, value: r.value })).sort(byKey),
        [
          { key: bob, value: { userId: bob, entry: copy } },
          { key: alice, value: { userId: alice, entry: copy } },
        ].sort(byKey),
      );
      assert.equal(stored.length, 2);
      client.close();
    });

    it('gives a retry of the same id the same messageId, even on another connection', async () => {
      const alice = newUser('alice');
      const bob = newUser('bob');
      const first = await connect(alice, 'tablet');
      const a = await first.request({ type: 'send', id: 'retry-1', to: bob, body: 'x' });
      first.close();
      const second = await connect(alice, 'tablet');
      const b = await second.request({ type: 'send', id: 'retry-1', to: bob, body: 'x' });
      assert.equal(a.type, 'sent');
      assert.equal(b.type, 'sent');
      assert.equal(a.messageId, b.messageId);
      const other = await second.request({ type: 'send', id: 'retry-2', to: bob, body: 'x' });
      assert.notEqual(other.messageId, a.messageId);
      second.close();
    });

    /**
     * The log, whose sends of records keyed by these users resolve only once released (each
     * user on its own with `releaseFor`, all of them with `release`).
     */
    function holdingSendsTo(...userIds: string[]): {
      log: EmbeddedLog;
      release: () => void;
      releaseFor: (userId: string) => void;
    } {
      const releases = new Map<string, () => void>();
      const holds = new Map(
        userIds.map((userId) => [
          userId,
          new Promise<void>((resolve) => releases.set(userId, resolve)),
        ]),
      );
      const held = wrappingSends(log, async (records, send) => {
        const stored = await send(records);
        for (const record of records) await holds.get(record.key?.toString() ?? '');
        return stored;
      });
      return {
        log: held,
        release: () => releases.forEach((release) => release()),
        releaseFor: (userId) => releases.get(userId)!(),
      };
    }

    it('issues sends without waiting for the ones before to be durable, up to a bound, and answers them in order', async () => {
      const slow = newUser('slowpoke');
      const fast = newUser('fast');
      const { log: slowLog, release } = holdingSendsTo(slow);
      const at = await startGateway({ log: slowLog });
      try {
        const client = await connect(newUser(), 'default', at);
        client.send({ type: 'send', id: 's0', to: slow, body: 0 });
        for (let i = 1; i <= 40; i++) client.send({ type: 'send', id: `s${i}`, to: fast, body: i });
        // Issued without waiting, up to the bound of frames waiting for their answers.
        const storedForFast = async () =>
          (await inboxCommands()).filter((r) => r.key === fast).length;
        await eventually(
          async () => (await storedForFast()) === MAX_UNANSWERED_FRAMES - 1,
          5_000,
          'the sends after the first, stored while it is not answered',
        );
        await new Promise((resolve) => setTimeout(resolve, 300));
        assert.equal(await storedForFast(), MAX_UNANSWERED_FRAMES - 1, 'no more than the bound');
        assert.deepEqual(
          client.frames.filter((f) => f.type === 'sent'),
          [],
          'no answer before the first send is durable',
        );
        release();
        for (let i = 0; i <= 40; i++) {
          const { type, id } = await client.next();
          assert.deepEqual([type, id], ['sent', `s${i}`]);
        }
        assert.equal(await storedForFast(), 40);
        client.close();
      } finally {
        release();
      }
    });

    it('issues the next frame at the bound as soon as the oldest is answered, not all of them', async () => {
      const first = newUser('first');
      const second = newUser('second');
      const fast = newUser('fast');
      const { log: heldLog, release, releaseFor } = holdingSendsTo(first, second);
      const at = await startGateway({ log: heldLog });
      try {
        const client = await connect(newUser(), 'default', at);
        client.send({ type: 'send', id: 's0', to: first, body: 0 });
        client.send({ type: 'send', id: 's1', to: second, body: 1 });
        for (let i = 2; i <= 40; i++) client.send({ type: 'send', id: `s${i}`, to: fast, body: i });
        const storedForFast = async () =>
          (await inboxCommands()).filter((r) => r.key === fast).length;
        await eventually(
          async () => (await storedForFast()) === MAX_UNANSWERED_FRAMES - 2,
          5_000,
          'the bound of sends issued',
        );
        releaseFor(first);
        const answer = await client.next();
        assert.deepEqual([answer.type, answer.id], ['sent', 's0']);
        // s1 is still not answered, and every frame after it waits for it; the window moved on by one.
        await eventually(
          async () => (await storedForFast()) === MAX_UNANSWERED_FRAMES - 1,
          5_000,
          'one more send issued once the oldest was answered',
        );
        await new Promise((resolve) => setTimeout(resolve, 300));
        assert.equal(await storedForFast(), MAX_UNANSWERED_FRAMES - 1, 'no more than one');
        releaseFor(second);
        for (let i = 1; i <= 40; i++) {
          const { type, id } = await client.next();
          assert.deepEqual([type, id], ['sent', `s${i}`]);
        }
        client.close();
      } finally {
        release();
      }
    });

    it('tries DISCONNECTED again, for as long as producing it fails', async () => {
      // The log fails the DISCONNECTED (every send to chat.connections after the CONNECTED) a
      // dozen times: a broker away for longer than a few tries.
      let connectionSends = 0;
      const failing = wrappingSends(log, async (records, send) => {
        if (records.some((r) => r.topic === topics.connections)) {
          connectionSends++;
          if (connectionSends >= 2 && connectionSends <= 13)
            throw new Error('the log is unreachable for a while');
        }
        return send(records);
      });
      const at = await startGateway({ log: failing, limits: { disconnectedRetryMaxMs: 200 } });
      const user = newUser();
      const client = await connect(user, 'default', at);
      const connectionId = await connectionIdOf(at, user, 'default');
      client.close();
      await client.closed;
      await disconnectedEventually(connectionId, 'DISCONNECTED after twelve failed tries');
      assert.equal(connectionSends, 14);
    });

    it("answers internal when the log has not taken a frame's records in time, and at once while it takes no heartbeat", async () => {
      // A paused broker: sends neither succeed nor fail, until it comes back.
      let paused = false;
      const waiting: Array<() => void> = [];
      let messageSends = 0;
      const pausable = wrappingSends(log, async (records, send) => {
        if (records.some((r) => r.topic === topics.messages)) messageSends++;
        if (paused) await new Promise<void>((resolve) => waiting.push(resolve));
        return send(records);
      });
      const at = await startGateway({
        log: pausable,
        limits: { answerDeadlineMs: 300, heartbeatIntervalMs: 100 },
      });
      const alice = newUser('alice');
      const bob = newUser('bob');
      const client = await connect(alice, 'default', at);
      paused = true;
      let since = Date.now();
      const late = await client.request({ type: 'send', id: 's1', to: bob, body: 1 });
      assert.deepEqual([late.type, late.code, late.id], ['error', 'internal', 's1']);
      assert.ok(Date.now() - since >= 250, 'after the deadline');
      await eventually(async () => at.gateway.notReadyBecause !== undefined, 5_000, 'silent');
      const tried = messageSends;
      since = Date.now();
      const refused = await client.request({ type: 'send', id: 's2', to: bob, body: 2 });
      assert.deepEqual([refused.type, refused.code, refused.id], ['error', 'internal', 's2']);
      assert.ok(Date.now() - since < 250, 'at once');
      assert.equal(messageSends, tried, 'nothing more handed to the log');
      // The broker is back: what waited lands, and sends are answered sent again.
      paused = false;
      for (const resume of waiting.splice(0)) resume();
      await eventually(async () => at.gateway.notReadyBecause === undefined, 5_000, 'beating');
      const sent = await client.request({ type: 'send', id: 's1', to: bob, body: 1 });
      assert.deepEqual([sent.type, sent.id], ['sent', 's1']);
      client.close();
    });

    it('produces DISCONNECTED for a client that closes with frames waiting for their answers', async () => {
      const slow = newUser('slowpoke');
      const { log: slowLog, release } = holdingSendsTo(slow);
      const at = await startGateway({ log: slowLog });
      try {
        const sender = newUser();
        const client = await connect(sender, 'default', at);
        const connectionId = await connectionIdOf(at, sender, 'default');
        for (let i = 0; i < MAX_UNANSWERED_FRAMES + 8; i++)
          client.send({ type: 'send', id: `s${i}`, to: slow, body: i });
        await eventually(
          async () =>
            (await inboxCommands()).filter((r) => r.key === slow).length === MAX_UNANSWERED_FRAMES,
          5_000,
          'the bound of sends issued',
        );
        client.close();
        await client.closed;
        release();
        await disconnectedEventually(connectionId, 'DISCONNECTED of the closed connection');
      } finally {
        release();
      }
    });

    it('keeps a peer whose frames wait for the log, though its pongs wait unread too', async () => {
      const slow = newUser('slowpoke');
      const { log: slowLog, release } = holdingSendsTo(slow);
      const pinging = await startGateway({ log: slowLog, limits: { pingIntervalMs: 100 } });
      try {
        const client = await connect(newUser(), 'default', pinging);
        // 32 waiting for their answers and 64 queued: the gateway stops reading the socket.
        const sends = MAX_UNANSWERED_FRAMES + MAX_QUEUED_FRAMES + 4;
        for (let i = 0; i < sends; i++)
          client.send({ type: 'send', id: `s${i}`, to: slow, body: i });
        await new Promise((resolve) => setTimeout(resolve, 800)); // eight pings, none answered
        assert.equal(client.ws.readyState, WebSocket.OPEN);
        release();
        for (let i = 0; i < sends; i++) {
          const { type, id } = await client.next();
          assert.deepEqual([type, id], ['sent', `s${i}`]);
        }
        await new Promise((resolve) => setTimeout(resolve, 300));
        await client.alive();
        client.close();
      } finally {
        release();
      }
    });

    it('answers sent in send order', async () => {
      const alice = newUser('alice');
      const bob = newUser('bob');
      const client = await connect(alice);
      const ids = Array.from({ length: 20 }, (_, i) => `o-${i}`);
      for (const id of ids) client.send({ type: 'send', id, to: bob, body: { i: id } });
      const answers = [];
      for (const _ of ids) answers.push(await client.next());
      assert.deepEqual(
        answers.map((a) => [a.type, a.id]),
        ids.map((id) => ['sent', id]),
      );
      client.close();
    });

    it('refuses an unknown recipient and stores nothing', async () => {
      const alice = newUser('alice');
      const client = await connect(alice, 'phone');
      assert.deepEqual(
        await client.request({ type: 'send', id: 'c9', to: 'nobody-here', body: 1 }),
        { type: 'error', id: 'c9', code: 'unknown_recipient', message: 'no user "nobody-here"' },
      );
      const messageId = messageIdFor(alice, 'phone', 'c9');
      assert.equal(
        (await inboxCommands()).filter((r) => JSON.stringify(r.value).includes(messageId)).length,
        0,
      );
      await client.alive();
      client.close();
    });

    it('refuses a body over 16 KiB with too_large and stores nothing', async () => {
      const alice = newUser('alice');
      const bob = newUser('bob');
      const client = await connect(alice, 'phone');
      const answer = await client.request({
        type: 'send',
        id: 'big',
        to: bob,
        body: { text: 'x'.repeat(17 * 1024) },
      });
      assert.equal(answer.type, 'error');
      assert.equal(answer.code, 'too_large');
      assert.equal(answer.id, 'big');
      const messageId = messageIdFor(alice, 'phone', 'big');
      assert.equal(
        (await inboxCommands()).filter((r) => JSON.stringify(r.value).includes(messageId)).length,
        0,
      );
      await client.alive();
      client.close();
    });

    it('sends to a group as one GroupSend keyed by the group; an unknown group is refused', async () => {
      const alice = newUser('alice');
      const groupId = uniqueName('g');
      groups.add(groupId);
      const client = await connect(alice, 'phone');
      const sent = await client.request({ type: 'send', id: 'g1', group: groupId, body: [1] });
      const messageId = messageIdFor(alice, 'phone', 'g1');
      assert.deepEqual(sent, { type: 'sent', id: 'g1', messageId, at: sent.at });
      const stored = (
        await records<GroupMessage>(topics.groupMessages, codecs[topics.groupMessages])
      ).filter((r) => r.key === groupId);
      assert.deepEqual(
        stored.map((r) => r.value),
        [
          {
            groupId,
            payload: {
              [fullNames.GroupSend]: {
                messageId,
                id: 'g1',
                from: alice,
                body: '[1]',
                sentAt: sent.at,
              },
            },
          },
        ],
      );
      assert.deepEqual(
        await client.request({ type: 'send', id: 'g2', group: 'no-group', body: 1 }),
        {
          type: 'error',
          id: 'g2',
          code: 'unknown_recipient',
          message: 'no group "no-group"',
        },
      );
      client.close();
    });

    it('answers internal, with the id and never sent, when the frame cannot be handled', async () => {
      const client = await connect(newUser());
      const answer = await client.request({ type: 'send', id: 'boom', to: 'explode', body: 1 });
      assert.equal(answer.type, 'error');
      assert.equal(answer.code, 'internal');
      assert.equal(answer.id, 'boom');
      await client.alive();
      client.close();
    });
  });

  // ---- bad input ----

  describe('bad input', () => {
    const cases: [string, string, { code: string; id?: string }][] = [
      ['text that is not JSON', 'hello', { code: 'bad_frame' }],
      ['an array', '[]', { code: 'bad_frame' }],
      ['no type', '{"id":"b1"}', { code: 'bad_frame', id: 'b1' }],
      ['an unknown type', '{"type":"shout","id":"b2"}', { code: 'bad_frame', id: 'b2' }],
      [
        'an invalid id',
        JSON.stringify({ type: 'ping', id: 'x'.repeat(65) }),
        { code: 'bad_frame' },
      ],
      ['a send without id', '{"type":"send","to":"bob","body":1}', { code: 'bad_frame' }],
      [
        'a send with to and group',
        '{"type":"send","id":"b3","to":"bob","group":"g","body":1}',
        { code: 'bad_frame', id: 'b3' },
      ],
      ['a send to neither', '{"type":"send","id":"b4","body":1}', { code: 'bad_frame', id: 'b4' }],
      [
        'a send to an invalid userId',
        '{"type":"send","id":"b5","to":"b!","body":1}',
        { code: 'bad_frame', id: 'b5' },
      ],
      [
        'a send without body',
        '{"type":"send","id":"b6","to":"bob"}',
        { code: 'bad_frame', id: 'b6' },
      ],
      ['an ack without upTo', '{"type":"ack","id":"b7"}', { code: 'bad_frame', id: 'b7' }],
      [
        'an ack with a negative upTo',
        '{"type":"ack","id":"b8","upTo":-1}',
        { code: 'bad_frame', id: 'b8' },
      ],
      ['a read without messageId', '{"type":"read","id":"b9"}', { code: 'bad_frame', id: 'b9' }],
      [
        'a typing with a bad state',
        '{"type":"typing","id":"b10","to":"bob","state":"x"}',
        { code: 'bad_frame', id: 'b10' },
      ],
      [
        'a sync with a string after',
        '{"type":"sync","id":"b11","after":"3"}',
        { code: 'bad_frame', id: 'b11' },
      ],
      [
        'a typing to an unknown user',
        '{"type":"typing","id":"b12","to":"nobody-here","state":"start"}',
        { code: 'unknown_recipient', id: 'b12' },
      ],
      [
        `a body nested ${MAX_BODY_DEPTH + 1} levels deep`,
        `{"type":"send","id":"b13","to":"bob","body":${'['.repeat(MAX_BODY_DEPTH + 1)}${']'.repeat(MAX_BODY_DEPTH + 1)}}`,
        { code: 'bad_frame', id: 'b13' },
      ],
      [
        // 10 KB of text, under every size limit, and deeper than a recursive stringify survives.
        'a body nested 5,000 levels deep',
        `{"type":"send","id":"b14","to":"bob","body":${'['.repeat(5000)}${']'.repeat(5000)}}`,
        { code: 'bad_frame', id: 'b14' },
      ],
    ];

    it(`takes a body nested ${MAX_BODY_DEPTH} levels deep`, async () => {
      const alice = newUser('alice');
      const bob = newUser('bob');
      const client = await connect(alice);
      const body: unknown = JSON.parse(
        `${'['.repeat(MAX_BODY_DEPTH - 1)}{"deep":true}${']'.repeat(MAX_BODY_DEPTH - 1)}`,
      );
      const answer = await client.request({ type: 'send', id: 'deep', to: bob, body });
      assert.equal(answer.type, 'sent');
      client.close();
    });

    /** The raw answer to an upgrade request written by hand, as a client with bugs writes it. */
    async function rawUpgrade(lines: string[]): Promise<{
      status: number;
      headers: Map<string, string>;
      body: unknown;
    }> {
      const { port } = main.server.address() as AddressInfo;
      const socket = connectTcp(port, '127.0.0.1');
      socket.write([...lines, '', ''].join('\r\n'));
      let reply = '';
      for await (const chunk of socket) reply += String(chunk);
      const [head, body] = reply.split('\r\n\r\n') as [string, string];
      const [statusLine, ...headerLines] = head.split('\r\n');
      const headers = new Map(
        headerLines.map((line) => {
          const colon = line.indexOf(':');
          return [line.slice(0, colon).toLowerCase(), line.slice(colon + 1).trim()];
        }),
      );
      return { status: Number(statusLine!.split(' ')[1]), headers, body: JSON.parse(body) };
    }

    it('answers a malformed handshake (with a good token) in the error shape, not ws’s HTML', async () => {
      const token = await tokenFor(newUser());
      const request = (method: string, extra: string[]) => [
        `${method} /v1/ws HTTP/1.1`,
        'Host: 127.0.0.1',
        'Connection: Upgrade',
        'Upgrade: websocket',
        `Authorization: Bearer ${token}`,
        ...extra,
      ];
      const key = 'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==';
      const cases: [string, string[], number, Record<string, string>][] = [
        ['no key', request('GET', ['Sec-WebSocket-Version: 13']), 400, {}],
        [
          'a bad key',
          request('GET', ['Sec-WebSocket-Version: 13', 'Sec-WebSocket-Key: x']),
          400,
          {},
        ],
        [
          'an unknown version',
          request('GET', ['Sec-WebSocket-Version: 99', key]),
          400,
          { 'sec-websocket-version': '13, 8' },
        ],
        [
          'a malformed extension offer',
          request('GET', ['Sec-WebSocket-Version: 13', key, 'Sec-WebSocket-Extensions: ;;']),
          400,
          {},
        ],
        [
          'POST',
          request('POST', ['Sec-WebSocket-Version: 13', key, 'Content-Length: 0']),
          405,
          { allow: 'GET' },
        ],
      ];
      for (const [what, lines, status, headers] of cases) {
        const answer = await rawUpgrade(lines);
        assert.equal(answer.status, status, what);
        assert.equal(answer.headers.get('content-type'), 'application/json; charset=utf-8', what);
        assert.equal(answer.headers.get('cache-control'), 'no-store', what);
        for (const [name, value] of Object.entries(headers))
          assert.equal(answer.headers.get(name), value, what);
        const { error } = answer.body as { error: { code: string; message: string } };
        assert.equal(error.code, 'bad_request', what);
        assert.equal(typeof error.message, 'string', what);
      }
      const client = await connect(newUser());
      await client.alive();
      client.close();
    });

    it('challenges a refused token as the API does (RFC 6750): realm, and invalid_token when one was given', async () => {
      const base = ['GET /v1/ws HTTP/1.1', 'Host: 127.0.0.1', 'Connection: Upgrade'];
      const handshake = ['Upgrade: websocket', 'Sec-WebSocket-Version: 13'];
      const missing = await rawUpgrade([...base, ...handshake]);
      assert.equal(missing.status, 401);
      assert.equal(missing.headers.get('www-authenticate'), 'Bearer realm="kchat"');
      assert.equal(missing.headers.get('cache-control'), 'no-store');
      const bad = await rawUpgrade([...base, ...handshake, 'Authorization: Bearer not.a.token']);
      assert.equal(bad.status, 401);
      assert.equal(
        bad.headers.get('www-authenticate'),
        'Bearer realm="kchat", error="invalid_token"',
      );
    });

    it('refuses an upgrade whose target is not a URL with 400, and goes on', async () => {
      const { port } = main.server.address() as AddressInfo;
      const socket = connectTcp(port, '127.0.0.1');
      socket.write(
        [
          'GET http://[/v1/ws HTTP/1.1',
          'Host: 127.0.0.1',
          'Connection: Upgrade',
          'Upgrade: websocket',
          'Sec-WebSocket-Version: 13',
          'Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==',
          '',
          '',
        ].join('\r\n'),
      );
      let reply = '';
      for await (const chunk of socket) reply += String(chunk);
      assert.match(reply, /^HTTP\/1\.1 400 /);
      assert.match(reply, /"code":"bad_request"/);
      const client = await connect(newUser());
      await client.alive();
      client.close();
    });

    it('answers each with its error (and id), and the connection keeps working', async () => {
      const client = await connect(newUser());
      for (const [what, text, expected] of cases) {
        const answer = await client.request(text);
        assert.equal(answer.type, 'error', what);
        assert.equal(answer.code, expected.code, what);
        assert.equal(answer.id, expected.id, what);
        assert.equal(typeof answer.message, 'string', what);
        await client.alive();
      }
      client.close();
    });

    it('accepts a binary frame holding UTF-8 JSON, and refuses one that is not UTF-8', async () => {
      const client = await connect(newUser());
      client.ws.send(Buffer.from('{"type":"ping","id":"bin"}'), { binary: true });
      assert.deepEqual(await client.next(), { type: 'pong', id: 'bin' });
      client.ws.send(Buffer.from([0xff, 0xfe, 0x7b]), { binary: true });
      assert.equal((await client.next()).code, 'bad_frame');
      await client.alive();
      client.close();
    });

    it('answers a text frame that is not UTF-8 with bad_frame, not a close (1007)', async () => {
      const client = await connect(newUser());
      client.ws.send(Buffer.from([0x7b, 0xff, 0xfe, 0x7d]), { binary: false });
      assert.equal((await client.next()).code, 'bad_frame');
      await client.alive();
      client.close();
    });

    it('closes with 1009 on a frame over 64 KiB', async () => {
      const client = await connect(newUser());
      client.ws.send(JSON.stringify({ type: 'ping', pad: randomBytes(36_000).toString('hex') }));
      assert.equal((await client.closed).code, 1009);
    });

    it('closes with 1009 on a compressed frame that inflates past 64 KiB', async () => {
      const client = await open(newUser(), { ws: { perMessageDeflate: true } });
      assert.match(client.ws.extensions, /permessage-deflate/);
      assert.equal((await client.next()).type, 'ready');
      // About 100 KiB of text that deflates to a few hundred bytes on the wire.
      client.send(JSON.stringify({ type: 'ping', pad: 'a'.repeat(100_000) }));
      assert.equal((await client.closed).code, 1009);
    });

    it('takes a compressed frame under the limit', async () => {
      const alice = newUser('alice');
      const bob = newUser('bob');
      const client = await open(alice, { ws: { perMessageDeflate: true } });
      assert.equal((await client.next()).type, 'ready');
      const answer = await client.request({
        type: 'send',
        id: 'z1',
        to: bob,
        body: 'a'.repeat(16_000),
      });
      assert.equal(answer.type, 'sent');
      client.close();
    });

    it('drops send and typing frames over the rate limit with rate_limited and their id', async () => {
      const alice = newUser('alice');
      const bob = newUser('bob');
      const client = await connect(alice);
      // 10 per second, a bucket of 40: a burst of 60 typing frames has about 20 too many (fewer
      // if the burst takes long enough for the bucket to refill a little).
      for (let i = 0; i < 60; i++) {
        client.send({ type: 'typing', id: `t${i}`, to: bob, state: i % 2 ? 'stop' : 'start' });
      }
      client.send({ type: 'ping', id: 'end' });
      const answers: Frame[] = [];
      for (let frame = await client.next(); frame.type !== 'pong'; frame = await client.next()) {
        answers.push(frame);
      }
      assert.ok(answers.length >= 15 && answers.length <= 20, `${answers.length} refusals`);
      for (const answer of answers) {
        assert.equal(answer.type, 'error');
        assert.equal(answer.code, 'rate_limited');
        assert.match(answer.id as string, /^t\d+$/);
      }
      // The refused are the last ones: the first 40 went through.
      assert.ok(answers.every((a) => Number((a.id as string).slice(1)) >= 40));
      const typing = (await userCommands()).filter(
        (r) => r.key === bob && r.value && fullNames.Typing in r.value.command,
      );
      assert.equal(typing.length, 60 - answers.length);
      client.close();
    });

    it('limits sync frames on their own: four at once, then one a second, sends unaffected', async () => {
      const alice = newUser('alice');
      const client = await connect(alice, 'phone');
      for (let i = 0; i < 8; i++) client.send({ type: 'sync', id: `s${i}`, after: 0 });
      const sent = await client.request({ type: 'send', id: 'm1', to: newUser('bob'), body: 1 });
      assert.equal(sent.type, 'error', 'the refusals come first, in frame order');
      const refusals = [sent];
      for (let frame = await client.next(); frame.type !== 'sent'; frame = await client.next())
        refusals.push(frame);
      assert.ok(refusals.length >= 3 && refusals.length <= 4, `${refusals.length} refusals`);
      for (const refusal of refusals) {
        assert.equal(refusal.code, 'rate_limited');
        assert.match(refusal.id as string, /^s[4-7]$/);
      }
      const syncs = (await userCommands()).filter(
        (r) => r.key === alice && r.value && fullNames.Sync in r.value.command,
      );
      assert.equal(syncs.length, 1 + 8 - refusals.length, "the connection's own, and the allowed");
      client.close();
    });
  });

  // ---- user commands ----

  describe('ack, read, typing, sync', () => {
    it('makes an ack durable before the next frame is answered', async () => {
      const alice = newUser('alice');
      const client = await connect(alice, 'phone');
      client.send({ type: 'ack', upTo: 42 });
      assert.deepEqual(await client.request({ type: 'ping' }), { type: 'pong' });
      // No waiting: the pong came after the Ack was durable.
      // The connection's own Sync comes first (with CONNECTED), then the Ack.
      const commands = (await userCommands()).filter((r) => r.key === alice);
      assert.equal(commands.length, 2);
      assert.deepEqual(Object.keys(commands[0]!.value!.command), [fullNames.Sync]);
      assert.deepEqual(commands[1]!.value!.command, {
        [fullNames.Ack]: { deviceId: 'phone', upTo: 42, continued: false },
      });
      client.close();
    });

    /** The upTo of each Ack of `userId`, in log order. */
    const acksOf = async (userId: string) =>
      (await userCommands())
        .filter((r) => r.key === userId && fullNames.Ack in r.value!.command)
        .map(
          (r) => (r.value!.command as { [fullNames.Ack]: { upTo: number } })[fullNames.Ack].upTo,
        );

    // Four seconds' worth at once (the bucket's capacity), then ACK_RATE_PER_S.
    const ACK_BURST = ACK_RATE_PER_S * 4;

    it(`holds acks over ${ACK_RATE_PER_S} a second and merges them; the highest is applied before the next frame`, async () => {
      const alice = newUser('alice');
      const client = await connect(alice, 'phone');
      const acks = 1_000;
      for (let upTo = 1; upTo <= acks; upTo += 1) client.send({ type: 'ack', upTo });
      client.send({ type: 'sync', after: 0 });
      await client.alive(); // the sync is handled, its record durable
      const commands = (await userCommands())
        .filter((r) => r.key === alice)
        .map((r) => r.value!.command as Record<string, { upTo?: number; after?: number }>);
      const syncAt = commands.map((c) => c[fullNames.Sync]?.after === 0).lastIndexOf(true);
      assert.equal(
        commands[syncAt - 1]?.[fullNames.Ack]?.upTo,
        acks,
        'the highest ack goes to the log right before the sync',
      );
      const applied = await acksOf(alice);
      assert.ok(applied.length > 1 && applied.length <= ACK_BURST + 2, `${applied.length} Acks`);
      assert.deepEqual(
        applied,
        [...applied].sort((a, b) => a - b),
        'merged acks keep their order',
      );
      assert.ok((await counter(main, 'kchat_gateway_acks_held_total')) > 0);
      client.close();
    });

    it('applies a held ack once its token comes, with no frame after it', async () => {
      const alice = newUser('alice');
      const client = await connect(alice, 'phone');
      for (let upTo = 1; upTo <= ACK_BURST + 50; upTo += 1) client.send({ type: 'ack', upTo });
      await eventually(
        async () => (await acksOf(alice)).at(-1) === ACK_BURST + 50,
        5_000,
        'the held ack applied',
      );
      assert.ok((await acksOf(alice)).length <= ACK_BURST + 2);
      client.close();
    });

    it('applies a held ack when its connection closes, before DISCONNECTED', async () => {
      const alice = newUser('alice');
      const client = await connect(alice, 'phone');
      const connectionId = await connectionIdOf(main, alice, 'phone');
      for (let upTo = 1; upTo <= ACK_BURST + 50; upTo += 1) client.send({ type: 'ack', upTo });
      client.ws.close();
      await disconnectedEventually(connectionId, 'DISCONNECTED of the closed connection');
      assert.equal((await acksOf(alice)).at(-1), ACK_BURST + 50);
    });

    it('applies a held ack when the server closes its connection too', async () => {
      // A frozen clock: the ack bucket never has a token again, so the last ack stays held.
      const t0 = Date.now();
      const frozen = await startGateway({ now: () => t0, limits: { closeTimeoutMs: 1_000 } });
      const alice = newUser('alice');
      const client = await connect(alice, 'phone', frozen);
      const last = ACK_BURST + 10;
      for (let upTo = 1; upTo <= last; upTo += 1) client.send({ type: 'ack', upTo });
      await client.alive(); // a ping: every ack is handled, the last one held
      assert.notEqual((await acksOf(alice)).at(-1), last, 'held');
      // The client answers the close only after a while (its held ack's timer would fire).
      client.ws.pause();
      const stopping = frozen.stop(); // 1001 to every client
      await new Promise((resolve) => setTimeout(resolve, 200));
      client.ws.resume();
      await stopping;
      assert.equal((await acksOf(alice)).at(-1), last);
    });

    it('applies the acks still queued when the connection closes (a held ack its timer queued again too)', async () => {
      // A slow log: the send's records wait, its answer and the pings' after it fill the window.
      const waiting: Array<() => void> = [];
      let slow = true;
      const held = wrappingSends(log, async (records, send) => {
        if (slow && records.some((r) => r.topic === topics.messages))
          await new Promise<void>((resolve) => waiting.push(resolve));
        return send(records);
      });
      const at = await startGateway({ log: held, limits: { answerDeadlineMs: 60_000 } });
      const alice = newUser('alice');
      const client = await connect(alice, 'phone', at);
      const last = ACK_BURST + 20;
      for (let upTo = 1; upTo <= ACK_BURST; upTo += 1) client.send({ type: 'ack', upTo });
      client.send({ type: 'send', id: 's1', to: newUser('bob'), body: 1 });
      for (let upTo = ACK_BURST + 1; upTo <= last; upTo += 1) client.send({ type: 'ack', upTo });
      for (let i = 0; i < MAX_UNANSWERED_FRAMES + 8; i += 1) client.send({ type: 'ping' });
      await new Promise((resolve) => setTimeout(resolve, 300)); // the held ack's timer fired
      assert.notEqual((await acksOf(alice)).at(-1), last, 'not applied yet');
      client.close();
      await client.closed;
      slow = false;
      for (const resume of waiting.splice(0)) resume();
      await eventually(async () => (await acksOf(alice)).at(-1) === last, 5_000, 'the last ack');
    });

    it('does not apply a held ack early for pings: acks between pings stay under the rate', async () => {
      const alice = newUser('alice');
      const client = await connect(alice, 'phone');
      for (let upTo = 1; upTo <= 1_000; upTo += 1) {
        client.send({ type: 'ack', upTo });
        client.send({ type: 'ping' });
      }
      for (let pong = 1; pong <= 1_000; pong += 1)
        assert.deepEqual(await client.next(), { type: 'pong' });
      const applied = await acksOf(alice);
      assert.ok(applied.length <= ACK_BURST + 10, `${applied.length} Acks`);
      await eventually(async () => (await acksOf(alice)).at(-1) === 1_000, 5_000, 'the last ack');
      client.close();
    });

    it('handles read frames past the read rate later, every one, and the frames behind them after', async () => {
      const paced = await startGateway({ limits: { readsPerS: 10 } });
      const alice = newUser('alice');
      const client = await connect(alice, 'phone', paced);
      const reads = 60; // 40 at once (four seconds' worth), then 20 at 10 a second
      const since = Date.now();
      for (let i = 0; i < reads; i += 1) client.send({ type: 'read', messageId: `m-${i}` });
      await client.alive(); // behind the reads
      const took = Date.now() - since;
      assert.ok(took >= 1_500, `answered after ${took} ms`);
      const read = (await userCommands()).filter(
        (r) => r.key === alice && fullNames.Read in r.value!.command,
      );
      assert.equal(read.length, reads, 'none refused');
      client.close();
    });

    it('produces Read and Sync keyed by the user, Typing keyed by the recipient', async () => {
      const alice = newUser('alice');
      const bob = newUser('bob');
      const groupId = uniqueName('g');
      groups.add(groupId);
      const client = await connect(alice, 'laptop');
      const connectionId = await connectionIdOf(main, alice, 'laptop');
      client.send({ type: 'read', messageId: 'm-123' });
      client.send({ type: 'typing', to: bob, state: 'start' });
      client.send({ type: 'typing', group: groupId, state: 'stop' });
      client.send({ type: 'sync', after: 7 });
      await client.alive();
      const commands = (await userCommands()).filter((r) => r.key === alice || r.key === bob);
      const byKey = (key: string) =>
        commands
          .filter((r) => r.key === key)
          .map((r) => ({ userId: r.value!.userId, command: r.value!.command }));
      assert.deepEqual(byKey(alice), [
        {
          // Asked for with CONNECTED: replay from the device's last applied ack.
          userId: alice,
          command: {
            [fullNames.Sync]: {
              deviceId: 'laptop',
              connectionId,
              after: FROM_ACK,
              continued: false,
            },
          },
        },
        {
          userId: alice,
          command: {
            [fullNames.Read]: { deviceId: 'laptop', messageId: 'm-123', connectionId, id: null },
          },
        },
        {
          userId: alice,
          command: {
            [fullNames.Sync]: { deviceId: 'laptop', connectionId, after: 7, continued: false },
          },
        },
      ]);
      const [typing] = byKey(bob);
      assert.equal(typing!.userId, bob);
      const relayed = (typing!.command as { [fullNames.Typing]: { from: string } })[
        fullNames.Typing
      ];
      assert.deepEqual(
        { ...relayed, at: 0 },
        { from: alice, to: bob, group: null, state: 'start', at: 0 },
      );
      const groupTyping = (
        await records<GroupMessage>(topics.groupMessages, codecs[topics.groupMessages])
      ).filter((r) => r.key === groupId);
      assert.equal(groupTyping.length, 1);
      const payload = groupTyping[0]!.value!.payload as { [fullNames.Typing]: object };
      assert.deepEqual(
        { ...payload[fullNames.Typing], at: 0 },
        { from: alice, to: null, group: groupId, state: 'stop', at: 0 },
      );
      client.close();
    });
  });

  // ---- deliveries ----

  describe('deliveries', () => {
    it(`keeps its deliveries topic ${DELIVERIES_RETENTION_MS / 60_000} minutes, one an earlier version created too`, async () => {
      assert.equal(
        (await log.admin.describeTopic(deliveriesTopic(main.gateway.gatewayId)))?.retentionMs,
        DELIVERIES_RETENTION_MS,
      );
      const gatewayId = uniqueName('gw-earlier');
      await log.admin.createTopics([{ topic: deliveriesTopic(gatewayId), partitions: PARTITIONS }]);
      assert.equal(
        (await log.admin.describeTopic(deliveriesTopic(gatewayId)))?.retentionMs,
        604_800_000,
      );
      await startGateway({ gatewayId });
      assert.equal(
        (await log.admin.describeTopic(deliveriesTopic(gatewayId)))?.retentionMs,
        DELIVERIES_RETENTION_MS,
      );
    });

    let deliveryCodec: TopicCodec<Delivery>;
    before(async () => {
      deliveryCodec = await new Codecs(registry).forTopic<Delivery>(
        deliveriesTopic(main.gateway.gatewayId),
        loadSchema('Delivery'),
        avroTypeOptions(),
      );
    });

    /** A Delivery of message `m-<seq>` from bob to `userId`, for the given connections. */
    const messageDelivery = (
      userId: string,
      targets: Delivery['targets'],
      seq: number,
      body: string,
      at = Date.now(),
      more = false,
    ): Delivery => ({
      userId,
      targets,
      more,
      frame: {
        [fullNames.InboxEntry]: {
          userId,
          seq,
          at,
          entry: {
            [fullNames.MessageCopy]: {
              messageId: `m-${seq}`,
              from: 'bob',
              to: userId,
              group: null,
              body,
              sentAt: at,
            },
          },
        },
      },
    });

    async function produceDeliveries(at: Running, deliveries: Delivery[]): Promise<void> {
      const producer = await log.producer();
      await producer.send(
        deliveries.map((d) => ({
          topic: deliveriesTopic(at.gateway.gatewayId),
          key: Buffer.from(d.userId),
          value: deliveryCodec.encode(d),
        })),
      );
      await producer.close();
    }

    it('writes each delivery to exactly the connections it targets', async () => {
      const alice = newUser('alice');
      const a = await connect(alice, 'phone');
      const b = await connect(alice, 'laptop');
      const phone = await connectionIdOf(main, alice, 'phone');
      const laptop = await connectionIdOf(main, alice, 'laptop');
      const skippedBefore = await counter(main, 'kchat_gateway_deliveries_skipped_total', {
        reason: 'unknown_connection',
      });
      const sentAt = Date.now();
      await produceDeliveries(main, [
        messageDelivery(
          alice,
          [
            { deviceId: 'phone', connectionId: phone },
            { deviceId: 'gone', connectionId: 'no-such-connection' },
          ],
          1,
          '{"text":"hi"}',
          sentAt,
        ),
        {
          userId: alice,
          targets: [{ deviceId: 'laptop', connectionId: laptop }],
          frame: {
            [fullNames.Typing]: { from: 'bob', to: alice, group: null, state: 'start', at: sentAt },
          },
          more: false,
        },
      ]);
      assert.deepEqual(await a.next(), {
        type: 'message',
        seq: 1,
        messageId: 'm-1',
        from: 'bob',
        to: alice,
        body: { text: 'hi' },
        sentAt,
      });
      // Same key, same partition: the laptop's first delivery is the second record, so the
      // first never reached it; and the phone's next frame is its own pong, not the typing.
      assert.deepEqual(await b.next(), { type: 'typing', from: 'bob', to: alice, state: 'start' });
      await a.alive();
      assert.equal(
        (await counter(main, 'kchat_gateway_deliveries_skipped_total', {
          reason: 'unknown_connection',
        })) - skippedBefore,
        1,
      );
      a.close();
      b.close();
    });

    it('skips a delivery it cannot write as a frame, and delivers the next', async () => {
      const alice = newUser('alice');
      const client = await connect(alice, 'phone');
      const phone = await connectionIdOf(main, alice, 'phone');
      const skippedBefore = await counter(main, 'kchat_gateway_deliveries_skipped_total', {
        reason: 'unwritable',
      });
      // Not from this gateway (it refuses such a body): a body too deep to serialize again.
      const copy = (seq: number, body: string) =>
        messageDelivery(alice, [{ deviceId: 'phone', connectionId: phone }], seq, body);
      await produceDeliveries(main, [
        copy(1, `${'['.repeat(20_000)}${']'.repeat(20_000)}`),
        copy(2, '"after"'),
      ]);
      const next = await client.next();
      assert.deepEqual([next.type, next.seq, next.body], ['message', 2, 'after']);
      assert.equal(
        (await counter(main, 'kchat_gateway_deliveries_skipped_total', {
          reason: 'unwritable',
        })) - skippedBefore,
        1,
      );
      client.close();
    });

    it('asks for the next replay part even when the entry that ends the part cannot be written', async () => {
      const alice = newUser('alice');
      const client = await connect(alice, 'phone');
      const phone = await connectionIdOf(main, alice, 'phone');
      const target = [{ deviceId: 'phone', connectionId: phone }];
      await produceDeliveries(main, [
        messageDelivery(alice, target, 1, '"before"'),
        messageDelivery(
          alice,
          target,
          2,
          `${'['.repeat(20_000)}${']'.repeat(20_000)}`,
          Date.now(),
          true,
        ),
      ]);
      assert.deepEqual((await client.next()).seq, 1);
      await eventually(
        async () =>
          (await userCommands()).some((r) => {
            const sync =
              r.value && (r.value.command as { [fullNames.Sync]?: Sync })[fullNames.Sync];
            return sync?.connectionId === phone && sync.continued && sync.after === 2;
          }),
        5_000,
        'a continued Sync after 2',
      );
      client.close();
    });

    /** Writes deliveries for `userId` to the gateway `at`'s topic, as the users actor does. */
    async function deliveriesTo(at: Running, userId: string) {
      const topic = deliveriesTopic(at.gateway.gatewayId);
      const codec = await new Codecs(registry).forTopic<Delivery>(
        topic,
        loadSchema('Delivery'),
        avroTypeOptions(),
      );
      const producer = await log.producer();
      return {
        send: (deliveries: Delivery[]) =>
          producer.send(
            deliveries.map((d) => ({ topic, key: Buffer.from(userId), value: codec.encode(d) })),
          ),
        close: () => producer.close(),
      };
    }

    /** `count` messages from `fromSeq` on, with bodies of about `bodyBytes`, to one connection. */
    const messages = (
      userId: string,
      target: { deviceId: string; connectionId: string },
      fromSeq: number,
      count: number,
      bodyBytes: number,
    ) =>
      Array.from({ length: count }, (_, i) =>
        messageDelivery(
          userId,
          [target],
          fromSeq + i,
          JSON.stringify(randomBytes((bodyBytes * 3) / 4).toString('base64')),
        ),
      );

    /** A client that has stopped reading: the kernel buffers fill, then the gateway's. */
    async function notReading(at: Running, userId: string, deviceId = 'slow') {
      const client = await open(userId, { at, deviceId, ws: { perMessageDeflate: false } });
      assert.equal((await client.next()).type, 'ready');
      const connectionId = await connectionIdOf(at, userId, deviceId);
      const socket = (client.ws as unknown as { _socket: { pause(): void; resume(): void } })
        ._socket;
      socket.pause();
      return { client, connectionId, resume: () => socket.resume() };
    }

    it('closes a client that stays over the send buffer limit for the grace; the rest goes on', async () => {
      const slow = await startGateway({
        limits: {
          sendBufferLimitBytes: 256 * 1024,
          sendBufferHardLimitBytes: 64 * 1024 * 1024,
          slowConsumerGraceMs: 1_000,
          closeTimeoutMs: 300,
        },
      });
      const alice = newUser('alice');
      const { client, connectionId, resume } = await notReading(slow, alice);
      const target = { deviceId: 'slow', connectionId };
      const to = await deliveriesTo(slow, alice);
      // Deliveries until the send buffer is over the limit, then no more: it stays over.
      const over = () => counter(slow, 'kchat_gateway_send_buffer_over_limit_total');
      for (let round = 0, seq = 1; round < 100 && (await over()) === 0; round++, seq += 20)
        await to.send(messages(alice, target, seq, 20, 6_000));
      await to.close();
      assert.equal(await over(), 1, 'over the limit');
      await new Promise((resolve) => setTimeout(resolve, 300));
      assert.equal(slow.gateway.connectionCount, 1, 'not closed before the grace');
      await eventually(() => slow.gateway.connectionCount === 0, 5000, 'the slow client closed');
      assert.equal(await counter(slow, 'kchat_gateway_slow_consumers_total'), 1);
      await disconnectedEventually(connectionId, 'DISCONNECTED of the slow client');
      resume();
      const { code } = await client.closed;
      assert.ok(code === 1013 || code === 1006, `closed with ${code}`);
      // The gateway itself is fine.
      const other = await connect(newUser(), 'default', slow);
      await other.alive();
      other.close();
    });

    it('closes a client over the hard send buffer limit at once, grace or not', async () => {
      const slow = await startGateway({
        limits: {
          sendBufferLimitBytes: 256 * 1024,
          sendBufferHardLimitBytes: 1024 * 1024,
          slowConsumerGraceMs: 600_000,
          closeTimeoutMs: 300,
        },
      });
      const alice = newUser('alice');
      const { client, connectionId, resume } = await notReading(slow, alice);
      const target = { deviceId: 'slow', connectionId };
      const to = await deliveriesTo(slow, alice);
      for (let round = 0, seq = 1; round < 200 && slow.gateway.connectionCount > 0; round++) {
        await to.send(messages(alice, target, seq, 20, 6_000));
        seq += 20;
      }
      await to.close();
      await eventually(() => slow.gateway.connectionCount === 0, 5000, 'the slow client closed');
      assert.equal(await counter(slow, 'kchat_gateway_slow_consumers_total'), 1);
      resume();
      const { code } = await client.closed;
      assert.ok(code === 1013 || code === 1006, `closed with ${code}`);
    });

    it('handles no more frames of a client that does not read their answers, and answers every one once it reads', async () => {
      // Found by a review helper: pings from 16 such connections, each answered with a pong
      // the client never read, held the event loop for seconds (some 100,000 small writes per
      // connection before the 4 MiB limit closed it).
      const at = await startGateway({ limits: { closeTimeoutMs: 300 } });
      const alice = newUser('alice');
      const { client, resume } = await notReading(at, alice);
      const pad = 'x'.repeat(56);
      let sent = 0;
      const started = Date.now();
      // Until the gateway stops reading (TCP then holds the client's writes back), or a bound.
      while (
        sent < 400_000 &&
        client.ws.bufferedAmount < 1 << 20 &&
        Date.now() - started < 20_000
      ) {
        for (let i = 0; i < 1_000; i++)
          client.ws.send(`{"type":"ping","id":"${pad}${String(++sent).padStart(8, '0')}"}`);
        await new Promise((resolve) => setImmediate(resolve));
      }
      assert.ok(client.ws.bufferedAmount >= 1 << 20, `the gateway read on: ${sent} pings sent`);
      assert.equal(at.gateway.connectionCount, 1, 'the connection is open');
      resume();
      const pongs = () => client.frames.filter((f) => f.type === 'pong');
      await eventually(() => pongs().length === sent, 30_000, `${sent} pongs`);
      assert.ok(pongs().every((f, i) => f.id === `${pad}${String(i + 1).padStart(8, '0')}`));
      assert.equal(at.gateway.connectionCount, 1, 'still open');
    });

    it('keeps a client that reads through a burst over the send buffer limit (deflated)', async () => {
      const bursty = await startGateway({
        limits: { sendBufferLimitBytes: 64 * 1024, slowConsumerGraceMs: 5_000 },
      });
      const alice = newUser('alice');
      // permessage-deflate offered, as browsers do: frames wait for zlib in the send buffer.
      const client = await open(alice, { at: bursty, deviceId: 'phone' });
      assert.equal((await client.next()).type, 'ready');
      const connectionId = await connectionIdOf(bursty, alice, 'phone');
      // One batch of about 900 KB for one connection, as a Kafka fetch brings.
      const to = await deliveriesTo(bursty, alice);
      await to.send(messages(alice, { deviceId: 'phone', connectionId }, 1, 150, 6_000));
      await to.close();
      await eventually(
        () => client.frames.filter((f) => f.type === 'message').length === 150,
        10_000,
        'the burst read whole',
      );
      client.send({ type: 'ping', id: 'after-the-burst' });
      await eventually(
        () => client.frames.some((f) => f.type === 'pong' && f.id === 'after-the-burst'),
        5_000,
        'a pong: the connection still works',
      );
      assert.equal(
        await counter(bursty, 'kchat_gateway_send_buffer_over_limit_total'),
        1,
        'a burst',
      );
      assert.equal(await counter(bursty, 'kchat_gateway_slow_consumers_total'), 0);
      client.close();
    });

    it("asks for a replay's next part once the client has read the part, not before", async () => {
      const paced = await startGateway({ limits: { sendBufferLimitBytes: 8 * 1024 * 1024 } });
      const alice = newUser('alice');
      // The client stops reading; entries go out until the gateway holds more than the resume
      // threshold for it (the kernel's buffers fill first).
      const { client, connectionId, resume } = await notReading(paced, alice, 'back');
      const held = () =>
        (
          paced.gateway as unknown as {
            connections: Map<string, { ws: { bufferedAmount: number } }>;
          }
        ).connections.get(connectionId)!.ws.bufferedAmount;
      const continued = async () =>
        (await userCommands()).flatMap((r) => {
          const sync = r.value && (r.value.command as { [fullNames.Sync]?: Sync })[fullNames.Sync];
          return sync?.connectionId === connectionId && sync.continued ? [sync.after] : [];
        });
      const to = await deliveriesTo(paced, alice);
      const deliver = (delivery: Delivery) => to.send([delivery]);
      const body = JSON.stringify(randomBytes(6000).toString('base64'));
      const target = [{ deviceId: 'back', connectionId }];
      let seq = 0;
      for (let round = 0; round < 2_000 && held() <= REPLAY_RESUME_BYTES; round++) {
        await deliver(messageDelivery(alice, target, ++seq, body));
        if (seq % 20 === 0) await new Promise((resolve) => setTimeout(resolve, 5));
      }
      assert.ok(held() > REPLAY_RESUME_BYTES, `${held()} bytes held`);
      // The end of a part: not asked for while the client does not read.
      await deliver(messageDelivery(alice, target, ++seq, body, Date.now(), true));
      const partEnd = seq;
      await new Promise((resolve) => setTimeout(resolve, 500));
      assert.deepEqual(await continued(), []);
      // It reads: the gateway asks for the part after the last entry it wrote, once.
      resume();
      await eventually(async () => (await continued()).length > 0, 5_000, 'a continued Sync');
      await new Promise((resolve) => setTimeout(resolve, 200));
      assert.deepEqual(await continued(), [partEnd]);
      assert.equal(await counter(paced, 'kchat_gateway_replay_parts_asked_total'), 1);
      await to.close();
      client.close();
    });
  });

  // ---- liveness and shutdown ----

  describe('liveness and shutdown', () => {
    it('terminates a peer that does not answer pings, and keeps one that does', async () => {
      const pinging = await startGateway({ limits: { pingIntervalMs: 200 } });
      const silent = await open(newUser(), { at: pinging, ws: { autoPong: false } });
      const answering = await open(newUser(), { at: pinging });
      assert.equal((await silent.next()).type, 'ready');
      assert.equal((await answering.next()).type, 'ready');
      assert.equal((await silent.closed).code, 1006);
      await new Promise((resolve) => setTimeout(resolve, 700)); // three more pings
      assert.equal(answering.ws.readyState, WebSocket.OPEN);
      await answering.alive();
      answering.close();
    });

    it('close() closes every socket with 1001 and produces their DISCONNECTED', async () => {
      const closing = await startGateway();
      const alice = newUser('alice');
      const bob = newUser('bob');
      const a = await connect(alice, 'one', closing);
      const b = await connect(bob, 'two', closing);
      const ids = [
        await connectionIdOf(closing, alice, 'one'),
        await connectionIdOf(closing, bob, 'two'),
      ];
      await closing.gateway.close();
      assert.equal((await a.closed).code, 1001);
      assert.equal((await b.closed).code, 1001);
      assert.equal(closing.gateway.connectionCount, 0);
      const disconnected = (await connectionEvents())
        .filter((e) => e.value?.state === 'DISCONNECTED')
        .map((e) => e.value!.connectionId);
      for (const id of ids) assert.ok(disconnected.includes(id), `DISCONNECTED of ${id}`);
      // Its heartbeat key is deleted: the gateway is gone, not silent.
      const beats = (
        await records<GatewayHeartbeat>(topics.gateways, codecs[topics.gateways])
      ).filter((r) => r.key === closing.gateway.gatewayId);
      assert.equal(beats[beats.length - 1]!.value, null);
      // New upgrades are refused.
      const token = await tokenFor(alice);
      assert.equal(
        (await refusedUpgrade(wsUrl(closing), { authorization: `Bearer ${token}` })).status,
        503,
      );
    });
  });
});
