/**
 * The users actor on the runtime and the embedded log, fed the records gateways would write:
 * inbox entries numbered per user, delivered to synced sessions in order, a retried copy
 * dropped, and an ack answered by a `delivered` receipt in the sender's inbox.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { EmbeddedSchemaRegistry } from '../../schemas/registry/embedded.ts';
import { Codecs, type TopicCodec } from '../../schemas/codec.ts';
import { avroTypeOptions, branchOf, loadSchema } from '../../schemas/avro.ts';
import { deliveriesTopic, topics } from '../../schemas/topics.ts';
import type { Delivery, InboxCommand } from '../../schemas/types.generated.ts';
import { bootstrap } from '../../app/bootstrap.ts';
import { StateDb } from '../../state/state-db.ts';
import { StreamsRuntime } from '../../processors/runtime/runtime.ts';
import { usersTopology, USERS_APPLICATION } from '../../processors/users/topology.ts';
import { FROM_ACK } from '../../processors/users/decider.ts';
import { eventually } from '../support/log-helpers.ts';

describe('users actor on the runtime (embedded log)', function () {
  this.timeout(30_000);
  let dir: string;
  let log: EmbeddedLog;
  let stateDb: StateDb;
  let runtime: StreamsRuntime;
  let codecs: Awaited<ReturnType<typeof bootstrap>>;
  let deliveries: TopicCodec<Delivery>;
  const T = Date.now();
  let liveGateways = new Set(['gw1']);
  const gatewayStarts = new Map<string, number>();

  before(async () => {
    dir = await mkdtemp(join(tmpdir(), 'kchat-users-'));
    log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    const registry = await EmbeddedSchemaRegistry.open(log);
    codecs = await bootstrap(log, registry, 12);
    await log.admin.createTopics([{ topic: deliveriesTopic('gw1'), partitions: 12 }]);
    deliveries = await new Codecs(registry).forTopic<Delivery>(
      deliveriesTopic('gw1'),
      loadSchema('Delivery'),
      avroTypeOptions(),
    );
    stateDb = await StateDb.open(join(dir, 'state'));
    runtime = new StreamsRuntime(
      usersTopology({
        codecs: {
          connections: codecs[topics.connections],
          messages: codecs[topics.messages],
          userCommands: codecs[topics.userCommands],
          deliveries,
          push: codecs[topics.push],
          inboxEntries: codecs[topics.inboxEntries],
        },
        liveGateways: () => liveGateways,
        gatewayStartedAt: (gatewayId) => gatewayStarts.get(gatewayId),
      }),
      { applicationId: USERS_APPLICATION, log, stateDb, commitIntervalMs: 20 },
    );
    await runtime.start();
  });

  after(async () => {
    await runtime.close();
    await stateDb.close();
    await log.close();
    await rm(dir, { recursive: true, force: true });
  });

  async function produce(topic: string, key: string, value: unknown) {
    const producer = await log.producer();
    await producer.send([
      {
        topic,
        key: Buffer.from(key),
        value: (codecs as Record<string, TopicCodec<unknown>>)[topic]!.encode(value),
      },
    ]);
    await producer.close();
  }

  async function readAll<V>(topic: string, codec: TopicCodec<V>): Promise<V[]> {
    const marks = await log.admin.watermarks(topic);
    const values: V[] = [];
    for await (const batch of log.readPartitions(
      topic,
      marks.map((m) => ({ partition: m.partition, from: 0 })),
    )) {
      for (const r of batch.records) values.push(await codec.decode(r.value!));
    }
    return values;
  }

  const seqsDelivered = async (userId: string) =>
    (await readAll(deliveriesTopic('gw1'), deliveries))
      .filter((d) => d.userId === userId)
      .map((d) => branchOf(d.frame))
      .flatMap((f) => (f.name === 'chat.v1.InboxEntry' ? [f.value.seq] : []));

  const copy = (owner: string, messageId: string): InboxCommand => ({
    userId: owner,
    entry: {
      'chat.v1.MessageCopy': {
        messageId,
        from: 'alice',
        to: 'bob',
        group: null,
        body: '{"text":"hi"}',
        sentAt: T,
      },
    },
  });

  /** A phone of the user connects on gw1 as connectionId. */
  const connect = (userId: string, connectionId: string) =>
    produce(topics.connections, userId, {
      userId,
      deviceId: 'phone',
      gatewayId: 'gw1',
      connectionId,
      state: 'CONNECTED',
      at: T,
    });
  /** The phone on connectionId asks for everything it has not acked. */
  const sync = (userId: string, connectionId: string) =>
    produce(topics.userCommands, userId, {
      userId,
      at: T,
      command: { 'chat.v1.Sync': { deviceId: 'phone', connectionId, after: FROM_ACK } },
    });

  it('numbers, delivers after the sync, drops a retry, and turns an ack into a receipt for the sender', async () => {
    await connect('bob', 'c1');
    await produce(topics.messages, 'bob', copy('bob', 'm1'));
    await produce(topics.messages, 'alice', copy('alice', 'm1'));
    await sync('bob', 'c1');
    await produce(topics.messages, 'bob', copy('bob', 'm2'));
    await produce(topics.messages, 'bob', copy('bob', 'm1')); // a retried send

    const bobDeliveries = () => seqsDelivered('bob');
    await eventually(
      async () => (await bobDeliveries()).length >= 2,
      20_000,
      'bob to get his entries',
    );
    assert.deepEqual(await bobDeliveries(), [1, 2], 'seq order, the retry dropped');

    await produce(topics.userCommands, 'bob', {
      userId: 'bob',
      at: T,
      command: { 'chat.v1.Ack': { deviceId: 'phone', upTo: 2 } },
    });
    const aliceEntries = async () =>
      (await readAll(topics.inboxEntries, codecs[topics.inboxEntries])).filter(
        (e) => e.userId === 'alice',
      );
    await eventually(
      async () => (await aliceEntries()).length === 3,
      20_000,
      "alice's two receipts",
    );
    const entries = await aliceEntries();
    assert.deepEqual(
      entries.map((e) => e.seq),
      [1, 2, 3],
    );
    assert.deepEqual(
      entries.slice(1).map((e) => {
        const { name, value } = branchOf(e.entry);
        return name === 'chat.v1.Receipt' ? [value.messageId, value.by, value.status] : name;
      }),
      [
        ['m1', 'bob', 'delivered'],
        ['m2', 'bob', 'delivered'],
      ],
    );
  });

  it('sends a session what it missed while its gateway counted as silent, once the gateway is heard again', async () => {
    await connect('carol', 'c7');
    await sync('carol', 'c7');
    await produce(topics.messages, 'carol', copy('carol', 'm1'));
    await eventually(async () => (await seqsDelivered('carol')).length === 1, 20_000, 'm1');

    liveGateways = new Set(); // gw1's heartbeats held up
    await produce(topics.messages, 'carol', copy('carol', 'm2'));
    await produce(topics.messages, 'carol', copy('carol', 'm3'));
    const carolEntries = async () =>
      (await readAll(topics.inboxEntries, codecs[topics.inboxEntries])).filter(
        (e) => e.userId === 'carol',
      ).length;
    await eventually(async () => (await carolEntries()) === 3, 20_000, 'm2 and m3 appended');
    await new Promise((resolve) => setTimeout(resolve, 1500)); // a catch-up tick while silent
    assert.deepEqual(await seqsDelivered('carol'), [1], 'nothing sent to a silent gateway');

    liveGateways = new Set(['gw1']);
    await eventually(async () => (await seqsDelivered('carol')).length === 3, 20_000, 'catch-up');
    assert.deepEqual(await seqsDelivered('carol'), [1, 2, 3]);
  });

  it('closes the sessions a gateway held before it restarted under the same id: their user counts as offline', async () => {
    await connect('erin', 'c5');
    await sync('erin', 'c5');
    await produce(topics.userCommands, 'erin', {
      userId: 'erin',
      at: T,
      command: {
        'chat.v1.DeviceRegistered': { deviceId: 'phone', pushToken: 'tok-1', platform: 'android' },
      },
    });
    await produce(topics.messages, 'erin', copy('erin', 'm1'));
    await eventually(async () => (await seqsDelivered('erin')).length === 1, 20_000, 'm1');
    const pushesForErin = async () =>
      (await readAll(topics.push, codecs[topics.push])).filter((p) => p.userId === 'erin');
    assert.equal((await pushesForErin()).length, 0, 'online: no push');

    gatewayStarts.set('gw1', T + 1000); // gw1 crashed and came back: c5 is gone
    await new Promise((resolve) => setTimeout(resolve, 1500)); // a tick of the actor
    await produce(topics.messages, 'erin', copy('erin', 'm2'));
    await eventually(async () => (await pushesForErin()).length === 1, 20_000, 'a push for m2');
    assert.deepEqual(await seqsDelivered('erin'), [1], 'nothing sent to the closed session');
  });
});
