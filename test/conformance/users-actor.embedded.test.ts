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
import { bootstrap, usersCodecs } from '../../app/bootstrap.ts';
import { StateDb } from '../../state/state-db.ts';
import { changelogTopic, StreamsRuntime } from '../../processors/runtime/runtime.ts';
import {
  usersTopology,
  USERS_APPLICATION,
  type UsersOptions,
} from '../../processors/users/topology.ts';
import { FROM_ACK, RECEIPTED_PER_COMMAND } from '../../processors/users/decider.ts';
import { eventually } from '../support/log-helpers.ts';
import { partitionFor } from '../../log/partitioner.ts';

/** The users actor on its own embedded log, state database and runtime. */
type ActorOptions = Pick<
  UsersOptions,
  | 'liveGateways'
  | 'gatewayStartedAt'
  | 'retentionMs'
  | 'prune'
  | 'gatewayUsersPerTick'
  | 'onStaleSessions'
>;

class Actor {
  private runtime!: StreamsRuntime;

  private constructor(
    readonly dir: string,
    readonly log: EmbeddedLog,
    readonly stateDb: StateDb,
    readonly codecs: Awaited<ReturnType<typeof bootstrap>>,
    readonly deliveries: TopicCodec<Delivery>,
    private readonly options: ActorOptions,
  ) {}

  static async open(options: ActorOptions): Promise<Actor> {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-users-'));
    const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    const registry = await EmbeddedSchemaRegistry.open(log);
    const codecs = await bootstrap(log, registry, 12);
    await log.admin.createTopics([{ topic: deliveriesTopic('gw1'), partitions: 12 }]);
    const deliveries = await new Codecs(registry).forTopic<Delivery>(
      deliveriesTopic('gw1'),
      loadSchema('Delivery'),
      avroTypeOptions(),
    );
    const stateDb = await StateDb.open(join(dir, 'state'));
    const actor = new Actor(dir, log, stateDb, codecs, deliveries, options);
    await actor.start();
    return actor;
  }

  /** Starts the runtime: its tasks open, restored from their stores and changelogs. */
  async start(): Promise<void> {
    const { codecs, deliveries } = this;
    this.runtime = new StreamsRuntime(
      usersTopology({
        codecs: usersCodecs(codecs, deliveries),
        ...this.options,
      }),
      {
        applicationId: USERS_APPLICATION,
        log: this.log,
        stateDb: this.stateDb,
        commitIntervalMs: 20,
      },
    );
    await this.runtime.start();
  }

  /** Stops the runtime (its tasks commit and close), keeping the log and the stores. */
  stop(): Promise<void> {
    return this.runtime.close();
  }

  async close(): Promise<void> {
    await this.stop();
    await this.stateDb.close();
    await this.log.close();
    await rm(this.dir, { recursive: true, force: true });
  }

  async produce(topic: string, key: string, ...values: unknown[]): Promise<void> {
    const codec = (this.codecs as Record<string, TopicCodec<unknown>>)[topic]!;
    const producer = await this.log.producer();
    await producer.send(
      values.map((value) => ({ topic, key: Buffer.from(key), value: codec.encode(value) })),
    );
    await producer.close();
  }

  /** The committed keys of one of the actor's stores, over every partition. */
  async committedKeys(store: string): Promise<string[]> {
    const keys: string[] = [];
    const name = changelogTopic(USERS_APPLICATION, store);
    for (let p = 0; p < 12; p++)
      keys.push(...(await this.stateDb.range(name, p, '')).map(([key]) => key));
    return keys;
  }

  async readAll<V>(topic: string, codec: TopicCodec<V>): Promise<V[]> {
    const marks = await this.log.admin.watermarks(topic);
    const values: V[] = [];
    for await (const batch of this.log.readPartitions(
      topic,
      marks.map((m) => ({ partition: m.partition, from: 0 })),
    )) {
      for (const r of batch.records) values.push(await codec.decode(r.value!));
    }
    return values;
  }
}

const T = Date.now();
const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

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

