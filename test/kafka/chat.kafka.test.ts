/**
 * The chat on the distributed shape: two `npm start` processes on Apache Kafka and a
 * Confluent-compatible registry, each with its own gateway and data directory, sharing the users
 * actor's tasks. One is killed with SIGKILL: its tasks move to the other, restored from their
 * changelogs, and a user who reconnects there gets everything above its ack, in order. Then a
 * gateway killed and started again under the same GATEWAY_ID: the users actor closes the
 * sessions of its earlier run. Then a replay larger than a connection's send buffer, in parts
 * asked for by a gateway process of a users processor in another process.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { KafkaLog } from '../../log/kafka/kafka-log.ts';
import { partitionFor } from '../../log/partitioner.ts';
import { topics } from '../../schemas/topics.ts';
import { USERS_APPLICATION } from '../../processors/users/topology.ts';
import { KafkaDeployment } from '../support/process.ts';
import { Client, metric, register, type Frame } from '../support/chat-client.ts';
import { eventually } from '../support/log-helpers.ts';

/** Sends until the gateway knows the recipient (its accounts table lags registration). */
async function sendOnceKnown(client: Client, to: string, body: unknown): Promise<Frame> {
  for (let attempt = 0; ; attempt++) {
    const id = `known-${attempt}-${randomBytes(3).toString('hex')}`;
    client.send({ type: 'send', id, to, body });
    const answer = await client.next(
      (f) => f.id === id && (f.type === 'sent' || f.type === 'error'),
    );
    if (answer.type === 'sent') return answer;
    assert.ok(attempt < 50, `${to} stayed unknown: ${JSON.stringify(answer)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe('chat on Kafka: two processes, one killed', function () {
  this.timeout(240_000);
  const deployment = new KafkaDeployment();
  const run = randomBytes(3).toString('hex');
  const alice = `alice-${run}`;
  const bob = `bob-${run}`;
  const start = (name: string) => deployment.start(name);
  after(() => deployment.stopAll());

  it('delivers across gateways, and after a process dies, through the other one', async () => {
    const a = await start('a');
    const b = await start('b');
    const tokens = new Map<string, string>();
    for (const username of [alice, bob]) tokens.set(username, await register(a.url, username));
    const aliceOnA = await Client.open(a.url, tokens.get(alice)!, 'phone');
    const bobOnB = await Client.open(b.url, tokens.get(bob)!, 'phone'); // a token A signed

    const sent = await sendOnceKnown(aliceOnA, bob, { text: 'across' });
    const received = await bobOnB.next(
      (f) => f.type === 'message' && f.messageId === sent.messageId,
      60_000,
    );
    assert.equal(received.seq, 1);
    bobOnB.send({ type: 'ack', upTo: 1 });
    const receipt = await aliceOnA.next((f) => f.type === 'receipt', 60_000);
    assert.equal(receipt.by, bob);

    await b.stop('SIGKILL');
    for (let i = 1; i <= 3; i++)
      aliceOnA.send({ type: 'send', id: `after-${i}`, to: bob, body: { n: i } });
    await aliceOnA.next((f) => f.type === 'sent' && f.id === 'after-3', 60_000);

    const bobOnA = await Client.open(a.url, tokens.get(bob)!, 'phone');
    await bobOnA.next((f) => f.type === 'message' && (f.body as { n?: number }).n === 3, 120_000);
    assert.deepEqual(
      bobOnA.entries().map((f) => [f.seq, (f.body as { n: number }).n]),
      [
        [2, 1],
        [3, 2],
        [4, 3],
      ],
      'above the ack, in order, each once',
    );
    await aliceOnA.close();
    await bobOnA.close();
  });
});

describe('chat on Kafka: a gateway killed and started again under the same id', function () {
  this.timeout(240_000);
  const deployment = new KafkaDeployment();
  const run = randomBytes(3).toString('hex');
  const carol = `carol-${run}`;
  const dave = `dave-${run}`;
  after(() => deployment.stopAll());

  /** Sessions closed as left over from an earlier run of their gateway, over every process. */
  const staleSessionsClosed = async () => {
    let total = 0;
    for (const p of deployment.processes.values()) {
      if (p.child.exitCode !== null || p.child.signalCode !== null) continue;
      total += await metric(p.url, 'kchat_users_stale_sessions_closed_total');
    }
    return total;
  };

  it("closes the sessions of the gateway's earlier run, and serves again", async () => {
    const hub = await deployment.start('hub'); // every role
    let edge = await deployment.start('edge', ['gateway']);
    const carolToken = await register(hub.url, carol);
    const daveToken = await register(hub.url, dave);
    const carolOnHub = await Client.open(hub.url, carolToken, 'phone');
    const daveOnEdge = await Client.open(edge.url, daveToken, 'phone');
    const first = await sendOnceKnown(carolOnHub, dave, { n: 1 });
    await daveOnEdge.next((f) => f.type === 'message' && f.messageId === first.messageId, 60_000);
    daveOnEdge.send({ type: 'ack', upTo: 1 });
    await carolOnHub.next((f) => f.type === 'receipt' && f.messageId === first.messageId, 60_000);
    assert.equal(await staleSessionsClosed(), 0);

    // No DISCONNECTED for dave's connection will ever come, and the gateway does not go silent.
    await edge.stop('SIGKILL');
    edge = await deployment.start('edge', ['gateway']);
    await eventually(
      async () => (await staleSessionsClosed()) >= 1,
      60_000,
      "the users actor to close dave's session of the earlier run",
    );

    const second = await sendOnceKnown(carolOnHub, dave, { n: 2 });
    const daveAgain = await Client.open(edge.url, daveToken, 'phone');
    await daveAgain.next((f) => f.type === 'message' && f.messageId === second.messageId, 60_000);
    assert.deepEqual(
      daveAgain.entries().map((f) => [f.seq, (f.body as { n: number }).n]),
      [[2, 2]],
      'above the ack, once',
    );
    await carolOnHub.close();
    await daveAgain.close();
  });
});

/**
 * Waits until the users actor has processed every message copy in `userId`'s partition: its
 * committed offset there reaches the end. (Gateways write copies without transactions; were a
 * transaction's commit marker last in the partition, the offset would stop one short of it.)
 */
async function inboxCaughtUp(userId: string): Promise<void> {
  const log = new KafkaLog({ brokers: process.env.KAFKA_BROKERS!.split(','), clientId: 'probe' });
  try {
    const marks = await log.admin.watermarks(topics.messages);
    const partition = partitionFor(Buffer.from(userId, 'utf8'), marks.length);
    const end = marks.find((m) => m.partition === partition)!.high;
    await eventually(
      async () => {
        const committed = await log.admin.committedOffsets(USERS_APPLICATION, topics.messages);
        return (committed.find((c) => c.partition === partition)?.offset ?? -1) >= end;
      },
      60_000,
      `the users actor to append every copy for ${userId}`,
    );
  } finally {
    await log.close();
  }
}

describe('chat on Kafka: a replay larger than the send buffer, in parts', function () {
  this.timeout(240_000);
  const deployment = new KafkaDeployment();
  const run = randomBytes(3).toString('hex');
  const erin = `erin-${run}`;
  const frank = `frank-${run}`;
  after(() => deployment.stopAll());

  it('gives a device back after a long absence every entry, in order, on an open connection', async () => {
    // Sends faster than the default 50 a second a connection may.
    const env = { RATE_LIMIT_PER_S: '5000' };
    const hub = await deployment.start('hub', [], env); // every role
    const edge = await deployment.start('edge', ['gateway'], env);
    const erinToken = await register(hub.url, erin);
    const frankToken = await register(hub.url, frank);
    await (await Client.open(edge.url, frankToken, 'phone')).close();
    const erinOnHub = await Client.open(hub.url, erinToken, 'phone');
    await sendOnceKnown(erinOnHub, frank, { n: 1 });
    // 320 messages of 8 KB more: two and a half times what a gateway buffers for a connection.
    const count = 321;
    const text = 'x'.repeat(8_000);
    for (let n = 2; n <= count; n++) {
      erinOnHub.send({ type: 'send', id: `away-${n}`, to: frank, body: { n, text } });
      if (n % 40 === 0) await erinOnHub.next((f) => f.type === 'sent' && f.id === `away-${n}`);
    }
    await erinOnHub.next((f) => f.type === 'sent' && f.id === `away-${count}`, 60_000);
    // `sent` says the copies are in the log, not that the users actor has appended them: until
    // it has, frank's CONNECTED could come first (another topic) and every entry go out live.
    await inboxCaughtUp(frank);
    const frankOnEdge = await Client.open(edge.url, frankToken, 'phone');
    // A client on a slow link: it reads nothing for a while, then everything.
    const socket = (frankOnEdge.ws as unknown as { _socket: { pause(): void; resume(): void } })
      ._socket;
    socket.pause();
    await new Promise((resolve) => setTimeout(resolve, 3_000));
    socket.resume();
    const entries = await frankOnEdge.receive(count, 120_000);
    assert.equal(frankOnEdge.ws.readyState, frankOnEdge.ws.OPEN, 'the connection stays open');
    assert.deepEqual(
      entries.map((f) => [f.seq, (f.body as { n: number }).n]),
      Array.from({ length: count }, (_, i) => [i + 1, i + 1]),
      'every entry once, in order',
    );
    // In parts of at most 256 KiB, each asked for by the edge gateway through the log.
    const asked = await metric(edge.url, 'kchat_gateway_replay_parts_asked_total');
    assert.ok(asked >= 5, `${asked} parts asked for`);
    await erinOnHub.close();
    await frankOnEdge.close();
  });
});
