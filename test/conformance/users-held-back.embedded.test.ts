/**
 * The users topology in one stream task driven by hand (no runtime timers): records processed
 * one at a time, punctuators run at chosen times, outputs read from the task.
 *
 * An entry appended while the session's gateway counted as silent is held back from it; the
 * gateway watch at the next tick that finds the gateway live again must send it, however short
 * the silence was (topology.ts, `heldBackOn`). The embedded users-actor test for this depends on
 * whether a tick happens to fall inside the silence; here no tick does, so only `heldBackOn`
 * can bring the entry.
 */
import assert from 'node:assert/strict';
import { join } from 'node:path';
import { bootstrap, usersCodecs } from '../../app/bootstrap.ts';
import type { LogRecord } from '../../log/port.ts';
import { silentLogger } from '../../observability/logger.ts';
import { changelogTopic } from '../../processors/runtime/runtime.ts';
import { StreamTask, type TaskStateStore } from '../../processors/runtime/task.ts';
import { FROM_ACK } from '../../processors/users/decider.ts';
import { usersTopology, USERS_APPLICATION } from '../../processors/users/topology.ts';
import { avroTypeOptions, branchOf, loadSchema } from '../../schemas/avro.ts';
import { Codecs, type TopicCodec } from '../../schemas/codec.ts';
import { deliveriesTopic, topics } from '../../schemas/topics.ts';
import type { Delivery } from '../../schemas/types.generated.ts';
import { StateDb } from '../../state/state-db.ts';
import { jsonSerde } from '../../state/store.ts';
import { TaskStore } from '../../state/task-store.ts';
import { openEmbeddedChat, type EmbeddedChat } from '../support/embedded-chat.ts';

const T0 = 1_800_000_000_000;

describe('users actor: an entry held back during a silence shorter than a tick', function () {
  this.timeout(30_000);
  let chat: EmbeddedChat;
  let stateDb: StateDb;
  let codecs: Awaited<ReturnType<typeof bootstrap>>;
  let deliveries: TopicCodec<Delivery>;

  before(async () => {
    chat = await openEmbeddedChat(1, 'kchat-held-back-');
    codecs = chat.codecs;
    deliveries = await new Codecs(chat.registry).forTopic<Delivery>(
      deliveriesTopic('gw1'),
      loadSchema('Delivery'),
      avroTypeOptions(),
    );
    stateDb = await StateDb.open(join(chat.dir, 'state'));
  });
  after(async () => {
    await stateDb?.close();
    await chat?.close();
  });

  it('sends it at the next tick that finds the gateway live again', async () => {
    let live = new Set(['gw1']);
    const topology = usersTopology({
      codecs: usersCodecs(codecs, deliveries),
      liveGateways: () => live,
      now: () => T0,
    });
    const stores = new Map<string, TaskStateStore>();
    for (const name of topology.stores.keys())
      stores.set(
        name,
        new TaskStore(
          changelogTopic(USERS_APPLICATION, name),
          0,
          stateDb,
          jsonSerde(),
        ) as unknown as TaskStateStore,
      );
    const task = new StreamTask({
      applicationId: USERS_APPLICATION,
      partition: 0,
      topology,
      stores,
      deadLetterTopic: 'users-dead-letters',
      logger: silentLogger,
      now: () => T0,
    });
    await task.init();

    const offsets = new Map<string, number>();
    const feed = async (topic: string, value: unknown) => {
      const codec = (codecs as Record<string, TopicCodec<unknown>>)[topic]!;
      const offset = offsets.get(topic) ?? 0;
      offsets.set(topic, offset + 1);
      const record: LogRecord = {
        topic,
        partition: 0,
        offset,
        key: Buffer.from('hugo'),
        value: codec.encode(value),
        headers: {},
        timestamp: T0,
      };
      assert.equal(await task.process(record), 'processed');
    };
    const message = (messageId: string) => ({
      userId: 'hugo',
      entry: {
        'chat.v1.MessageCopy': {
          messageId,
          from: 'alice',
          to: 'hugo',
          group: null,
          body: '{"text":"hi"}',
          sentAt: T0,
        },
      },
    });
    const delivered = async () => {
      const seqs: number[] = [];
      for (const output of task.outputs) {
        if (output.topic !== deliveriesTopic('gw1')) continue;
        const frame = branchOf((await deliveries.decode(output.value!)).frame);
        if (frame.name === 'chat.v1.InboxEntry') seqs.push(frame.value.seq);
      }
      return seqs;
    };

    await feed(topics.connections, {
      userId: 'hugo',
      deviceId: 'phone',
      gatewayId: 'gw1',
      connectionId: 'c1',
      state: 'CONNECTED',
      at: T0,
    });
    await feed(topics.userCommands, {
      userId: 'hugo',
      at: T0,
      command: {
        'chat.v1.Sync': {
          deviceId: 'phone',
          connectionId: 'c1',
          after: FROM_ACK,
          continued: false,
        },
      },
    });
    await feed(topics.messages, message('m1'));
    assert.deepEqual(await delivered(), [1]);

    // The first watch tick looks at every live gateway; nothing is behind.
    await task.punctuate(T0 + 1_000);
    assert.deepEqual(await delivered(), [1]);

    // gw1's heartbeats lag just while m2 is appended: no tick sees the silence.
    live = new Set();
    await feed(topics.messages, message('m2'));
    live = new Set(['gw1']);
    assert.deepEqual(await delivered(), [1], 'held back from a silent gateway');

    await task.punctuate(T0 + 2_000);
    assert.deepEqual(await delivered(), [1, 2], 'sent at the next tick');
    await task.close();
  });
});
