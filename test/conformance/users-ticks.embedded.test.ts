/**
 * The users actor's ticks when one fails partway: the task rolls the tick's store writes back,
 * and the walks must go back with them. Here the gateway watch: gw2 restarts, ua's session is
 * of its earlier run (to close), ub's of the new one and behind (to catch up), and looking up
 * gw2's deliveries topic fails once at ub. ua's session must still be closed.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { EmbeddedSchemaRegistry } from '../../schemas/registry/embedded.ts';
import { Codecs } from '../../schemas/codec.ts';
import { avroTypeOptions, branchOf, loadSchema } from '../../schemas/avro.ts';
import { deliveriesTopic, topics } from '../../schemas/topics.ts';
import type { Delivery } from '../../schemas/types.generated.ts';
import { bootstrap } from '../../app/bootstrap.ts';
import { StateDb } from '../../state/state-db.ts';
import { changelogTopic, StreamsRuntime } from '../../processors/runtime/runtime.ts';
import { usersTopology, USERS_APPLICATION } from '../../processors/users/topology.ts';
import { FROM_ACK } from '../../processors/users/decider.ts';
import { eventually } from '../support/log-helpers.ts';
import { partitionFor } from '../../log/partitioner.ts';

const T = Date.now();
const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

async function scenario(failOnce: boolean) {
  const dir = await mkdtemp(join(tmpdir(), 'kchat-ticks-'));
  const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
  const registry = await EmbeddedSchemaRegistry.open(log);
  const codecs = await bootstrap(log, registry, 12);
  await log.admin.createTopics([
    { topic: deliveriesTopic('gw1'), partitions: 12 },
    { topic: deliveriesTopic('gw2'), partitions: 12 },
  ]);
  const deliveries = await new Codecs(registry).forTopic<Delivery>(
    deliveriesTopic('gw2'),
    loadSchema('Delivery'),
    avroTypeOptions(),
  );
  // A transient admin failure (a broker hiccup on Kafka) for gw2's deliveries topic, once.
  let armed = false;
  const describe = log.admin.describeTopic.bind(log.admin);
  log.admin.describeTopic = async (topic: string) => {
    if (armed && topic === deliveriesTopic('gw2')) {
      armed = false;
      throw new Error('injected: describeTopic failed');
    }
    return describe(topic);
  };
  const stateDb = await StateDb.open(join(dir, 'state'));
  let live = new Set(['gw1', 'gw2']);
  const starts = new Map<string, number>([['gw2', T]]);
  const closed: number[] = [];
  const runtime = new StreamsRuntime(
    usersTopology({
      codecs: {
        connections: codecs[topics.connections],
        messages: codecs[topics.messages],
        userCommands: codecs[topics.userCommands],
        deliveries,
        push: codecs[topics.push],
        inboxEntries: codecs[topics.inboxEntries],
      },
      liveGateways: () => live,
      gatewayStartedAt: (g) => starts.get(g),
      onStaleSessions: (n) => closed.push(n),
    }),
    { applicationId: USERS_APPLICATION, log, stateDb, commitIntervalMs: 20 },
  );
  await runtime.start();
  const produce = async (topic: string, key: string, value: unknown) => {
    const codec = (codecs as Record<string, { encode(v: unknown): Buffer }>)[topic]!;
    const p = await log.producer();
    await p.send([{ topic, key: Buffer.from(key), value: codec.encode(value) }]);
    await p.close();
  };
  const sessionKeys = async () => {
    const keys: string[] = [];
    for (let p = 0; p < 12; p++)
      keys.push(
        ...(await stateDb.range(changelogTopic(USERS_APPLICATION, 'sessions'), p, '')).map(
          ([k]) => k,
        ),
      );
    return keys;
  };
  const deliveredTo = async (userId: string) => {
    const marks = await log.admin.watermarks(deliveriesTopic('gw2'));
    const seqs: number[] = [];
    for await (const b of log.readPartitions(
      deliveriesTopic('gw2'),
      marks.map((m) => ({ partition: m.partition, from: 0 })),
    ))
      for (const r of b.records) {
        const d = await deliveries.decode(r.value!);
        const f = branchOf(d.frame);
        if (d.userId === userId && f.name === 'chat.v1.InboxEntry') seqs.push(f.value.seq);
      }
    return seqs;
  };
  try {
    // Two users of one task, ua before ub in the sessions store.
    const [ua, ub] = Array.from({ length: 400 }, (_, i) => `user${i}`)
      .filter((u) => partitionFor(Buffer.from(u), 12) === 3)
      .sort();
    const connect = (userId: string, at: number) =>
      produce(topics.connections, userId, {
        userId,
        deviceId: 'phone',
        gatewayId: 'gw2',
        connectionId: `c-${userId}`,
        state: 'CONNECTED',
        at,
      });
    const sync = (userId: string) =>
      produce(topics.userCommands, userId, {
        userId,
        at: T,
        command: {
          'chat.v1.Sync': { deviceId: 'phone', connectionId: `c-${userId}`, after: FROM_ACK },
        },
      });
    await connect(ua!, T + 1); // of gw2's run that will turn out to be over
    await sync(ua!);
    await connect(ub!, T + 3000); // of gw2's next run
    await sync(ub!);
    await eventually(
      async () => (await sessionKeys()).filter((k) => k.startsWith('gw2\u0000')).length === 2,
      10_000,
      'both sessions stored',
    );
    await sleep(1200); // past the first tick's look at every gateway

    live = new Set(['gw1']); // gw2 silent
    await produce(topics.messages, ub!, {
      userId: ub,
      entry: {
        'chat.v1.MessageCopy': {
          messageId: 'm1',
          from: 'alice',
          to: ub,
          group: null,
          body: '{"text":"hi"}',
          sentAt: T,
        },
      },
    });
    await sleep(1500); // appended while silent, and a tick meanwhile
    armed = failOnce;
    starts.set('gw2', T + 2000); // gw2 restarted: ua's connection is gone, ub's is current
    live = new Set(['gw1', 'gw2']);

    await eventually(async () => (await deliveredTo(ub!)).length === 1, 10_000, 'ub caught up');
    await sleep(2500); // a couple more ticks
    return {
      uaSessionStored: (await sessionKeys()).includes(`gw2\u0000${ua}`),
      closed: closed.reduce((a, b) => a + b, 0),
    };
  } finally {
    await runtime.close();
    await stateDb.close();
    await log.close();
    await rm(dir, { recursive: true, force: true });
  }
}

describe('users actor: a gateway watch tick that fails partway', function () {
  this.timeout(40_000);

  it('closes the stale session of an earlier run, and catches up a live one', async () => {
    const r = await scenario(false);
    assert.equal(r.uaSessionStored, false);
    assert.equal(r.closed, 1);
  });

  it('closes it still when the tick failed at a later user, and was rolled back', async () => {
    const r = await scenario(true);
    assert.equal(r.uaSessionStored, false, "ua's stale session was never closed");
  });
});