describe('users actor on the runtime (embedded log)', function () {
  this.timeout(30_000);
  let actor: Actor;
  let codecs: Actor['codecs'];
  let liveGateways = new Set(['gw1']);
  const gatewayStarts = new Map<string, number>();

  before(async () => {
    actor = await Actor.open({
      liveGateways: () => liveGateways,
      gatewayStartedAt: (gatewayId) => gatewayStarts.get(gatewayId),
    });
    codecs = actor.codecs;
  });
  after(() => actor.close());

  const produce = (topic: string, key: string, value: unknown) => actor.produce(topic, key, value);
  const readAll = <V>(topic: string, codec: TopicCodec<V>) => actor.readAll(topic, codec);

  const seqsDelivered = async (userId: string) =>
    (await readAll(deliveriesTopic('gw1'), actor.deliveries))
      .filter((d) => d.userId === userId)
      .map((d) => branchOf(d.frame))
      .flatMap((f) => (f.name === 'chat.v1.InboxEntry' ? [f.value.seq] : []));

  /** A phone of the user connects on gw1 as connectionId. */
  const connect = (userId: string, connectionId: string, at = T) =>
    produce(topics.connections, userId, {
      userId,
      deviceId: 'phone',
      gatewayId: 'gw1',
      connectionId,
      state: 'CONNECTED',
      at,
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

  it('owes the receipts of an ack over more messages than one command owes, through its own loop', async () => {
    const count = RECEIPTED_PER_COMMAND + 76;
    const actorProducer = await actor.log.producer();
    await actorProducer.send(
      Array.from({ length: count }, (_, i) => ({
        topic: topics.messages,
        key: Buffer.from('ivy'),
        value: codecs[topics.messages].encode({
          ...copy('ivy', `r${i + 1}`),
          userId: 'ivy',
        }),
      })),
    );
    await actorProducer.close();
    // Every copy in ivy's inbox before the ack: it cannot cover what is not there yet.
    await eventually(
      async () =>
        (await readAll(topics.inboxEntries, codecs[topics.inboxEntries])).filter(
          (e) => e.userId === 'ivy',
        ).length === count,
      20_000,
      `ivy's ${count} entries`,
    );
    await produce(topics.userCommands, 'ivy', {
      userId: 'ivy',
      at: T,
      command: { 'chat.v1.Ack': { deviceId: 'phone', upTo: count } },
    });
    const receiptsByIvy = async () =>
      (await readAll(topics.inboxEntries, codecs[topics.inboxEntries])).flatMap((e) => {
        const { name, value } = branchOf(e.entry);
        return e.userId === 'alice' && name === 'chat.v1.Receipt' && value.by === 'ivy'
          ? [value.messageId]
          : [];
      });
    await eventually(
      async () => (await receiptsByIvy()).length >= count,
      20_000,
      `alice's ${count} receipts`,
    );
    await new Promise((resolve) => setTimeout(resolve, 200));
    const receipts = await receiptsByIvy();
    assert.equal(receipts.length, count, 'each once');
    assert.equal(new Set(receipts).size, count);
    const acks = (await readAll(topics.userCommands, codecs[topics.userCommands])).filter(
      (c) => c.userId === 'ivy' && 'chat.v1.Ack' in c.command,
    );
    assert.deepEqual(
      // Decoded records are avsc class instances: compared as plain objects.
      acks.map((c) => ({ ...(c.command as { 'chat.v1.Ack': object })['chat.v1.Ack'] })),
      [
        { deviceId: 'phone', upTo: count, continued: false },
        { deviceId: 'phone', upTo: count, continued: true },
      ],
      "the device's ack, and the actor's own continued ack that went on",
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

  it('sends a session what it missed in a silence of its gateway shorter than a tick', async () => {
    await new Promise((resolve) => setTimeout(resolve, 1100)); // past the first tick's look at all
    await connect('hugo', 'c9');
    await sync('hugo', 'c9');
    await produce(topics.messages, 'hugo', copy('hugo', 'm1'));
    await eventually(async () => (await seqsDelivered('hugo')).length === 1, 20_000, 'm1');

    liveGateways = new Set(); // gw1 silent, but only until m2 is appended
    await produce(topics.messages, 'hugo', copy('hugo', 'm2'));
    const appended = async () =>
      (await readAll(topics.inboxEntries, codecs[topics.inboxEntries])).some(
        (e) => e.userId === 'hugo' && e.seq === 2,
      );
    await eventually(appended, 20_000, 'm2 appended');
    liveGateways = new Set(['gw1']);
    await eventually(async () => (await seqsDelivered('hugo')).length === 2, 20_000, 'catch-up');
    assert.deepEqual(await seqsDelivered('hugo'), [1, 2]);
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
    const erinOnGw1 = 'gw1\u0000erin';
    await eventually(
      async () => (await actor.committedKeys('sessions')).includes(erinOnGw1),
      10_000,
      "erin's session in the sessions store",
    );

    gatewayStarts.set('gw1', T + 1000); // gw1 crashed and came back: c5 is gone
    await new Promise((resolve) => setTimeout(resolve, 1500)); // a tick of the actor
    await produce(topics.messages, 'erin', copy('erin', 'm2'));
    await eventually(async () => (await pushesForErin()).length === 1, 20_000, 'a push for m2');
    assert.deepEqual(await seqsDelivered('erin'), [1], 'nothing sent to the closed session');
    await eventually(
      async () => !(await actor.committedKeys('sessions')).includes(erinOnGw1),
      10_000,
      "erin's closed session out of the sessions store",
    );
  });

  it('opens no session for a CONNECTED of an earlier run of its gateway that comes after the restart', async () => {
    gatewayStarts.set('gw1', T + 5000);
    await new Promise((resolve) => setTimeout(resolve, 1500)); // the actor notices the restart
    await produce(topics.userCommands, 'gina', {
      userId: 'gina',
      at: T,
      command: {
        'chat.v1.DeviceRegistered': { deviceId: 'phone', pushToken: 'tok-2', platform: 'android' },
      },
    });
    await connect('gina', 'c8', T + 4000); // recorded by the run before, read only now
    await sync('gina', 'c8');
    await new Promise((resolve) => setTimeout(resolve, 1500)); // the actor reads both, and ticks
    await produce(topics.messages, 'gina', copy('gina', 'm1'));
    const pushesForGina = async () =>
      (await readAll(topics.push, codecs[topics.push])).filter((p) => p.userId === 'gina');
    await eventually(async () => (await pushesForGina()).length === 1, 20_000, 'offline: a push');
    assert.deepEqual(await seqsDelivered('gina'), [], 'nothing sent to the gone connection');
    assert.ok(!(await actor.committedKeys('sessions')).includes('gw1\u0000gina'));
  });

  it('closes, as its tasks open, the sessions of a gateway that restarted while they were closed', async () => {
    gatewayStarts.set('gw1', T + 1000);
    await connect('frank', 'c6', T + 2000); // in gw1's current run
    await sync('frank', 'c6');
    await produce(topics.messages, 'frank', copy('frank', 'm1'));
    await eventually(async () => (await seqsDelivered('frank')).length === 1, 20_000, 'm1');
    const frankOnGw1 = 'gw1\u0000frank';
    await eventually(
      async () => (await actor.committedKeys('sessions')).includes(frankOnGw1),
      10_000,
      "frank's session in the sessions store",
    );

    await actor.stop();
    gatewayStarts.set('gw1', T + 3000); // gw1 crashed and came back meanwhile
    await actor.start();
    await eventually(
      async () => !(await actor.committedKeys('sessions')).includes(frankOnGw1),
      20_000,
      "frank's session closed once the tasks opened",
    );
  });
});

describe('users actor looking at a restarted gateway (embedded log)', function () {
  this.timeout(30_000);

  it("closes its users' sessions at most 2 users a tick (gatewayUsersPerTick), until every one is", async () => {
    const gatewayStarts = new Map<string, number>([['gw1', T]]);
    const closedPerTick: number[] = [];
    const actor = await Actor.open({
      liveGateways: () => new Set(['gw1']),
      gatewayStartedAt: (gatewayId) => gatewayStarts.get(gatewayId),
      gatewayUsersPerTick: 2,
      onStaleSessions: (closed) => closedPerTick.push(closed),
    });
    try {
      // Five users of one partition: one task holds them all.
      const users = Array.from({ length: 200 }, (_, i) => `u${i}`)
        .filter((userId) => partitionFor(Buffer.from(userId), 12) === 0)
        .slice(0, 5);
      assert.equal(users.length, 5);
      for (const userId of users)
        await actor.produce(topics.connections, userId, {
          userId,
          deviceId: 'phone',
          gatewayId: 'gw1',
          connectionId: `c-${userId}`,
          state: 'CONNECTED',
          at: T + 1,
        });
      const onGw1 = async () =>
        (await actor.committedKeys('sessions')).filter((key) => key.startsWith('gw1\u0000'));
      await eventually(async () => (await onGw1()).length === 5, 20_000, 'five sessions on gw1');

      gatewayStarts.set('gw1', T + 1000); // gw1 crashed and came back
      await eventually(async () => (await onGw1()).length === 0, 20_000, 'every session closed');
      assert.equal(
        closedPerTick.reduce((a, b) => a + b, 0),
        5,
      );
      assert.ok(
        closedPerTick.every((closed) => closed <= 2),
        `closed per tick: ${closedPerTick.join(', ')}`,
      );
    } finally {
      await actor.close();
    }
  });
});

/**
 * A tick that fails partway: the task rolls its store writes back, and the walks must go back
 * with them. gw2 restarts; ua's and uc's sessions are of its earlier run (to close), ub's of
 * the new one and behind (to catch up), and looking up gw2's deliveries topic fails, at ub:
 * never, once, or for good (then ub is left out of the ticks, and the walk goes on past it).
 */
async function gatewayRestartWatched(failing: 'never' | 'once' | 'always') {
  let live = new Set(['gw1', 'gw2']);
  const starts = new Map<string, number>([['gw2', T]]);
  let closed = 0;
  const actor = await Actor.open({
    liveGateways: () => live,
    gatewayStartedAt: (gatewayId) => starts.get(gatewayId),
    onStaleSessions: (count) => void (closed += count),
  });
  try {
    const { log } = actor;
    await log.admin.createTopics([{ topic: deliveriesTopic('gw2'), partitions: 12 }]);
    let armed = false;
    const describeTopic = log.admin.describeTopic.bind(log.admin);
    log.admin.describeTopic = async (topic: string) => {
      if (armed && topic === deliveriesTopic('gw2')) {
        if (failing === 'once') armed = false;
        throw new Error('request timed out'); // a broker's hiccup, on Kafka; or an ACL, for good
      }
      return describeTopic(topic);
    };
    // Three users of one task, in this order in the sessions store.
    const [ua, ub, uc] = Array.from({ length: 600 }, (_, i) => `user${i}`)
      .filter((u) => partitionFor(Buffer.from(u), 12) === 3)
      .sort() as [string, string, string];
    for (const [userId, at] of [
      [ua, T + 1], // of gw2's run that will turn out to be over
      [ub, T + 3000], // of its next run
      [uc, T + 1],
    ] as const) {
      const connectionId = `c-${userId}`;
      await actor.produce(topics.connections, userId, {
        ...{ userId, deviceId: 'phone', gatewayId: 'gw2', connectionId, state: 'CONNECTED', at },
      });
      await actor.produce(topics.userCommands, userId, {
        userId,
        at: T,
        command: { 'chat.v1.Sync': { deviceId: 'phone', connectionId, after: FROM_ACK } },
      });
    }
    const onGw2 = async () =>
      (await actor.committedKeys('sessions')).filter((key) => key.startsWith('gw2\u0000'));
    await eventually(async () => (await onGw2()).length === 3, 10_000, 'three sessions stored');
    await sleep(1_200); // past the first tick's look at every gateway
    live = new Set(['gw1']); // gw2 silent while a message for ub comes
    await actor.produce(topics.messages, ub, { ...copy(ub, 'm1'), userId: ub });
    await sleep(1_500);
    armed = failing !== 'never';
    starts.set('gw2', T + 2_000); // gw2 restarted: ua's and uc's connections are gone
    live = new Set(['gw1', 'gw2']);
    const caughtUp = async () =>
      (await actor.readAll(deliveriesTopic('gw2'), actor.deliveries)).some(
        (d) => d.userId === ub && branchOf(d.frame).name === 'chat.v1.InboxEntry',
      );
    if (failing === 'always')
      await sleep(6_000); // past three failed ticks, and a few more
    else await eventually(caughtUp, 10_000, 'ub caught up');
    await sleep(2_500); // a couple more ticks
    return { left: (await onGw2()).map((key) => key.slice(4)), closed, ub };
  } finally {
    await actor.close();
  }
}

describe('users actor: a gateway watch tick that fails partway', function () {
  this.timeout(40_000);

  for (const failing of ['never', 'once', 'always'] as const)
    it(`closes the stale sessions of an earlier run when the tick fails at a later user ${failing}`, async () => {
      const { left, closed, ub } = await gatewayRestartWatched(failing);
      assert.deepEqual({ left, closed }, { left: [ub], closed: 2 });
    });
});

describe('users actor pruning an inbox with more expired entries than one visit prunes', function () {
  this.timeout(30_000);
  let actor: Actor;
  before(async () => {
    actor = await Actor.open({
      liveGateways: () => new Set(['gw1']),
      retentionMs: 2_000,
      // The walk goes round once an hour: only the revisits can finish this inbox in the test.
      prune: {
        everyMs: 3_600_000,
        dedupEveryMs: 3_600_000,
        tickMs: 50,
        usersPerTick: 100,
        dedupKeysPerTick: 100,
      },
    });
  });
  after(() => actor.close());

  it('visits it again at the next ticks until every expired entry is gone', async () => {
    const count = 3_000; // a visit prunes at most 16 slices of 64
    await actor.produce(
      topics.messages,
      'busy',
      ...Array.from({ length: count }, (_, i) => copy('busy', `m${i}`)),
    );
    const kept = async () =>
      (await actor.committedKeys('inbox')).filter((k) => k.startsWith('busy/')).length;
    await eventually(async () => (await kept()) === count, 10_000, 'every entry');
    // Once they have expired, a new run of the task walks its users at once, then not for an
    // hour.
    await new Promise((resolve) => setTimeout(resolve, 2_000));
    await actor.stop();
    await actor.start();
    await eventually(async () => (await kept()) === 0, 15_000, 'every expired entry pruned');
  });
});

describe('users actor keeping dedup keys', function () {
  this.timeout(30_000);
  let actor: Actor;
  before(async () => {
    actor = await Actor.open({
      liveGateways: () => new Set(['gw1']),
      retentionMs: 1_000,
      // The dedup walk goes round often, the inbox walk once an hour: they are out of phase.
      prune: {
        everyMs: 3_600_000,
        dedupEveryMs: 100,
        tickMs: 50,
        usersPerTick: 100,
        dedupKeysPerTick: 100,
      },
    });
  });
  after(() => actor.close());

  it('keeps a dedup key past retention while the inbox holds its entry, so a retry is dropped', async () => {
    await actor.produce(topics.messages, 'kept', copy('kept', 'm1'));
    const entries = async () =>
      (await actor.readAll(topics.inboxEntries, actor.codecs[topics.inboxEntries])).filter(
        (e) => e.userId === 'kept',
      );
    await eventually(async () => (await entries()).length === 1, 10_000, 'the entry');
    // Past retention, and several rounds of the dedup walk; the inbox walk has not come by.
    await new Promise((resolve) => setTimeout(resolve, 2_000));
    assert.equal(
      (await actor.committedKeys('dedup')).filter((k) => k.startsWith('kept/')).length,
      1,
    );
    await actor.produce(topics.messages, 'kept', copy('kept', 'm1')); // a late retry
    await actor.produce(topics.messages, 'kept', copy('kept', 'm2'));
    await eventually(async () => (await entries()).length === 2, 10_000, 'the next message');
    assert.deepEqual(
      (await entries()).map((e) => e.seq),
      [1, 2],
      'the retry appended nothing',
    );
  });
});

describe('users actor pruning (embedded log)', function () {
  this.timeout(30_000);
  let actor: Actor;
  before(async () => {
    actor = await Actor.open({
      liveGateways: () => new Set(['gw1']),
      retentionMs: 4_000,
      // Slices far smaller than the stores, so that every walk takes several ticks.
      prune: { everyMs: 100, dedupEveryMs: 100, tickMs: 50, usersPerTick: 2, dedupKeysPerTick: 3 },
    });
  });
  after(() => actor.close());

  const keysOf = (store: string) => actor.committedKeys(store);

  it('walks every user and dedup key a slice per tick, dropping what is past retention, and numbers on', async () => {
    const users = Array.from({ length: 30 }, (_, i) => `p${i}`);
    await Promise.all(
      users.map(async (user) => {
        await actor.produce(topics.messages, user, copy(user, 'm1'));
        await actor.produce(topics.messages, user, copy(user, 'm2'));
      }),
    );
    await eventually(async () => (await keysOf('inbox')).length === 60, 10_000, 'every entry');
    assert.equal((await keysOf('dedup')).length, 60);

    await eventually(
      async () => (await keysOf('inbox')).length === 0 && (await keysOf('dedup')).length === 0,
      20_000,
      'every entry and dedup key past retention pruned',
    );
    await actor.produce(topics.messages, 'p0', copy('p0', 'm3'));
    await eventually(
      async () =>
        (await actor.readAll(topics.inboxEntries, actor.codecs[topics.inboxEntries])).some(
          (e) => e.userId === 'p0' && e.seq === 3,
        ),
      10_000,
      'the next entry numbered after the pruned ones',
    );
  });

  it('drops from the inbox store what every device acked', async () => {
    await actor.produce(topics.connections, 'acker', {
      userId: 'acker',
      deviceId: 'phone',
      gatewayId: 'gw1',
      connectionId: 'a1',
      state: 'CONNECTED',
      at: Date.now(),
    });
    for (const id of ['m1', 'm2', 'm3'])
      await actor.produce(topics.messages, 'acker', copy('acker', id));
    const kept = async () => (await keysOf('inbox')).filter((k) => k.startsWith('acker/'));
    await eventually(async () => (await kept()).length === 3, 10_000, 'three entries');
    await actor.produce(topics.userCommands, 'acker', {
      userId: 'acker',
      at: Date.now(),
      command: { 'chat.v1.Ack': { deviceId: 'phone', upTo: 3 } },
    });
    // Well before the retention (4 s) would drop them: by the ack itself.
    await eventually(async () => (await kept()).length === 0, 10_000, 'the acked entries gone');

    // Read afterwards: gone from the store, the message is still in the user's inbox, and its
    // sender gets the receipt.
    await actor.produce(topics.userCommands, 'acker', {
      userId: 'acker',
      at: Date.now(),
      command: {
        'chat.v1.Read': { deviceId: 'phone', messageId: 'm2', connectionId: 'a1', id: 'r1' },
      },
    });
    await eventually(
      async () =>
        (await actor.readAll(topics.messages, actor.codecs[topics.messages])).some((c) => {
          const { name, value } = branchOf(c.entry);
          return (
            c.userId === 'alice' &&
            name === 'chat.v1.Receipt' &&
            value.messageId === 'm2' &&
            value.by === 'acker' &&
            value.status === 'read'
          );
        }),
      10_000,
      "the read receipt in the sender's inbox",
    );
  });
});

describe('users actor with a corrupt store value for one user (embedded log)', function () {
  this.timeout(40_000);
  let actor: Actor;
  before(async () => {
    actor = await Actor.open({
      liveGateways: () => new Set(['gw1']),
      retentionMs: 2_000,
      prune: { everyMs: 100, dedupEveryMs: 100, tickMs: 50, usersPerTick: 2, dedupKeysPerTick: 3 },
    });
  });
  after(() => actor.close());

  it("prunes every other user of the task: the walks go past a value that does not decode (found by a review helper: one such value stopped its task's pruning for good)", async () => {
    // Users of mallory's task whose keys come after hers, so that every walk meets her first.
    const partition = partitionFor(Buffer.from('mallory'), 12);
    const users = Array.from({ length: 200 }, (_, i) => `z${i}`)
      .filter((u) => partitionFor(Buffer.from(u), 12) === partition)
      .slice(0, 3);
    assert.equal(users.length, 3);
    for (const user of users) await actor.produce(topics.messages, user, copy(user, 'm1'));
    const kept = async (store: string) =>
      (await actor.committedKeys(store)).filter((k) => users.some((u) => k.startsWith(`${u}/`)));
    await eventually(async () => (await kept('inbox')).length === 3, 10_000, 'their entries');
    // Written by something other than the actor while it is stopped; the next start restores
    // them: a meta that is no JSON, and a dedup key of hers long past retention.
    await actor.stop();
    const producer = await actor.log.producer();
    await producer.send([
      {
        topic: changelogTopic(USERS_APPLICATION, 'inbox-meta'),
        key: Buffer.from('mallory'),
        value: Buffer.from('not json'),
        partition,
      },
      {
        topic: changelogTopic(USERS_APPLICATION, 'dedup'),
        key: Buffer.from('mallory/old'),
        value: Buffer.from(JSON.stringify({ seq: 1, at: 0 })),
        partition,
      },
    ]);
    await producer.close();
    await actor.start();
    await eventually(
      async () => (await kept('inbox')).length === 0 && (await kept('dedup')).length === 0,
      20_000,
      'their entries and dedup keys pruned past retention',
    );
    // Hers is kept: nothing says her inbox no longer holds its entry.
    assert.ok((await actor.committedKeys('dedup')).includes('mallory/old'));
  });
});
