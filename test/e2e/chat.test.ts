/**
 * The first working chat, end to end on `npm start` with real HTTP and WebSocket clients:
 * two users register, exchange messages with gapless seqs, get receipts, retry a send, go
 * offline and come back, and open a second device.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, startServer, type Started } from '../support/process.ts';
import { eventually } from '../support/log-helpers.ts';
import { Client, metric, register } from '../support/chat-client.ts';

describe('chat end to end (npm start, embedded shape)', function () {
  this.timeout(120_000);
  let dataDir: string;
  let server: Started;
  let env: Record<string, string>;
  const tokens = new Map<string, string>();

  before(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'kchat-chat-'));
    // The load test sends faster than the default 50 send frames a second a connection may.
    env = {
      PORT: String(await freePort()),
      DATA_DIR: dataDir,
      LOG_LEVEL: 'warn',
      RATE_LIMIT_PER_S: '5000',
    };
    server = await startServer(env);
    for (const username of ['alice', 'bob']) await signUp(username);
  });

  /** Registers an account and keeps its access token. */
  const signUp = async (username: string) =>
    tokens.set(username, await register(server.url, username));

  after(async () => {
    await server?.stop();
    await rm(dataDir, { recursive: true, force: true });
  });

  it('delivers messages both ways with gapless seqs, receipts, and one inbox entry per retried send', async () => {
    const alice = await Client.open(server.url, tokens.get('alice')!, 'phone');
    const bob = await Client.open(server.url, tokens.get('bob')!, 'phone');
    // Recipients are known from the accounts table, which the gateway follows.
    await eventually(
      async () => {
        alice.send({ type: 'send', id: 'probe', to: 'nobody-here', body: 1 });
        return (
          (await alice.next((f) => f.type === 'error' && f.id === 'probe')).code ===
          'unknown_recipient'
        );
      },
      10_000,
      'the unknown_recipient answer',
    );
    // No groups actor yet: a group is unknown, rather than `sent` with nothing to route it.
    alice.send({ type: 'send', id: 'g1', group: 'friends', body: 1 });
    assert.equal(
      (await alice.next((f) => f.type === 'error' && f.id === 'g1')).code,
      'unknown_recipient',
    );

    alice.send({ type: 'send', id: 'c1', to: 'bob', body: { text: 'hello bob' } });
    const sent = await alice.next((f) => f.type === 'sent' && f.id === 'c1');
    const atBob = await bob.next((f) => f.type === 'message' && f.messageId === sent.messageId);
    assert.deepEqual(
      { seq: atBob.seq, from: atBob.from, to: atBob.to, body: atBob.body },
      {
        seq: 1,
        from: 'alice',
        to: 'bob',
        body: { text: 'hello bob' },
      },
    );
    const own = await alice.next((f) => f.type === 'message' && f.messageId === sent.messageId);
    assert.equal(own.seq, 1, "the sender's own copy is in her inbox too");

    // A retry of c1 gets the same messageId and no second entry anywhere.
    alice.send({ type: 'send', id: 'c1', to: 'bob', body: { text: 'hello bob' } });
    await eventually(
      () => alice.frames.filter((f) => f.type === 'sent' && f.id === 'c1').length === 2,
      10_000,
      'the retry',
    );
    assert.equal(
      alice.frames.filter((f) => f.type === 'sent' && f.id === 'c1')[1]!.messageId,
      sent.messageId,
    );

    bob.send({ type: 'send', id: 'b1', to: 'alice', body: 'hi alice' });
    const reply = await alice.next((f) => f.type === 'message' && f.from === 'bob');
    assert.equal(reply.seq, 2, 'no entry was used up by the retry');

    bob.send({ type: 'ack', upTo: 2 });
    const receipt = await alice.next((f) => f.type === 'receipt');
    assert.deepEqual(
      { seq: receipt.seq, messageId: receipt.messageId, by: receipt.by, status: receipt.status },
      {
        seq: 3,
        messageId: sent.messageId,
        by: 'bob',
        status: 'delivered',
      },
    );
    bob.send({ type: 'read', messageId: sent.messageId });
    const read = await alice.next((f) => f.type === 'receipt' && f.status === 'read');
    assert.equal(read.seq, 4);
    // A read of a message not in bob's inbox: the users actor answers on bob's connection.
    bob.send({ type: 'read', id: 'r1', messageId: 'no-such-message' });
    const refused = await bob.next((f) => f.type === 'error' && f.id === 'r1');
    assert.equal(refused.code, 'unknown_message');
    assert.deepEqual(
      bob.entries().map((f) => f.seq),
      [1, 2],
    );
    // Each stage of a message's path says how long after the stage before it got there.
    for (const [name, labels] of [
      ['kchat_streams_record_latency_seconds', { application: 'users' }],
      ['kchat_gateway_delivery_latency_seconds', {}],
    ] as const) {
      const count = await metric(server.url, `${name}_count`, labels);
      const sum = await metric(server.url, `${name}_sum`, labels);
      assert.ok(count >= 4, `${name}: ${count} observed`);
      // In seconds, since the stage before: a unit or an origin mixed up would be far off this.
      assert.ok(sum / count >= 0 && sum / count < 10, `${name}: ${sum / count} s on average`);
    }
    await alice.close();
    await bob.close();
  });

  it('gives a user who was offline everything in order, never what it acked, and all of it to a new device', async () => {
    const alice = await Client.open(server.url, tokens.get('alice')!, 'phone');
    for (let i = 1; i <= 5; i++)
      alice.send({ type: 'send', id: `offline-${i}`, to: 'bob', body: { n: i } });
    await alice.next((f) => f.type === 'sent' && f.id === 'offline-5');

    const bob = await Client.open(server.url, tokens.get('bob')!, 'phone');
    await bob.next((f) => f.type === 'message' && (f.body as { n?: number }).n === 5);
    const replayed = bob.entries();
    assert.deepEqual(
      replayed.map((f) => f.seq),
      [3, 4, 5, 6, 7],
      'above the ack of 2, in order',
    );
    assert.deepEqual(
      replayed.map((f) => (f.body as { n: number }).n),
      [1, 2, 3, 4, 5],
    );

    const tablet = await Client.open(server.url, tokens.get('bob')!, 'tablet');
    await tablet.next((f) => f.type === 'message' && f.seq === 7);
    assert.deepEqual(
      tablet.entries().map((f) => f.seq),
      [3, 4, 5, 6, 7],
      'a first-time device gets every kept entry: 1 and 2 went with the ack of the only device',
    );
    await alice.close();
    await bob.close();
    await tablet.close();
  });

  it('gives a device back after a long absence an inbox larger than its send buffer, in parts, in order', async () => {
    for (const username of ['carol', 'dave']) await signUp(username);
    // dave's phone connected once, so the inbox keeps everything it has not acked.
    await (await Client.open(server.url, tokens.get('dave')!, 'phone')).close();
    const carol = await Client.open(server.url, tokens.get('carol')!, 'phone');
    // 480 messages of 8 KB: about 4 MB, four times what the gateway buffers for a connection.
    const count = 480;
    const text = 'x'.repeat(8_000);
    const processed = () =>
      metric(server.url, 'kchat_streams_records_processed_total', { application: 'users' });
    const before = await processed();
    for (let i = 1; i <= count; i++) {
      carol.send({ type: 'send', id: `away-${i}`, to: 'dave', body: { n: i, text } });
      if (i % 40 === 0) await carol.next((f) => f.type === 'sent' && f.id === `away-${i}`);
    }
    // `sent` says the copies (dave's and carol's) are in the log; once the users actor has taken
    // them, dave's CONNECTED cannot come first and have them all go out live.
    await eventually(
      async () => (await processed()) >= before + 2 * count,
      30_000,
      'the users actor to append every copy',
    );
    const askedBefore = await metric(server.url, 'kchat_gateway_replay_parts_asked_total');
    const dave = await Client.open(server.url, tokens.get('dave')!, 'phone');
    // More come while the replay goes: they wait for it, and follow in seq order.
    for (let i = count + 1; i <= count + 20; i++)
      carol.send({ type: 'send', id: `away-${i}`, to: 'dave', body: { n: i, text: 'live' } });
    const entries = await dave.receive(count + 20);
    assert.equal(dave.ws.readyState, dave.ws.OPEN, 'the connection stays open');
    assert.deepEqual(
      entries.map((f) => f.seq),
      Array.from({ length: count + 20 }, (_, i) => i + 1),
      'every seq once, in order',
    );
    assert.deepEqual(
      entries.map((f) => (f.body as { n: number }).n),
      Array.from({ length: count + 20 }, (_, i) => i + 1),
    );
    // About 4 MB in parts of at most 256 KiB, each asked for by the gateway.
    const asked =
      (await metric(server.url, 'kchat_gateway_replay_parts_asked_total')) - askedBefore;
    assert.ok(asked >= 10, `${asked} parts asked for`);
    await carol.close();
    await dave.close();
  });

  it('loses nothing acknowledged and duplicates nothing when the process is killed under load', async () => {
    const total = 300;
    const alice = await Client.open(server.url, tokens.get('alice')!, 'laptop');
    // A steady load: up to 16 sends in flight, each answered by `sent` once durable.
    let next = 1;
    const inFlight = () =>
      next -
      1 -
      alice.frames.filter((f) => f.type === 'sent' && String(f.id).startsWith('load-')).length;
    const killAfter = 60 + Math.floor(Math.random() * 120);
    while (
      alice.frames.filter((f) => f.type === 'sent' && String(f.id).startsWith('load-')).length <
      killAfter
    ) {
      while (next <= total && inFlight() < 16)
        alice.send({ type: 'send', id: `load-${next}`, to: 'bob', body: { load: next++ } });
      await new Promise((r) => setTimeout(r, 2));
    }
    await server.stop('SIGKILL');
    const acknowledged = alice.frames.filter(
      (f) => f.type === 'sent' && String(f.id).startsWith('load-'),
    );
    assert.ok(
      acknowledged.length < next - 1 || next <= total,
      'killed with sends still unanswered or to come',
    );

    server = await startServer(env); // the same PORT and DATA_DIR
    // The client retries every send that got no `sent`, then sends the rest.
    const again = await Client.open(server.url, tokens.get('alice')!, 'laptop');
    const answered = new Set(acknowledged.map((f) => f.id));
    for (let i = 1; i <= total; i++) {
      if (!answered.has(`load-${i}`))
        again.send({ type: 'send', id: `load-${i}`, to: 'bob', body: { load: i } });
    }
    await again
      .next((f) => f.type === 'sent' && f.id === `load-${total}`, 30_000)
      .catch((error) => {
        const kinds = again.frames.map((f) => `${f.type}${f.code ? `:${f.code}` : ''}`);
        throw new Error(
          `${(error as Error).message}; the retrying client got ${kinds.length} frames: ${[...new Set(kinds)].join(', ')} ${JSON.stringify(again.frames.find((f) => f.type === 'error'))}`,
        );
      });
    await eventually(
      () => again.frames.filter((f) => f.type === 'sent').length === total - answered.size,
      30_000,
      'every retry answered',
    );
    const bob = await Client.open(server.url, tokens.get('bob')!, 'watch'); // first time: every kept entry
    await eventually(
      () =>
        bob.frames.filter(
          (f) => f.type === 'message' && (f.body as { load?: number }).load !== undefined,
        ).length >= total,
      30_000,
      'bob to receive the load',
    );
    await new Promise((r) => setTimeout(r, 500)); // anything extra would show up now
    const loads = bob.frames.filter(
      (f) => f.type === 'message' && (f.body as { load?: number }).load !== undefined,
    );
    const numbers = loads.map((f) => (f.body as { load: number }).load);
    assert.equal(new Set(numbers).size, numbers.length, 'no message twice in the inbox');
    assert.equal(numbers.length, total, 'every message, acknowledged or retried, once');
    const seqs = bob.entries().map((f) => f.seq as number);
    assert.deepEqual(
      seqs,
      Array.from({ length: seqs.length }, (_, i) => seqs[0]! + i),
      'gapless seq',
    );
    // Messages acknowledged before the crash appear in the order they were sent.
    const acknowledgedOrder = numbers.filter((n) => answered.has(`load-${n}`));
    assert.deepEqual(
      acknowledgedOrder,
      [...acknowledgedOrder].sort((a, b) => a - b),
    );
    await again.close();
    await bob.close();
    await alice.close();
  });
});
