/**
 * PROTOCOL.md, inbox semantics: "after a reconnect the server never resends an entry at or
 * below an applied ack". The gateway follows every CONNECTED with a Sync `after: FROM_ACK`, so
 * the replay of a reconnecting device must start above that device's own ack, even while the
 * entries it acked are still kept because another device of the user has not acked them.
 *
 * (With one device, what it acked is pruned by the ack itself, so a replay from the first kept
 * entry looks right: the existing tests only had that case.)
 */
import assert from 'node:assert/strict';
import {
  decide,
  entriesNeeded,
  evolve,
  FROM_ACK,
  newUserMeta,
  type UserCommand,
  type UserEvent,
  type UserMeta,
} from '../../processors/users/decider.ts';
import type { InboxEntry } from '../../schemas/types.generated.ts';

const T = 1_800_000_000_000;
const ALICE = 'alice';
const LIVE = new Set(['gw1']);

/** The processor's part, minimal: the meta through evolve, the kept entries beside it. */
class Inbox {
  meta: UserMeta = newUserMeta();
  entries: InboxEntry[] = [];
  sent: UserEvent[] = [];

  run(command: UserCommand): UserEvent[] {
    // Only what the processor loads: the ranges entriesNeeded names.
    const needed = entriesNeeded(command, this.meta, LIVE);
    const entries = needed.flatMap((r) =>
      this.entries.filter((e) => e.seq >= r.from && e.seq < r.to),
    );
    const events = decide(command, {
      userId: ALICE,
      meta: this.meta,
      entries,
      duplicate: false,
      liveGateways: LIVE,
    });
    for (const event of events) {
      this.meta = evolve(this.meta, event);
      if (event.type === 'entry-appended') this.entries.push(event.entry);
      if (event.type === 'pruned') this.entries = this.entries.filter((e) => e.seq >= event.below);
    }
    this.sent.push(...events);
    return events;
  }

  connect(deviceId: string, connectionId: string) {
    return this.run({ kind: 'connected', deviceId, gatewayId: 'gw1', connectionId, at: T });
  }
  sync(deviceId: string, connectionId: string) {
    return this.run({ kind: 'sync', deviceId, connectionId, after: FROM_ACK, at: T });
  }
  append(id: string) {
    return this.run({
      kind: 'append',
      entry: {
        'chat.v1.MessageCopy': {
          messageId: id,
          from: 'bob',
          to: ALICE,
          group: null,
          body: JSON.stringify({ text: id }),
          sentAt: T,
        },
      },
      dedupKey: `m:${id}`,
      at: T,
    });
  }
  ack(deviceId: string, upTo: number) {
    return this.run({ kind: 'ack', deviceId, upTo, at: T });
  }
  disconnect(connectionId: string) {
    return this.run({ kind: 'disconnected', connectionId, at: T });
  }
}

const seqsTo = (events: UserEvent[], connectionId: string) =>
  events.flatMap((e) =>
    e.type === 'delivered' && e.targets.some((t) => t.connectionId === connectionId)
      ? e.entries.map((x) => x.seq)
      : [],
  );

/** Two devices of alice connected and synced; five messages; the phone acks 3, the tablet none. */
function twoDevicesPhoneAcked3(): Inbox {
  const inbox = new Inbox();
  inbox.connect('phone', 'p1');
  inbox.sync('phone', 'p1');
  inbox.connect('tablet', 't1');
  inbox.sync('tablet', 't1');
  for (let i = 1; i <= 5; i++) inbox.append(`m${i}`);
  inbox.ack('phone', 3);
  // The tablet has acked nothing: every entry is still kept.
  assert.equal(inbox.meta.firstKept, 1, 'nothing pruned while the tablet has not acked');
  inbox.disconnect('p1');
  return inbox;
}

describe('users actor: a reconnecting device is replayed only what is above its own ack', () => {
  it('when the Sync follows its CONNECTED', () => {
    const inbox = twoDevicesPhoneAcked3();
    const events = [...inbox.connect('phone', 'p2'), ...inbox.sync('phone', 'p2')];
    assert.deepEqual(seqsTo(events, 'p2'), [4, 5], 'the phone acked 1..3: never resent');
  });

  it('when the Sync overtook its CONNECTED and waited for it', () => {
    const inbox = twoDevicesPhoneAcked3();
    const events = [...inbox.sync('phone', 'p2'), ...inbox.connect('phone', 'p2')];
    assert.deepEqual(seqsTo(events, 'p2'), [4, 5], 'the phone acked 1..3: never resent');
  });

  it('while a device that never acked is still replayed every kept entry', () => {
    const inbox = twoDevicesPhoneAcked3();
    inbox.disconnect('t1');
    const events = [...inbox.connect('tablet', 't2'), ...inbox.sync('tablet', 't2')];
    assert.deepEqual(seqsTo(events, 't2'), [1, 2, 3, 4, 5]);
  });
});
