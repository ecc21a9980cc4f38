/**
 * The users actor's logic as tables of command, state and expected events: no log, no store,
 * no clock. A small harness plays the processor's part (entries and dedup keys kept beside the
 * meta) for the scenarios that span several commands.
 */
import assert from 'node:assert/strict';
import { branchOf } from '../../schemas/avro.ts';
import {
  decide,
  entriesNeeded,
  evolve,
  FROM_ACK,
  MAX_DEVICES,
  MAX_PENDING_SYNCS,
  MAX_SESSIONS,
  EVICTED,
  newUserMeta,
  PRUNE_SLICE_ENTRIES,
  PRUNED_PER_COMMAND,
  RECEIPTED_PER_COMMAND,
  RECEIPTS_RESTART_MS,
  REPLAY_PART_BYTES,
  REPLAY_PART_ENTRIES,
  type EntryBody,
  type Session,
  type UserCommand,
  type UserEvent,
  type UserMeta,
  type UserView,
} from '../../processors/users/decider.ts';
import type { InboxEntry } from '../../schemas/types.generated.ts';
import { seededRandom } from '../support/random.ts';

const T = 1_800_000_000_000;
const DAY = 86_400_000;
const ALICE = 'alice';

const message = (
  messageId: string,
  from: string,
  to = ALICE,
  body = JSON.stringify({ text: `hi ${messageId}` }),
  sentAt = T,
): EntryBody => ({
  'chat.v1.MessageCopy': { messageId, from, to, group: null, body, sentAt },
});

const view = (meta: UserMeta, extra: Partial<UserView> = {}): UserView => ({
  userId: ALICE,
  meta,
  entries: [],
  duplicate: false,
  liveGateways: new Set(['gw1', 'gw2']),
  ...extra,
});

const metaWith = (patch: Partial<UserMeta>): UserMeta => ({ ...newUserMeta(), ...patch });
const types = (events: UserEvent[]) => events.map((e) => e.type);

const messageIdOf = (entry: InboxEntry) => {
  const { name, value } = branchOf(entry.entry);
  return name === 'chat.v1.MessageCopy' ? value.messageId : undefined;
};

/** Plays the processor: meta through evolve, entries and dedup keys kept beside it. */
class Inbox {
  meta = newUserMeta();
  entries: InboxEntry[] = [];
  dedup = new Set<string>();
  /** The sender of every message appended, by messageId: what the dedup store keeps. */
  senders = new Map<string, string>();
  liveGateways = new Set(['gw1', 'gw2']);
  sent: UserEvent[] = [];
  /** How many appends asked for kept entries. */
  entriesLoaded = 0;
  /** Acks the actor sent itself on chat.user-commands, not read yet. */
  looped: UserCommand[] = [];
  /** The most entries one command read. */
  mostLoaded = 0;

  run(command: UserCommand): UserEvent[] {
    const duplicate = command.kind === 'append' && this.dedup.has(command.dedupKey);
    // Only what the processor would load: the range entriesNeeded names, or a read's one entry.
    const needed = entriesNeeded(command, this.meta, this.liveGateways);
    if (needed.length > 0 && command.kind === 'append') this.entriesLoaded++;
    const loaded = needed.reduce((n, r) => n + r.to - r.from, 0);
    this.mostLoaded = Math.max(this.mostLoaded, loaded);
    // The kept entries are in seq order with no gap: a range is a slice.
    const base = this.entries[0]?.seq ?? 0;
    const entries =
      command.kind === 'read'
        ? this.entries.filter((e) => messageIdOf(e) === command.messageId)
        : needed.flatMap((r) =>
            this.entries.slice(Math.max(0, r.from - base), Math.max(0, r.to - base)),
          );
    const from = command.kind === 'read' ? this.senders.get(command.messageId) : undefined;
    const pruned =
      command.kind === 'read' && entries.length === 0 && from !== undefined
        ? { messageId: command.messageId, from }
        : undefined;
    const events = decide(
      command,
      view(this.meta, { entries, pruned, duplicate, liveGateways: this.liveGateways }),
    );
    for (const event of events) {
      this.meta = evolve(this.meta, event);
      if (event.type === 'entry-appended') {
        this.entries.push(event.entry);
        this.dedup.add(event.dedupKey);
        const { name, value } = branchOf(event.entry.entry);
        if (name === 'chat.v1.MessageCopy') this.senders.set(value.messageId, value.from);
      }
      if (event.type === 'pruned') this.entries = this.entries.filter((e) => e.seq >= event.below);
      if (event.type === 'receipts-continued')
        this.looped.push({
          kind: 'ack',
          deviceId: event.deviceId,
          upTo: event.upTo,
          continued: true,
          at: event.at,
        });
    }
    this.sent.push(
      ...events.filter((e) =>
        ['delivered', 'receipt-owed', 'push-requested', 'refused', 'typing-relayed'].includes(
          e.type,
        ),
      ),
    );
    return events;
  }

  connect(deviceId: string, connectionId: string, at = T): UserEvent[] {
    return this.run({ kind: 'connected', deviceId, gatewayId: 'gw1', connectionId, at });
  }

  sync(deviceId: string, connectionId: string, after = FROM_ACK): UserEvent[] {
    return this.run({ kind: 'sync', deviceId, connectionId, after, at: T });
  }

  /** The gateway asks for the next part of a replay, after the part that ended at `after`. */
  continued(connectionId: string, after: number, deviceId = 'phone'): UserEvent[] {
    return this.run({ kind: 'sync', deviceId, connectionId, after, continued: true, at: T });
  }

  /** The seqs at which a replay part ended with more to come, in order. */
  partEnds(connectionId: string): number[] {
    return this.sent.flatMap((e) =>
      e.type === 'delivered' && e.more && e.targets.some((t) => t.connectionId === connectionId)
        ? [e.entries[e.entries.length - 1]!.seq]
        : [],
    );
  }

  disconnect(connectionId: string): UserEvent[] {
    return this.run({ kind: 'disconnected', connectionId, at: T });
  }

  append(id: string, from = 'bob', at = T): UserEvent[] {
    return this.run({ kind: 'append', entry: message(id, from), dedupKey: `m:${id}`, at });
  }

  /** Reads what the actor sent itself, until it sends no more; answers how many it read. */
  loop(): number {
    let read = 0;
    for (; this.looped.length > 0 && read < 1_000; read++) this.run(this.looped.shift()!);
    return read;
  }

  /** The `delivered` receipts owed so far, by messageId. */
  receiptsOwed(): string[] {
    return this.sent.flatMap((e) =>
      e.type === 'receipt-owed' && e.receipt.status === 'delivered' ? [e.receipt.messageId] : [],
    );
  }

  deliveredSeqs(connectionId: string): number[] {
    return this.sent.flatMap((e) =>
      e.type === 'delivered' && e.targets.some((t) => t.connectionId === connectionId)
        ? e.entries.map((x) => x.seq)
        : [],
    );
  }
}

describe('users actor: decide', () => {
  const online = metaWith({
    nextSeq: 4,
    receiptedUpTo: 3,
    devices: { phone: { ack: 3 } },
    sessions: { c1: { deviceId: 'phone', gatewayId: 'gw1', live: true } },
  });

  const table: Array<[string, UserCommand, UserView, string[]]> = [
    [
      'an append to an empty inbox gets seq 1 and nothing else when nobody is online',
      { kind: 'append', entry: message('m1', 'bob'), dedupKey: 'm:m1', at: T },
      view(newUserMeta()),
      ['entry-appended'],
    ],
    [
      'an entry the inbox holds is dropped',
      { kind: 'append', entry: message('m1', 'bob'), dedupKey: 'm:m1', at: T },
      view(online, { duplicate: true }),
      [],
    ],
    [
      'an append reaches a live session',
      { kind: 'append', entry: message('m2', 'bob'), dedupKey: 'm:m2', at: T },
      view(online),
      ['entry-appended', 'delivered'],
    ],
    [
      'an append waits for a session that has not synced yet',
      { kind: 'append', entry: message('m2', 'bob'), dedupKey: 'm:m2', at: T },
      view(metaWith({ sessions: { c1: { deviceId: 'phone', gatewayId: 'gw1', live: false } } })),
      ['entry-appended'],
    ],
    [
      'a session on a silent gateway counts as offline: push instead',
      { kind: 'append', entry: message('m2', 'bob'), dedupKey: 'm:m2', at: T },
      view(
        { ...online, push: { phone: { pushToken: 'tok', platform: 'android' } } },
        { liveGateways: new Set(['gw2']) },
      ),
      ['entry-appended', 'push-requested'],
    ],
    [
      "one's own message asks for no push",
      { kind: 'append', entry: message('m3', ALICE), dedupKey: 'm:m3', at: T },
      view(metaWith({ push: { phone: { pushToken: 'tok', platform: null } } })),
      ['entry-appended'],
    ],
    [
      'a CONNECTED opens a session that is not live yet',
      { kind: 'connected', deviceId: 'tablet', gatewayId: 'gw2', connectionId: 'c2', at: T },
      view(online),
      ['session-opened'],
    ],
    [
      'a CONNECTED seen twice changes nothing',
      { kind: 'connected', deviceId: 'phone', gatewayId: 'gw1', connectionId: 'c1', at: T },
      view(online),
      [],
    ],
    [
      'a sync before its CONNECTED waits',
      { kind: 'sync', deviceId: 'tablet', connectionId: 'c9', after: FROM_ACK, at: T },
      view(online),
      ['sync-pending'],
    ],
    [
      'a sync after its connection closed is dropped, not left waiting',
      { kind: 'sync', deviceId: 'phone', connectionId: 'c0', after: FROM_ACK, at: T },
      view({ ...online, recentlyClosed: ['c0'] }),
      [],
    ],
    [
      'a CONNECTED after its own DISCONNECTED (redelivered) opens nothing',
      { kind: 'connected', deviceId: 'phone', gatewayId: 'gw1', connectionId: 'c0', at: T },
      view({ ...online, recentlyClosed: ['c0'] }),
      [],
    ],
    [
      'a DISCONNECTED of another connection removes nothing',
      { kind: 'disconnected', connectionId: 'old', at: T },
      view(online),
      [],
    ],
    [
      'an ack that does not move forward changes nothing',
      { kind: 'ack', deviceId: 'phone', upTo: 2, at: T },
      view(online),
      [],
    ],
    [
      'typing reaches live sessions only, never stored',
      { kind: 'typing', typing: { from: 'bob', to: ALICE, group: null, state: 'start', at: T } },
      view(online),
      ['typing-relayed'],
    ],
    [
      'the same push registration again changes nothing',
      { kind: 'device-registered', deviceId: 'phone', pushToken: 'tok', platform: null },
      view(metaWith({ push: { phone: { pushToken: 'tok', platform: null } } })),
      [],
    ],
    [
      'a removal naming an old token keeps the new one',
      { kind: 'device-removed', deviceId: 'phone', pushToken: 'old' },
      view(metaWith({ push: { phone: { pushToken: 'new', platform: null } } })),
      [],
    ],
    [
      'a removal without a token removes the registration',
      { kind: 'device-removed', deviceId: 'phone', pushToken: null },
      view(metaWith({ push: { phone: { pushToken: 'new', platform: null } } })),
      ['push-removed'],
    ],
  ];
  for (const [what, command, state, expected] of table) {
    it(what, () => assert.deepEqual(types(decide(command, state)), expected));
  }
});

describe('users actor: scenarios', () => {
  it('numbers entries 1, 2, 3... with no gaps, and keeps a retried message once', () => {
    const inbox = new Inbox();
    inbox.append('m1');
    inbox.append('m2');
    assert.deepEqual(inbox.append('m1'), [], 'a retry of m1');
    inbox.append('m3', ALICE);
    assert.deepEqual(
      inbox.entries.map((e) => e.seq),
      [1, 2, 3],
    );
    assert.equal(inbox.meta.nextSeq, 4);
  });

  it('replays, after a (re)connect, every entry above the applied ack, then delivers live in seq order', () => {
    const inbox = new Inbox();
    for (const id of ['m1', 'm2', 'm3']) inbox.append(id);
    inbox.connect('phone', 'c1');
    inbox.append('m4'); // arrives before the sync: not sent live, the replay covers it
    inbox.sync('phone', 'c1');
    inbox.append('m5');
    assert.deepEqual(inbox.deliveredSeqs('c1'), [1, 2, 3, 4, 5]);

    inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 4, at: T });
    inbox.run({
      kind: 'connected',
      deviceId: 'phone',
      gatewayId: 'gw2',
      connectionId: 'c2',
      at: T,
    }); // reconnect elsewhere
    inbox.run({ kind: 'disconnected', connectionId: 'c1', at: T }); // the old connection's late close
    inbox.sync('phone', 'c2');
    assert.deepEqual(inbox.deliveredSeqs('c2'), [5], 'nothing at or below the applied ack');
    assert.deepEqual(
      Object.keys(inbox.meta.sessions),
      ['c2'],
      'the old close did not remove the new session',
    );
  });

  it('handles a sync that overtook its CONNECTED', () => {
    const inbox = new Inbox();
    inbox.append('m1');
    inbox.sync('phone', 'c1');
    assert.deepEqual(inbox.deliveredSeqs('c1'), []);
    inbox.connect('phone', 'c1');
    assert.deepEqual(inbox.deliveredSeqs('c1'), [1]);
    assert.equal(inbox.meta.sessions.c1?.live, true);
    inbox.append('m2');
    assert.deepEqual(inbox.deliveredSeqs('c1'), [1, 2]);
  });

  it('opens no session for a CONNECTED from an earlier run of its gateway, and drops the sync that waited for it', () => {
    const connected: UserCommand = {
      kind: 'connected',
      deviceId: 'phone',
      gatewayId: 'gw1',
      connectionId: 'c1',
      at: T,
    };
    // The gateway restarted after recording the connection: it holds the connection no more.
    // It is remembered as closed, so that its sync, still to come, does not wait for good.
    const stale = decide(connected, view(newUserMeta(), { gatewayStartedAt: T + 1 }));
    assert.deepEqual(stale, [{ type: 'session-closed', connectionId: 'c1' }]);
    const closed = evolve(newUserMeta(), stale[0]!);
    assert.deepEqual(
      decide(
        { kind: 'sync', deviceId: 'phone', connectionId: 'c1', after: FROM_ACK, at: T },
        view(closed),
      ),
      [],
    );
    const waiting = metaWith({ pendingSyncs: { c1: { after: FROM_ACK } } });
    const events = decide(connected, view(waiting, { gatewayStartedAt: T + 1 }));
    assert.deepEqual(events, [{ type: 'session-closed', connectionId: 'c1' }]);
    assert.deepEqual(evolve(waiting, events[0]!).pendingSyncs, {});
    // Recorded in the current run (or no start known): the session opens.
    for (const gatewayStartedAt of [T, T - 1, undefined])
      assert.deepEqual(types(decide(connected, view(newUserMeta(), { gatewayStartedAt }))), [
        'session-opened',
      ]);
  });

  it('a first-time device gets every kept entry; a sync frame resends above its own `after`', () => {
    const inbox = new Inbox();
    for (const id of ['m1', 'm2', 'm3']) inbox.append(id);
    inbox.connect('laptop', 'c1');
    inbox.sync('laptop', 'c1');
    inbox.sync('laptop', 'c1', 2);
    assert.deepEqual(inbox.deliveredSeqs('c1'), [1, 2, 3, 3]);
  });

  it('owes one `delivered` receipt per message, on the first ack of any device covering it', () => {
    const inbox = new Inbox();
    inbox.append('m1', 'bob');
    inbox.append('m2', ALICE); // her own copy: no receipt
    inbox.append('m3', 'carol');
    for (const [device, connection] of [
      ['phone', 'c1'],
      ['laptop', 'c2'],
    ]) {
      inbox.connect(device!, connection!);
    }
    inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2, at: T });
    inbox.run({ kind: 'ack', deviceId: 'laptop', upTo: 3, at: T });
    inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 99, at: T }); // clamped to what the inbox holds
    const receipts = inbox.sent.flatMap((e) =>
      e.type === 'receipt-owed' ? [[e.to, e.receipt.messageId, e.receipt.status]] : [],
    );
    assert.deepEqual(receipts, [
      ['bob', 'm1', 'delivered'],
      ['carol', 'm3', 'delivered'],
    ]);
    assert.deepEqual(inbox.meta.devices, {
      phone: { ack: 3, seenAt: T },
      laptop: { ack: 3, seenAt: T },
    });
  });

  it('owes a `read` receipt for a message in the inbox, and refuses one that is not', () => {
    const inbox = new Inbox();
    inbox.append('m1', 'bob');
    inbox.connect('phone', 'c1');
    inbox.run({
      kind: 'read',
      deviceId: 'phone',
      messageId: 'm1',
      connectionId: 'c1',
      id: null,
      at: T,
    });
    inbox.run({
      kind: 'read',
      deviceId: 'phone',
      messageId: 'nope',
      connectionId: 'c1',
      id: 'r9',
      at: T,
    });
    const facts = inbox.sent.filter((e) => e.type === 'receipt-owed' || e.type === 'refused');
    assert.deepEqual(
      facts.map((e) =>
        e.type === 'receipt-owed'
          ? `${e.to}:${e.receipt.status}`
          : `refused:${e.type === 'refused' && e.code}`,
      ),
      ['bob:read', 'refused:unknown_message'],
    );
  });

  it('prunes what every device acked with the ack, and still owes a `read` receipt for it', () => {
    const inbox = new Inbox();
    inbox.append('m1', 'bob');
    inbox.append('m2', 'bob');
    inbox.connect('phone', 'c1');
    inbox.connect('laptop', 'c2');
    inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2, at: T });
    assert.equal(inbox.meta.firstKept, 1, 'the laptop has acked nothing');
    const events = inbox.run({ kind: 'ack', deviceId: 'laptop', upTo: 1, at: T });
    assert.deepEqual(events.at(-1), { type: 'pruned', below: 2 });
    assert.deepEqual(
      inbox.entries.map((e) => e.seq),
      [2],
    );
    // Read an hour later: m1 is gone from the store, not from the user's inbox.
    inbox.run({
      kind: 'read',
      deviceId: 'laptop',
      messageId: 'm1',
      connectionId: 'c2',
      id: null,
      at: T,
    });
    const receipts = inbox.sent.flatMap((e) =>
      e.type === 'receipt-owed' && e.receipt.status === 'read' ? [[e.to, e.receipt.messageId]] : [],
    );
    assert.deepEqual(receipts, [['bob', 'm1']]);
  });

  it('prunes at most PRUNED_PER_COMMAND acked entries per command, the rest at the next', () => {
    const inbox = new Inbox();
    inbox.connect('phone', 'c1');
    const count = PRUNED_PER_COMMAND + 100;
    // Its own messages: they owe no receipts, which would hold pruning back.
    for (let i = 1; i <= count; i++) inbox.append(`m${i}`, ALICE);
    inbox.meta = { ...inbox.meta, receiptedUpTo: count };
    inbox.run({ kind: 'ack', deviceId: 'phone', upTo: count, at: T });
    assert.equal(inbox.meta.firstKept, 1 + PRUNED_PER_COMMAND);
    inbox.run({ kind: 'prune', now: T, retentionMs: 86_400_000 });
    assert.equal(inbox.meta.firstKept, count + 1);
    assert.deepEqual(inbox.entries, []);
  });

  it('prunes expired entries a slice at a time, and stops at the first that is not expired', () => {
    const inbox = new Inbox();
    const day = 86_400_000;
    const expired = 100;
    for (let i = 1; i <= expired; i++) inbox.append(`old${i}`, 'bob', T - 40 * day);
    inbox.append('fresh', 'bob', T);
    // Stamped as old by a gateway whose clock is behind: after a fresh entry, so it stays.
    inbox.append('skewed', 'bob', T - 40 * day);
    const prune = () => inbox.run({ kind: 'prune', now: T, retentionMs: 30 * day });

    assert.deepEqual(
      entriesNeeded({ kind: 'prune', now: T, retentionMs: 30 * day }, inbox.meta, new Set()),
      [{ from: 1, to: 1 + PRUNE_SLICE_ENTRIES }],
    );
    prune();
    assert.equal(inbox.meta.firstKept, 1 + PRUNE_SLICE_ENTRIES, 'one slice');
    prune();
    assert.equal(inbox.meta.firstKept, expired + 1, 'up to the fresh entry');
    assert.deepEqual(prune(), [], 'nothing past it');
    assert.deepEqual(
      inbox.entries.map((e) => messageIdOf(e)),
      ['fresh', 'skewed'],
    );
  });

  it('prunes an inbox whose user has more devices than spread arguments allow', () => {
    const inbox = new Inbox();
    inbox.append('m1');
    const devices = Object.fromEntries(
      Array.from({ length: 200_000 }, (_, i) => [`d${i}`, { ack: 1 }]),
    );
    inbox.meta = {
      ...inbox.meta,
      receiptedUpTo: 1,
      devices: devices as typeof inbox.meta.devices,
    };
    inbox.run({ kind: 'prune', now: T, retentionMs: 86_400_000 });
    assert.equal(inbox.meta.firstKept, 2);
  });

  it('prunes what every device acked without reading the entries', () => {
    const inbox = new Inbox();
    for (let i = 1; i <= 10; i++) inbox.append(`m${i}`);
    inbox.connect('phone', 'c1');
    inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 10, at: T });
    const command = { kind: 'prune', now: T, retentionMs: 86_400_000 } as const;
    assert.deepEqual(entriesNeeded(command, inbox.meta, new Set(['gw1'])), []);
    inbox.run(command);
    assert.equal(inbox.meta.firstKept, 11);
    assert.deepEqual(inbox.entries, []);
  });

  it('keeps entries until every device that ever connected acked them, or until they expire', () => {
    const inbox = new Inbox();
    const day = 86_400_000;
    inbox.append('m1', 'bob', T - 40 * day);
    inbox.append('m2', 'bob', T - 2 * day);
    inbox.append('m3', 'bob', T);
    for (const device of ['phone', 'laptop']) {
      inbox.connect(device, device);
    }
    inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 3, at: T });
    inbox.run({ kind: 'prune', now: T, retentionMs: 30 * day });
    assert.deepEqual(
      inbox.entries.map((e) => e.seq),
      [2, 3],
      'm1 expired; the laptop has not acked m2 and m3',
    );
    inbox.run({ kind: 'ack', deviceId: 'laptop', upTo: 2, at: T });
    inbox.run({ kind: 'prune', now: T, retentionMs: 30 * day });
    assert.deepEqual(
      inbox.entries.map((e) => e.seq),
      [3],
    );
    assert.equal(inbox.meta.firstKept, 3);
    inbox.append('m4');
    assert.equal(inbox.entries.at(-1)?.seq, 4, 'numbering goes on after a prune');
  });

  describe('bounded state', () => {
    const day = 86_400_000;

    it('drops a sync that comes after its connection closed, instead of keeping it pending', () => {
      const inbox = new Inbox();
      inbox.connect('phone', 'c1');
      inbox.disconnect('c1');
      assert.deepEqual(inbox.sync('phone', 'c1'), []);
      assert.deepEqual(inbox.meta.pendingSyncs, {});
    });

    it('keeps at most MAX_PENDING_SYNCS syncs waiting, the newest', () => {
      const inbox = new Inbox();
      for (let i = 1; i <= MAX_PENDING_SYNCS + 4; i++) inbox.sync('phone', `c${i}`);
      const waiting = Object.keys(inbox.meta.pendingSyncs);
      assert.equal(waiting.length, MAX_PENDING_SYNCS);
      assert.deepEqual(waiting.slice(-2), [
        `c${MAX_PENDING_SYNCS + 3}`,
        `c${MAX_PENDING_SYNCS + 4}`,
      ]);
      inbox.append('m1');
      inbox.connect('phone', `c${MAX_PENDING_SYNCS + 4}`);
      assert.deepEqual(inbox.deliveredSeqs(`c${MAX_PENDING_SYNCS + 4}`), [1], 'still replayed');
    });

    it("resolves a waiting sync's FROM_ACK at the CONNECTED, with the session's device", () => {
      const inbox = new Inbox();
      inbox.connect('laptop', 'c0');
      inbox.disconnect('c0'); // the laptop has acked nothing: entries stay
      for (let i = 1; i <= 6; i++) inbox.append(`m${i}`);
      inbox.connect('phone', 'c1');
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 5, at: T });
      inbox.sync('phone', 'c2'); // crafted records: c2 is the laptop's
      inbox.sync('phone', 'c2', 4);
      inbox.connect('laptop', 'c2');
      assert.deepEqual(inbox.deliveredSeqs('c2'), [1, 2, 3, 4, 5, 6], "the laptop's ack, 0");
    });

    it('replays from the lower of two syncs that waited for one CONNECTED', () => {
      const inbox = new Inbox();
      for (let i = 1; i <= 8; i++) inbox.append(`m${i}`);
      inbox.sync('phone', 'c1', 2);
      inbox.sync('phone', 'c1', 5);
      inbox.connect('phone', 'c1');
      assert.deepEqual(inbox.deliveredSeqs('c1'), [3, 4, 5, 6, 7, 8]);
    });

    it('replays above the ack of the device of the session, whatever device a sync names', () => {
      const inbox = new Inbox();
      for (let i = 1; i <= 6; i++) inbox.append(`m${i}`);
      inbox.connect('phone', 'c1');
      inbox.connect('laptop', 'c2');
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 5, at: T });
      inbox.sync('phone', 'c2'); // a crafted record: c2 is the laptop's
      assert.deepEqual(inbox.deliveredSeqs('c2'), [1, 2, 3, 4, 5, 6], 'no gap');
    });

    it('remembers at most MAX_DEVICES devices: a new one evicts the least recently seen', () => {
      const inbox = new Inbox();
      inbox.connect('kept-open', 'open', T);
      for (let i = 1; i <= MAX_DEVICES + 5; i++) {
        inbox.connect(`d${i}`, `c${i}`, T + i);
        inbox.disconnect(`c${i}`);
      }
      const devices = Object.keys(inbox.meta.devices);
      assert.equal(devices.length, MAX_DEVICES + 1, 'and the placeholder of the evicted');
      assert.deepEqual(inbox.meta.devices[EVICTED], { ack: 0, seenAt: T + 6 });
      assert.ok(devices.includes('kept-open'), 'a device with an open connection stays');
      assert.ok(!devices.includes('d1') && devices.includes(`d${MAX_DEVICES + 5}`));
      // An ack of a device it does not know makes room the same way.
      inbox.append('m1');
      inbox.run({ kind: 'ack', deviceId: 'newcomer', upTo: 1, at: T + 1000 });
      assert.equal(Object.keys(inbox.meta.devices).length, MAX_DEVICES + 1);

      // Devices stored before seenAt was kept: the placeholder counts them seen at the eviction.
      const legacy = new Inbox();
      legacy.meta = metaWith({
        devices: Object.fromEntries(
          Array.from({ length: MAX_DEVICES }, (_, i) => [`old${i}`, { ack: 0 }]),
        ),
      });
      legacy.connect('new', 'c1', T + 99);
      assert.deepEqual(legacy.meta.devices[EVICTED], { ack: 0, seenAt: T + 99 });
    });

    it('counts a device seen until it disconnected, for which to evict first', () => {
      const inbox = new Inbox();
      inbox.connect('laptop', 'long', T); // open for days
      for (let i = 1; i < MAX_DEVICES; i++) {
        inbox.connect(`d${i}`, `c${i}`, T + i);
        inbox.disconnect(`c${i}`);
      }
      inbox.run({ kind: 'disconnected', connectionId: 'long', at: T + 5 * 86_400_000 });
      inbox.connect('newcomer', 'c0', T + 6 * 86_400_000);
      assert.ok('laptop' in inbox.meta.devices, 'seen five days after the others');
      assert.ok(!('d1' in inbox.meta.devices));
    });

    it('keeps for an evicted device what it had not acked, until it expires', () => {
      const inbox = new Inbox();
      inbox.connect('tablet', 'ct', T); // acks nothing
      inbox.disconnect('ct');
      inbox.connect('phone', 'cp', T + 1);
      for (let i = 1; i <= 5; i++) inbox.append(`m${i}`, 'bob', T + 1);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 5, at: T + 1 });
      inbox.disconnect('cp');
      for (let i = 1; i <= MAX_DEVICES; i++) {
        inbox.connect(`d${i}`, `c${i}`, T + 60_000 + i);
        inbox.run({ kind: 'ack', deviceId: `d${i}`, upTo: 5, at: T + 60_000 + i });
        inbox.disconnect(`c${i}`);
      }
      assert.ok(!('tablet' in inbox.meta.devices), 'evicted');
      assert.equal(inbox.meta.firstKept, 1, 'its entries kept');
      inbox.connect('tablet', 'ct2', T + 120_000);
      inbox.sync('tablet', 'ct2');
      assert.deepEqual(inbox.deliveredSeqs('ct2'), [1, 2, 3, 4, 5], 'back as a new device');
      // The placeholder stays; what it holds back goes when it expires.
      const day = 86_400_000;
      inbox.run({ kind: 'ack', deviceId: 'tablet', upTo: 5, at: T + 120_000 });
      assert.equal(inbox.meta.firstKept, 1);
      inbox.run({ kind: 'prune', now: T + 40 * day, retentionMs: 30 * day });
      assert.ok(EVICTED in inbox.meta.devices);
      assert.equal(inbox.meta.firstKept, 6);
    });

    it('keeps at most MAX_SESSIONS sessions, closing the oldest on silent gateways first', () => {
      const inbox = new Inbox();
      inbox.connect('phone', 'live-old', T); // on gw1, live
      // Gateways that died without a DISCONNECTED and never came back under their ids: each
      // live when its connection opened, silent after.
      for (let i = 1; i <= MAX_SESSIONS + 10; i++) {
        inbox.liveGateways = new Set(['gw1', `pod-${i}`]);
        inbox.run({
          kind: 'connected',
          deviceId: `d${i}`,
          gatewayId: `pod-${i}`,
          connectionId: `c${i}`,
          at: T + i,
        });
      }
      const sessions = Object.keys(inbox.meta.sessions);
      assert.equal(sessions.length, MAX_SESSIONS);
      assert.ok(sessions.includes('live-old'), 'the session on a live gateway stays');
      assert.ok(!sessions.includes('c1') && sessions.includes(`c${MAX_SESSIONS + 10}`));
      assert.ok(Object.keys(inbox.meta.devices).length <= MAX_DEVICES + 1);

      // Sessions on live gateways are never closed for the limit: their connections are open.
      const busy = new Inbox();
      for (let i = 1; i <= MAX_SESSIONS + 1; i++) busy.connect('phone', `c${i}`, T + i);
      assert.equal(Object.keys(busy.meta.sessions).length, MAX_SESSIONS + 1);
    });

    it("closes no session for the limit while the heartbeats lag (the new connection's gateway counts as silent)", () => {
      const inbox = new Inbox();
      for (let i = 1; i <= MAX_SESSIONS; i++) inbox.connect('phone', `c${i}`, T + i);
      // A broker restart holds up every gateway's heartbeats: all count as silent for a while.
      inbox.liveGateways = new Set();
      inbox.connect('phone', 'during-the-gap', T + 100);
      assert.equal(Object.keys(inbox.meta.sessions).length, MAX_SESSIONS + 1);
      assert.ok(inbox.meta.sessions.c1, 'the oldest session, whose connection is open, stays');
      // Once heard again, a gateway that really died loses its sessions at the next CONNECTED.
      inbox.liveGateways = new Set(['gw2']);
      inbox.run({
        kind: 'connected',
        deviceId: 'tablet',
        gatewayId: 'gw2',
        connectionId: 'after',
        at: T + 200,
      });
      assert.equal(Object.keys(inbox.meta.sessions).length, MAX_SESSIONS);
      assert.ok(!inbox.meta.sessions.c1 && !inbox.meta.sessions.c2 && inbox.meta.sessions.after);
    });

    it('keeps at most twice MAX_SESSIONS sessions on gateways never heard', () => {
      const inbox = new Inbox();
      inbox.liveGateways = new Set();
      // A gateway that dies at each start, under a new id each time: none is ever live.
      for (let i = 1; i <= 2 * MAX_SESSIONS + 5; i++)
        inbox.run({
          kind: 'connected',
          deviceId: 'phone',
          gatewayId: `crashing-${i}`,
          connectionId: `c${i}`,
          at: T + i,
        });
      const sessions = Object.keys(inbox.meta.sessions);
      assert.equal(sessions.length, 2 * MAX_SESSIONS);
      assert.ok(!sessions.includes('c5') && sessions.includes('c6'), 'the oldest closed');
    });

    it('takes deviceIds that name Object.prototype members as any other', () => {
      const inbox = new Inbox();
      inbox.append('m1');
      inbox.append('m2');
      const deviceIds = ['constructor', '__proto__', 'toString'];
      for (const deviceId of deviceIds) inbox.connect(deviceId, `c-${deviceId}`);
      for (const deviceId of deviceIds) {
        inbox.sync(deviceId, `c-${deviceId}`);
        assert.deepEqual(inbox.deliveredSeqs(`c-${deviceId}`), [1, 2], deviceId);
        assert.equal(inbox.meta.firstKept, 1, 'the others have not acked');
        inbox.run({ kind: 'ack', deviceId, upTo: 1, at: T });
      }
      // Stored as JSON and read back, as the store does.
      const stored = JSON.parse(JSON.stringify(inbox.meta)) as UserMeta;
      assert.deepEqual(Object.keys(stored.devices).sort(), [
        '__proto__',
        'constructor',
        'toString',
      ]);
      assert.equal(stored.firstKept, 2, 'each acked 1');
      inbox.meta = stored;
      assert.deepEqual(inbox.run({ kind: 'ack', deviceId: 'constructor', upTo: 1, at: T }), []);

      // Nor is such a device taken for known when it is new: it makes room like any other.
      const full = new Inbox();
      for (let i = 1; i <= MAX_DEVICES; i++) {
        full.connect(`d${i}`, `c${i}`, T + i);
        full.disconnect(`c${i}`);
      }
      full.connect('hasOwnProperty', 'c0', T + 100);
      assert.ok(!('d1' in full.meta.devices), 'd1 evicted');
    });

    it('keeps at most MAX_DEVICES push registrations, the latest', () => {
      const inbox = new Inbox();
      for (let i = 1; i <= MAX_DEVICES + 3; i++)
        inbox.run({
          kind: 'device-registered',
          deviceId: `d${i}`,
          pushToken: `t${i}`,
          platform: null,
        });
      inbox.run({
        kind: 'device-registered',
        deviceId: 'd5',
        pushToken: 'renewed',
        platform: null,
      });
      const registered = Object.keys(inbox.meta.push);
      assert.equal(registered.length, MAX_DEVICES);
      assert.deepEqual(registered.slice(0, 2), ['d4', 'd6'], 'd1 to d3 went; d5 was renewed');
      assert.deepEqual(inbox.meta.push.d5, { pushToken: 'renewed', platform: null });
    });

    it('never forgets a device: one gone for longer than the retention still holds back what comes after', () => {
      const inbox = new Inbox();
      inbox.connect('tablet', 'c0', T);
      inbox.connect('phone', 'c1', T); // stays connected
      inbox.append('m1', 'bob', T);
      for (const deviceId of ['tablet', 'phone'])
        inbox.run({ kind: 'ack', deviceId, upTo: 1, at: T });
      inbox.disconnect('c0');
      inbox.run({ kind: 'prune', now: T + 31 * day, retentionMs: 30 * day });
      inbox.append('m2', 'bob', T + 31 * day);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2, at: T + 31 * day });
      inbox.connect('tablet', 'c2', T + 32 * day);
      inbox.sync('tablet', 'c2');
      assert.deepEqual(
        inbox.deliveredSeqs('c2'),
        [2],
        'm2 is a day old, and the tablet never acked it',
      );
    });

    it('keeps for a device gone for longer than the retention what it never acked, until it expires', () => {
      const inbox = new Inbox();
      inbox.connect('tablet', 'c0', T);
      inbox.connect('phone', 'c1', T);
      for (let i = 1; i <= 5; i++) inbox.append(`m${i}`, 'bob', T);
      inbox.run({ kind: 'ack', deviceId: 'tablet', upTo: 5, at: T });
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 5, at: T });
      inbox.disconnect('c0');
      inbox.append('m6', 'bob', T + 10 * day);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 6, at: T + 10 * day });
      inbox.run({ kind: 'prune', now: T + 31 * day, retentionMs: 30 * day });
      inbox.connect('tablet', 'c2', T + 32 * day);
      inbox.sync('tablet', 'c2');
      assert.deepEqual(inbox.deliveredSeqs('c2'), [6], 'm6 is 22 days old');
    });
  });

  describe('a gateway that counted as silent', () => {
    /** A phone connects on gw1 as c1 and syncs from its last ack. */
    const connectPhone = (inbox: Inbox) => {
      inbox.connect('phone', 'c1');
      inbox.sync('phone', 'c1');
    };
    /** An inbox with m1 and a phone live on gw1 that has been sent m1. */
    const connectedOnGw1 = () => {
      const inbox = new Inbox();
      inbox.append('m1');
      connectPhone(inbox);
      return inbox;
    };

    it('sends its live sessions what they missed once it is heard again, in order, once', () => {
      const inbox = connectedOnGw1();
      inbox.liveGateways = new Set(['gw2']); // gw1's heartbeats held up
      inbox.append('m2');
      inbox.append('m3');
      assert.deepEqual(inbox.run({ kind: 'catch-up' }), [], 'gw1 still silent: nothing to send');
      assert.deepEqual(inbox.deliveredSeqs('c1'), [1]);
      inbox.liveGateways = new Set(['gw1', 'gw2']);
      inbox.run({ kind: 'catch-up' });
      assert.deepEqual(inbox.deliveredSeqs('c1'), [1, 2, 3]);
      assert.deepEqual(inbox.run({ kind: 'catch-up' }), [], 'a second catch-up sends nothing');
      inbox.append('m4');
      assert.deepEqual(inbox.deliveredSeqs('c1'), [1, 2, 3, 4]);
    });

    it('or with the next entry, when that comes first: the session never sees a gap', () => {
      const inbox = connectedOnGw1();
      inbox.liveGateways = new Set(['gw2']);
      inbox.append('m2');
      inbox.liveGateways = new Set(['gw1', 'gw2']);
      const events = inbox.append('m3');
      const delivered = events.filter((e) => e.type === 'delivered');
      assert.deepEqual(
        delivered.map((e) => e.type === 'delivered' && e.entries.map((x) => x.seq)),
        [[2, 3]],
      );
      assert.equal(inbox.entriesLoaded, 1, 'an append loads entries only for a session behind');
    });

    it('does not send again what the device acked meanwhile', () => {
      const inbox = connectedOnGw1();
      inbox.liveGateways = new Set(['gw2']);
      inbox.append('m2');
      inbox.append('m3');
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2, at: T }); // from another connection
      inbox.liveGateways = new Set(['gw1', 'gw2']);
      inbox.run({ kind: 'catch-up' });
      assert.deepEqual(inbox.deliveredSeqs('c1'), [1, 3]);
    });

    it('still answers a sync that came through it', () => {
      const inbox = new Inbox();
      inbox.append('m1');
      inbox.liveGateways = new Set(['gw2']);
      connectPhone(inbox);
      assert.deepEqual(inbox.deliveredSeqs('c1'), [1]);
    });
  });

  describe('receipts for an ack that covers many messages', () => {
    const N = RECEIPTED_PER_COMMAND;
    /** An inbox of `count` messages from bob, and the phone that will ack them. */
    const owing = (count: number) => {
      const inbox = new Inbox();
      inbox.connect('phone', 'c1');
      for (let i = 1; i <= count; i++) inbox.append(`m${i}`);
      return inbox;
    };

    it('owes them a command at a time, going on through the log, each once', () => {
      const inbox = owing(2 * N + 5);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2 * N + 5, at: T });
      assert.equal(inbox.receiptsOwed().length, N);
      assert.equal(inbox.meta.devices.phone!.ack, 2 * N + 5, 'the ack itself is applied at once');
      assert.equal(inbox.meta.firstKept, N + 1, 'nothing pruned whose receipt is still owed');
      assert.equal(inbox.loop(), 2);
      assert.deepEqual(
        inbox.receiptsOwed(),
        Array.from({ length: 2 * N + 5 }, (_, i) => `m${i + 1}`),
      );
      assert.equal(inbox.meta.receiptedUpTo, 2 * N + 5);
      assert.equal(inbox.meta.firstKept, 2 * N + 6, 'all pruned once owed');
      assert.ok(inbox.mostLoaded <= N, `${inbox.mostLoaded} entries read by one command`);
      assert.equal(inbox.loop(), 0);
    });

    it('prunes no expired entry whose receipt is still owed', () => {
      const inbox = owing(2 * N + 5);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2 * N + 5, at: T });
      // Every entry expired; the prune walk comes before the loop.
      inbox.run({ kind: 'prune', now: T + 40 * DAY, retentionMs: 30 * DAY });
      assert.equal(inbox.meta.firstKept, N + 1);
      inbox.loop();
      assert.equal(inbox.receiptsOwed().length, 2 * N + 5, 'each once');
      assert.equal(inbox.meta.firstKept, 2 * N + 6);
    });

    it('starts the chain again at the prune walk when the continued ack was lost', () => {
      const inbox = owing(2 * N + 5);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2 * N + 5, at: T });
      // A processor of an earlier version read it and dropped it.
      inbox.looped.length = 0;
      // It may still be on its way for a while: the walk leaves it be, and watches.
      inbox.run({ kind: 'prune', now: T + 1, retentionMs: 30 * DAY });
      assert.equal(inbox.looped.length, 0);
      inbox.run({ kind: 'prune', now: T + RECEIPTS_RESTART_MS, retentionMs: 30 * DAY });
      assert.equal(inbox.looped.length, 0, 'not a minute yet');
      inbox.run({ kind: 'prune', now: T + 1 + RECEIPTS_RESTART_MS, retentionMs: 30 * DAY });
      assert.equal(inbox.looped.length, 1, 'a minute without moving on');
      // And once restarted, not again for as long.
      inbox.run({ kind: 'prune', now: T + 2 + RECEIPTS_RESTART_MS, retentionMs: 30 * DAY });
      assert.equal(inbox.looped.length, 1);
      inbox.loop();
      assert.equal(inbox.receiptsOwed().length, 2 * N + 5, 'each once');
      assert.equal(inbox.meta.receiptedUpTo, 2 * N + 5);
      // Nothing owed: the walk starts no chain.
      inbox.run({ kind: 'prune', now: T + 3 * RECEIPTS_RESTART_MS, retentionMs: 30 * DAY });
      assert.equal(inbox.looped.length, 0);
    });

    it("restarts a lost chain by the walk's clock, whatever clock the ack came with", () => {
      const inbox = owing(2 * N + 5);
      // A gateway a year ahead, then the continued ack lost.
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2 * N + 5, at: T + 365 * DAY });
      inbox.looped.length = 0;
      inbox.run({ kind: 'prune', now: T, retentionMs: 30 * DAY });
      inbox.run({ kind: 'prune', now: T + RECEIPTS_RESTART_MS, retentionMs: 30 * DAY });
      assert.equal(inbox.looped.length, 1);
      inbox.loop();
      assert.equal(inbox.receiptsOwed().length, 2 * N + 5, 'each once');
    });

    it('restarts no chain that moves on, however slowly', () => {
      const inbox = owing(3 * N + 5);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 3 * N + 5, at: T });
      // The processor lags: each link is read minutes after the one before.
      for (let minute = 1; inbox.looped.length > 0; minute++) {
        inbox.run({
          kind: 'prune',
          now: T + minute * 3 * RECEIPTS_RESTART_MS,
          retentionMs: 30 * DAY,
        });
        assert.equal(inbox.looped.length, 1, 'one chain');
        inbox.run(inbox.looped.shift()!);
      }
      assert.equal(inbox.receiptsOwed().length, 3 * N + 5, 'each once');
    });

    it('owes, after a lost chain, what a device folded into the placeholder had acked', () => {
      const inbox = owing(2 * N + 5);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2 * N + 5, at: T });
      inbox.looped.length = 0;
      // A meta from before the owing device was kept from eviction: the phone went into it.
      inbox.disconnect('c1');
      const devices: UserMeta['devices'] = { [EVICTED]: { ack: 2 * N + 5, seenAt: T } };
      for (let i = 1; i < MAX_DEVICES; i++) devices[`d${i}`] = { ack: N, seenAt: T + i };
      const { highestAck: _kept, ...legacy } = inbox.meta; // nor was the highest ack kept
      inbox.meta = { ...legacy, devices };
      // New devices: the placeholder takes in lower acks, and the highest is kept apart.
      inbox.connect('newcomer', 'c2', T + 1);
      inbox.connect('another', 'c3', T + 2);
      assert.equal(inbox.meta.devices[EVICTED]!.ack, N);
      assert.deepEqual(inbox.meta.highestAck, { deviceId: EVICTED, upTo: 2 * N + 5 });
      for (const now of [T + 31 * DAY, T + 31 * DAY + RECEIPTS_RESTART_MS]) {
        inbox.run({ kind: 'prune', now, retentionMs: 30 * DAY });
        assert.equal(inbox.meta.firstKept, N + 1, 'nothing expires whose receipt is owed');
      }
      assert.deepEqual(
        inbox.looped.map((c) => c.kind === 'ack' && [c.deviceId, c.upTo]),
        [[EVICTED, 2 * N + 5]],
      );
      inbox.loop();
      assert.equal(inbox.receiptsOwed().length, 2 * N + 5, 'each once');
    });

    it('owes up to a device ack above the highest kept (an earlier version applied it)', () => {
      const inbox = owing(2 * N + 5);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 3, at: T });
      // A processor of an earlier version applied the phone's next ack, and dropped its chain.
      inbox.meta = {
        ...inbox.meta,
        devices: { phone: { ack: 2 * N + 5, seenAt: T + 1 } },
        receiptedUpTo: N,
      };
      assert.deepEqual(inbox.meta.highestAck, { deviceId: 'phone', upTo: 3 }, 'left behind');
      inbox.run({ kind: 'prune', now: T + 2, retentionMs: 30 * DAY });
      inbox.run({ kind: 'prune', now: T + 2 + RECEIPTS_RESTART_MS, retentionMs: 30 * DAY });
      assert.deepEqual(
        inbox.looped.map((c) => c.kind === 'ack' && [c.deviceId, c.upTo, c.continued]),
        [['phone', 2 * N + 5, true]],
      );
      inbox.loop();
      assert.equal(inbox.meta.receiptedUpTo, 2 * N + 5);
      assert.equal(inbox.receiptsOwed().length, 2 * N + 5 - N + 3, 'each once');
    });

    it('is no ack of the device it names: it moves no ack and evicts no one', () => {
      const inbox = owing(2 * N + 5);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2 * N + 5, at: T });
      inbox.connect('laptop', 'c2', T + 1);
      inbox.run({ kind: 'ack', deviceId: 'laptop', upTo: 3, at: T + 1 });
      inbox.disconnect('c2');
      for (let i = 3; i <= MAX_DEVICES; i++) {
        inbox.connect(`d${i}`, `c-d${i}`, T + i);
        inbox.disconnect(`c-d${i}`);
      }
      const devices = structuredClone(inbox.meta.devices);
      assert.equal(Object.keys(devices).length, MAX_DEVICES);
      // Crafted, or from a chain of an evicted device: names a device it did not come from.
      for (const deviceId of ['laptop', 'stranger'])
        inbox.run({ kind: 'ack', deviceId, upTo: 2 * N + 5, continued: true, at: T + 100 });
      assert.deepEqual(inbox.meta.devices, devices, 'no ack raised, no device added or evicted');
      inbox.loop();
      assert.equal(inbox.receiptsOwed().length, 2 * N + 5, 'each once');
    });

    it('sees a lost chain after the device whose receipts are owed was evicted', () => {
      const inbox = new Inbox();
      inbox.connect('old', 'c0'); // the first evicted: the placeholder gets its ack of 0
      inbox.disconnect('c0');
      inbox.connect('phone', 'c1');
      for (let i = 1; i <= 2 * N + 5; i++) inbox.append(`m${i}`);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2 * N + 5, at: T + 1 });
      inbox.disconnect('c1');
      inbox.looped.length = 0; // the continued ack lost
      for (let i = 1; i <= MAX_DEVICES; i++) {
        inbox.connect(`d${i}`, `c-d${i}`, T + 1 + i);
        inbox.disconnect(`c-d${i}`);
      }
      assert.equal(inbox.meta.devices.phone, undefined, 'the phone is evicted like any other');
      assert.equal(Object.keys(inbox.meta.devices).length, MAX_DEVICES + 1);
      assert.deepEqual(inbox.meta.highestAck, { deviceId: 'phone', upTo: 2 * N + 5 });
      // Everything expires meanwhile; the walk comes by now and then.
      for (let visit = 1; visit <= 40; visit++) {
        inbox.run({
          kind: 'prune',
          now: T + 31 * DAY + visit * RECEIPTS_RESTART_MS,
          retentionMs: 30 * DAY,
        });
        inbox.loop();
      }
      assert.equal(inbox.receiptsOwed().length, 2 * N + 5, 'each once');
    });

    it('owes nothing for entries that expired before any device acked them', () => {
      const inbox = owing(2 * N + 5);
      inbox.disconnect('c1');
      // The phone never acks; everything expires, a slice per visit of the walk.
      for (let visit = 0; inbox.meta.firstKept <= 2 * N + 5 && visit < 1_000; visit++)
        inbox.run({ kind: 'prune', now: T + 40 * DAY, retentionMs: 30 * DAY });
      assert.equal(inbox.meta.firstKept, 2 * N + 6);
      inbox.append('fresh', 'bob', T + 40 * DAY);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: 2 * N + 6, at: T + 40 * DAY });
      assert.deepEqual(inbox.receiptsOwed(), ['fresh']);
      assert.equal(inbox.looped.length, 0, 'no chain over what expired');
    });

    it('never lowers an ack raised meanwhile', () => {
      const inbox = owing(N + 10);
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: N + 5, at: T });
      inbox.append('m-new');
      inbox.run({ kind: 'ack', deviceId: 'phone', upTo: N + 11, at: T + 1 }); // before the loop
      inbox.loop();
      assert.equal(inbox.meta.devices.phone!.ack, N + 11);
      assert.equal(new Set(inbox.receiptsOwed()).size, N + 11);
      assert.equal(inbox.receiptsOwed().length, N + 11, 'each once');
    });
  });

  describe('replays in parts', () => {
    const N = REPLAY_PART_ENTRIES;
    const range = (from: number, to: number) =>
      Array.from({ length: to - from + 1 }, (_, i) => from + i);
    /** An inbox of `count` messages, and the phone connected on c1 and synced. */
    const backAfter = (count: number) => {
      const inbox = new Inbox();
      for (let i = 1; i <= count; i++) inbox.append(`m${i}`);
      inbox.connect('phone', 'c1');
      inbox.sync('phone', 'c1');
      return inbox;
    };

    it('sends a part, waits for the gateway to ask for the next, and goes live at the head', () => {
      const inbox = backAfter(2 * N + 10);
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, N));
      assert.deepEqual(inbox.partEnds('c1'), [N]);
      assert.deepEqual(inbox.meta.sessions.c1, {
        deviceId: 'phone',
        gatewayId: 'gw1',
        live: false,
        connectedAt: T,
        resumeAfter: N,
      });
      // Meanwhile a new entry waits: delivered live it would come before the ones still owed.
      inbox.append('late');
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, N));
      inbox.continued('c1', N);
      inbox.continued('c1', 2 * N);
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, 2 * N + 11));
      assert.deepEqual(inbox.partEnds('c1'), [N, 2 * N], 'the last part is not marked');
      const { live, sentUpTo, resumeAfter } = inbox.meta.sessions.c1 as Session;
      assert.deepEqual(
        { live, sentUpTo, resumeAfter },
        {
          live: true,
          sentUpTo: 2 * N + 11,
          resumeAfter: undefined,
        },
      );
      inbox.append('live again');
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, 2 * N + 12));
    });

    it('reads at most a part of the inbox for a replay', () => {
      const inbox = backAfter(3 * N);
      const sync = { kind: 'sync', deviceId: 'phone', connectionId: 'c1', at: T } as const;
      assert.deepEqual(entriesNeeded({ ...sync, after: 0 }, inbox.meta, inbox.liveGateways), [
        { from: 1, to: N + 1 },
      ]);
      assert.deepEqual(
        entriesNeeded({ ...sync, after: N, continued: true }, inbox.meta, inbox.liveGateways),
        [{ from: N + 1, to: 2 * N + 1 }],
      );
      assert.deepEqual(
        entriesNeeded({ ...sync, after: 7, continued: true }, inbox.meta, inbox.liveGateways),
        [],
        'a continued Sync the session does not wait at reads nothing',
      );
    });

    it('drops a continued Sync the session does not wait at: repeated, stale, or closed', () => {
      const inbox = backAfter(3 * N);
      assert.deepEqual(inbox.continued('c1', N - 1), [], 'not where the part ended');
      inbox.continued('c1', N);
      assert.deepEqual(inbox.continued('c1', N), [], 'a repeat of the one just served');
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, 2 * N));
      inbox.disconnect('c1');
      assert.deepEqual(inbox.continued('c1', 2 * N), [], 'the connection closed');
      assert.deepEqual(inbox.continued('c9', 0), [], 'a connection never seen');
    });

    it("restarts from a client's sync during a replay, and the parts follow from there", () => {
      const inbox = backAfter(3 * N);
      inbox.sync('phone', 'c1', 10); // the client found it wants everything above 10 again
      assert.deepEqual(inbox.deliveredSeqs('c1'), [...range(1, N), ...range(11, N + 10)]);
      assert.deepEqual(inbox.continued('c1', N), [], "the first part's ask comes too late");
      inbox.continued('c1', N + 10);
      inbox.continued('c1', 2 * N + 10);
      assert.deepEqual(inbox.deliveredSeqs('c1').slice(N), range(11, 3 * N));
      assert.equal(inbox.meta.sessions.c1!.live, true);
    });

    it('bounds a part by bytes too, with one entry at least', () => {
      const big = (i: number) => message(`b${i}`, 'bob', ALICE, JSON.stringify('x'.repeat(16_000)));
      const inbox = new Inbox();
      for (let i = 1; i <= 40; i++)
        inbox.run({ kind: 'append', entry: big(i), dedupKey: `m:b${i}`, at: T });
      inbox.connect('phone', 'c1');
      inbox.sync('phone', 'c1');
      const perPart = inbox.deliveredSeqs('c1').length;
      assert.ok(perPart > 1 && perPart * 16_000 <= REPLAY_PART_BYTES, `${perPart} entries`);
      for (let round = 0; round < 40 && !inbox.meta.sessions.c1!.live; round++)
        inbox.continued('c1', inbox.meta.sessions.c1!.resumeAfter!);
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, 40));
    });

    it('bounds a part by what every kind of entry weighs: group notices list their members', () => {
      const members = Array.from({ length: 500 }, (_, i) => ({
        userId: `member-${String(i).padStart(28, '0')}`,
        role: 'member' as const,
      }));
      const inbox = new Inbox();
      for (let i = 1; i <= 40; i++)
        inbox.run({
          kind: 'append',
          entry: {
            'chat.v1.GroupEvent': {
              groupId: `g${i}`,
              version: 1,
              by: 'bob',
              at: T,
              change: { 'chat.v1.GroupCreated': { name: `group ${i}`, members } },
            },
          },
          dedupKey: `g:g${i}:1`,
          at: T,
        });
      inbox.connect('phone', 'c1');
      inbox.sync('phone', 'c1');
      const part = inbox.sent.find((e) => e.type === 'delivered');
      assert.ok(part?.type === 'delivered');
      const bytes = part.entries.reduce((n, e) => n + Buffer.byteLength(JSON.stringify(e)), 0);
      assert.ok(bytes <= REPLAY_PART_BYTES, `${part.entries.length} entries, ${bytes} bytes`);
      assert.ok(part.entries.length > 1);
    });

    it('catches up two sessions far apart, each from where it is, without a gap', () => {
      const inbox = backAfter(0); // the phone live on gw1 at 0
      inbox.liveGateways = new Set(['gw2']); // gw1's heartbeats held up
      for (let i = 1; i <= N + 44; i++) inbox.append(`m${i}`); // the phone misses them
      // The tablet connects through gw1 meanwhile, and gets its replay whole.
      inbox.connect('tablet', 'c2');
      inbox.sync('tablet', 'c2');
      for (let round = 0; round < 10 && !inbox.meta.sessions.c2!.live; round++)
        inbox.continued('c2', inbox.meta.sessions.c2!.resumeAfter!, 'tablet');
      for (let i = N + 45; i <= N + 64; i++) inbox.append(`m${i}`); // both miss these
      inbox.liveGateways = new Set(['gw1', 'gw2']);
      const needed = entriesNeeded({ kind: 'catch-up' }, inbox.meta, inbox.liveGateways);
      assert.deepEqual(needed, [
        { from: 1, to: N + 1 },
        { from: N + 45, to: N + 65 },
      ]);
      inbox.run({ kind: 'catch-up' });
      assert.deepEqual(inbox.deliveredSeqs('c2'), range(1, N + 64), 'the tablet, at once');
      inbox.continued('c1', N);
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, N + 64), 'the phone, in two parts');
    });

    it('catches up a session whose gateway was silent in parts too', () => {
      const inbox = backAfter(1);
      inbox.liveGateways = new Set(['gw2']);
      for (let i = 2; i <= N + 5; i++) inbox.append(`m${i}`);
      inbox.liveGateways = new Set(['gw1', 'gw2']);
      inbox.run({ kind: 'catch-up' });
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, N + 1));
      assert.equal(inbox.meta.sessions.c1!.resumeAfter, N + 1);
      inbox.append('next'); // waits: the session is paced
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, N + 1));
      inbox.continued('c1', N + 1);
      assert.deepEqual(inbox.deliveredSeqs('c1'), range(1, N + 6));
      assert.equal(inbox.meta.sessions.c1!.live, true);
    });
  });

  it('asks for a push on every registered device when no device is online', () => {
    const inbox = new Inbox();
    inbox.run({
      kind: 'device-registered',
      deviceId: 'phone',
      pushToken: 't1',
      platform: 'android',
    });
    inbox.run({ kind: 'device-registered', deviceId: 'tablet', pushToken: 't2', platform: null });
    const events = inbox.append('m1', 'bob');
    const push = events.find((e) => e.type === 'push-requested');
    assert.ok(push && push.type === 'push-requested');
    assert.deepEqual(
      push.request.devices.map((d) => d.pushToken),
      ['t1', 't2'],
    );
    assert.equal(push.request.notification.body, 'hi m1');
    inbox.connect('phone', 'c1');
    assert.ok(
      !inbox.append('m2', 'bob').some((e) => e.type === 'push-requested'),
      'online: no push',
    );
  });
});

/**
 * Random runs of the commands a replay meets (appends, connects and syncs in either order,
 * disconnects, gateways going silent and coming back, acks, prunes, client syncs), with the
 * gateway's asks for the next part answered late, out of order and twice. On every connection
 * an entry never comes past a gap, and once the gateways are all heard and every ask answered,
 * every open connection has everything and none waits for a part.
 */
describe('users actor: replays under random commands', () => {
  for (let seed = 1; seed <= 20; seed++) {
    it(`keeps every connection gapless and finishes every replay (seed ${seed})`, () => {
      const random = seededRandom(seed);
      const pick = <V>(values: V[]) => values[Math.floor(random() * values.length)]!;
      const inbox = new Inbox();
      const devices = ['phone', 'tablet', 'laptop'];
      /** Open connections: their device, and the highest seq each has seen. */
      const open = new Map<string, { deviceId: string; seen: number }>();
      let asks: Array<{ connectionId: string; after: number }> = [];
      let connections = 0;
      let now = T;
      const run = (command: UserCommand) => {
        const before = inbox.meta;
        const events = inbox.run(command);
        for (const event of events) {
          if (event.type !== 'delivered') continue;
          for (const { connectionId, deviceId } of event.targets) {
            const connection = open.get(connectionId);
            if (!connection) continue;
            // A connection may see entries again (a replay), never one past a gap: what lies
            // between was pruned, or its device had acked it.
            const floor = Math.max(
              connection.seen,
              before.firstKept - 1,
              before.devices[deviceId]?.ack ?? 0,
            );
            for (const entry of event.entries) {
              if (entry.seq > Math.max(floor, connection.seen) + 1)
                assert.fail(`${connectionId} got ${entry.seq} after ${connection.seen} (${floor})`);
              connection.seen = Math.max(connection.seen, entry.seq);
            }
            if (event.more) asks.push({ connectionId, after: event.entries.at(-1)!.seq });
          }
        }
      };
      const bigBody = (n: number) =>
        message(
          `m${n}`,
          'bob',
          ALICE,
          JSON.stringify('x'.repeat(random() < 0.3 ? 20 : 16_000)),
          now,
        );
      let messages = 0;
      for (let step = 0; step < 600; step++) {
        now += Math.floor(random() * 60_000);
        const r = random();
        if (r < 0.45) {
          // Now and then a burst: more than a part's worth of entries behind a silent gateway.
          const count = random() < 0.05 ? 100 + Math.floor(random() * 300) : 1;
          for (let i = 0; i < count; i++) {
            messages++;
            const entry = bigBody(messages);
            run({ kind: 'append', entry, dedupKey: `m:m${messages}`, at: now });
          }
        } else if (r < 0.52) {
          const connectionId = `c${++connections}`;
          const deviceId = pick(devices);
          const gatewayId = pick(['gw1', 'gw2']);
          open.set(connectionId, { deviceId, seen: 0 });
          const connected: UserCommand = {
            kind: 'connected',
            deviceId,
            gatewayId,
            connectionId,
            at: now,
          };
          const sync: UserCommand = {
            kind: 'sync',
            deviceId,
            connectionId,
            after: FROM_ACK,
            at: now,
          };
          // Different topics: either may come first.
          for (const command of random() < 0.5 ? [connected, sync] : [sync, connected])
            run(command);
        } else if (r < 0.55 && open.size > 0) {
          const connectionId = pick([...open.keys()]);
          open.delete(connectionId);
          asks = asks.filter((a) => a.connectionId !== connectionId);
          run({ kind: 'disconnected', connectionId, at: now });
        } else if (r < 0.75 && asks.length > 0) {
          // The gateway asks, late and in any order; sometimes twice.
          const i = Math.floor(random() * asks.length);
          const ask = asks[i]!;
          if (random() < 0.8) asks.splice(i, 1);
          const deviceId = open.get(ask.connectionId)?.deviceId ?? 'phone';
          run({ kind: 'sync', deviceId, ...ask, continued: true, at: now });
        } else if (r < 0.82 && open.size > 0) {
          const [connectionId, { deviceId, seen }] = pick([...open.entries()]);
          if (random() < 0.3)
            run({
              kind: 'sync',
              deviceId,
              connectionId,
              after: Math.floor(random() * seen),
              at: now,
            });
          else run({ kind: 'ack', deviceId, upTo: seen, at: now });
        } else if (r < 0.84) {
          inbox.liveGateways = new Set(['gw1', 'gw2'].filter(() => random() < 0.7));
        } else if (r < 0.92) {
          run({ kind: 'catch-up' });
        } else {
          run({ kind: 'prune', now, retentionMs: 30 * DAY });
        }
        // The looped acks of long receipts, as the log would bring them.
        while (inbox.looped.length > 0) run(inbox.looped.shift()!);
      }
      // Every gateway heard again, every ask answered.
      inbox.liveGateways = new Set(['gw1', 'gw2']);
      run({ kind: 'catch-up' });
      for (let round = 0; asks.length > 0 && round < 10_000; round++) {
        const { connectionId, after } = asks.shift()!;
        const deviceId = open.get(connectionId)!.deviceId;
        run({ kind: 'sync', deviceId, connectionId, after, continued: true, at: now });
      }
      // Receipts: each once, and every one owed that an ack called for (what expired before
      // any device acked it owes none).
      const owed = inbox.receiptsOwed();
      assert.equal(new Set(owed).size, owed.length, 'a receipt owed twice');
      const topAck = Math.max(0, ...Object.values(inbox.meta.devices).map((d) => d.ack));
      const { receiptedUpTo, firstKept } = inbox.meta;
      assert.ok(
        Math.max(receiptedUpTo, firstKept - 1) >= topAck,
        `receipts stop at ${receiptedUpTo}`,
      );
      const head = inbox.meta.nextSeq - 1;
      for (const [connectionId, { deviceId, seen }] of open) {
        const session = inbox.meta.sessions[connectionId];
        if (!session) continue; // closed for the session limit
        assert.equal(session.resumeAfter, undefined, `${connectionId} waits for a part`);
        assert.equal(session.live, true, `${connectionId} is live`);
        const has = Math.max(seen, inbox.meta.devices[deviceId]?.ack ?? 0);
        assert.ok(has >= head || head < inbox.meta.firstKept, `${connectionId}: ${has} of ${head}`);
      }
    });
  }
});

/**
 * `delivered` receipts under random commands, message by message: appends in bursts past what
 * one ack owes, acks of any device, devices past MAX_DEVICES evicted, expiry, prune walks, and
 * the actor's continued acks read late, twice, or lost (an earlier version dropped them).
 * Whatever the order: no receipt owed twice, none owed for a message no device acked, no acked
 * entry pruned before its receipt was owed, no continued ack that changes the devices, no more
 * than MAX_DEVICES devices remembered while fewer are connected; and once
 * the walk has come by, every message a device acked while it was kept has its receipt.
 * SEEDS=n runs n seeds instead of 30.
 */
describe('users actor: receipts under random commands', () => {
  for (let seed = 1; seed <= Number(process.env.SEEDS ?? 30); seed++) {
    it(`owes each acked message's receipt once, whatever is lost or late (seed ${seed})`, () => {
      const random = seededRandom(seed);
      const pick = <V>(list: V[]) => list[Math.floor(random() * list.length)]!;
      const inbox = new Inbox();
      const seqOf = new Map<string, number>();
      const acked = new Set<number>(); // messages a device acked while they were kept
      const owed = new Map<number, number>(); // receipts owed, by seq
      const devices = pick([1, 3, 90]);
      const open = new Map<string, string>(); // connectionId → deviceId
      let now = T;
      let messages = 0;
      let connections = 0;
      // An ack's time is its gateway's: some run behind, some ahead, one a year ahead.
      const gatewayNow = () => now + pick([0, 0, 0, -600_000, 600_000, 365 * DAY]);

      const run = (command: UserCommand) => {
        const kept = inbox.entries.slice();
        const devicesBefore = JSON.stringify(inbox.meta.devices);
        for (const event of inbox.run(command)) {
          if (event.type === 'entry-appended')
            seqOf.set(messageIdOf(event.entry)!, event.entry.seq);
          if (event.type === 'acked')
            for (const entry of kept)
              if (entry.seq <= event.upTo && messageIdOf(entry)?.startsWith('bob-'))
                acked.add(entry.seq);
          if (event.type === 'receipt-owed' && event.receipt.status === 'delivered') {
            const seq = seqOf.get(event.receipt.messageId)!;
            owed.set(seq, (owed.get(seq) ?? 0) + 1);
            assert.equal(owed.get(seq), 1, `seq ${seq}: a receipt owed twice`);
            assert.ok(acked.has(seq), `seq ${seq}: a receipt owed with no ack`);
          }
          if (event.type === 'pruned')
            for (const entry of kept)
              if (entry.seq < event.below && acked.has(entry.seq))
                assert.ok(owed.has(entry.seq), `seq ${entry.seq} pruned before its receipt`);
        }
        if (command.kind === 'ack' && command.continued)
          assert.equal(JSON.stringify(inbox.meta.devices), devicesBefore, 'a continued ack');
        // Past MAX_DEVICES only while more than that are connected.
        const connected = new Set(Object.values(inbox.meta.sessions).map((s) => s.deviceId));
        const known = Object.keys(inbox.meta.devices).filter((id) => id !== EVICTED);
        assert.ok(known.length <= Math.max(MAX_DEVICES, connected.size + 1), 'devices remembered');
      };
      const connect = (deviceId: string) => {
        const connectionId = `c${++connections}`;
        run({ kind: 'connected', deviceId, gatewayId: 'gw1', connectionId, at: now });
        return connectionId;
      };

      for (let step = 0; step < 400; step++) {
        now += Math.floor(random() * (random() < 0.08 ? 40 * DAY : 600_000));
        const r = random();
        if (r < 0.3) {
          // Now and then more than one ack owes receipts for at once.
          const count = random() < 0.1 ? 500 + Math.floor(random() * 1_500) : 1;
          for (let i = 0; i < count; i++) {
            const id = `${random() < 0.05 ? ALICE : 'bob'}-${++messages}`;
            run({ kind: 'append', entry: message(id, id.split('-')[0]!), dedupKey: id, at: now });
          }
        } else if (r < 0.33 && devices > 50) {
          // New devices, enough to evict: each connects, may ack, and goes.
          for (let i = Math.floor(random() * 2 * MAX_DEVICES); i > 0; i--) {
            const deviceId = `new${connections}`;
            const connectionId = connect(deviceId);
            if (random() < 0.5)
              run({
                kind: 'ack',
                deviceId,
                upTo: Math.floor(random() * inbox.meta.nextSeq),
                at: gatewayNow(),
              });
            run({ kind: 'disconnected', connectionId, at: now });
          }
        } else if (r < 0.45) {
          const deviceId = `d${Math.floor(random() * devices)}`;
          open.set(connect(deviceId), deviceId);
        } else if (r < 0.55 && open.size > 0) {
          const connectionId = pick([...open.keys()]);
          open.delete(connectionId);
          run({ kind: 'disconnected', connectionId, at: now });
        } else if (r < 0.75) {
          const deviceId =
            open.size > 0 && random() < 0.8
              ? pick([...open.values()])
              : `d${Math.floor(random() * devices)}`;
          run({
            kind: 'ack',
            deviceId,
            upTo: Math.floor(random() * (inbox.meta.nextSeq + 5)),
            at: gatewayNow(),
          });
        } else if (r < 0.85) {
          // A visit of the walk: a few prunes in a row.
          for (let i = 1 + Math.floor(random() * 20); i > 0; i--)
            run({ kind: 'prune', now, retentionMs: 30 * DAY });
        } else if (inbox.looped.length > 0) {
          // A continued ack: read, read twice, or lost.
          const i = Math.floor(random() * inbox.looped.length);
          const command = inbox.looped[i]!;
          const fate = random();
          if (fate >= 0.1 && fate < 0.2) run(command);
          else inbox.looped.splice(i, 1);
          if (fate >= 0.1) run(command);
        }
      }
      // What is on its way is read; the walk comes by, after a while, and starts what was lost.
      for (let visit = 0; visit < 5; visit++) {
        while (inbox.looped.length > 0) run(inbox.looped.shift()!);
        now += RECEIPTS_RESTART_MS;
        run({ kind: 'prune', now, retentionMs: 30 * DAY });
      }
      while (inbox.looped.length > 0) run(inbox.looped.shift()!);
      const missing = [...acked].filter((seq) => !owed.has(seq));
      assert.deepEqual(missing.slice(0, 5), [], `${missing.length} acked messages owe no receipt`);
    });
  }
});

// The gateway writes a connection's CONNECTED (chat.connections) and its Sync FROM_ACK
// (chat.user-commands) in one produce, then `ready`: the actor may read the Sync first.
describe('users actor: a Sync read before its CONNECTED', () => {
  it("registers its device at once: another device's ack behind the Sync prunes nothing it has not got", () => {
    const inbox = new Inbox();
    inbox.connect('laptop', 'c1');
    inbox.sync('laptop', 'c1');
    for (const id of ['m1', 'm2', 'm3']) inbox.append(id);
    assert.deepEqual(inbox.deliveredSeqs('c1'), [1, 2, 3]);
    // The phone, new, connects: its Sync is read, then the laptop's ack, then its CONNECTED.
    inbox.sync('phone', 'c2');
    inbox.run({ kind: 'ack', deviceId: 'laptop', upTo: 3, at: T });
    inbox.connect('phone', 'c2');
    assert.deepEqual(inbox.deliveredSeqs('c2'), [1, 2, 3], 'every entry kept when it connected');
  });

  it(`does not evict its device past MAX_DEVICES (${MAX_DEVICES}) before the CONNECTED`, () => {
    const inbox = new Inbox();
    for (const id of ['m1', 'm2', 'm3']) inbox.append(id);
    for (let i = 0; i < MAX_DEVICES; i++) {
      inbox.connect(`d${i}`, `old${i}`, T + i);
      inbox.disconnect(`old${i}`);
    }
    inbox.run({ kind: 'ack', deviceId: 'd0', upTo: 2, at: T });
    // d0, the least recently seen, reconnects (its Sync, stamped before the others were last
    // seen, is read first); a new device's CONNECTED comes before d0's.
    inbox.run({ kind: 'sync', deviceId: 'd0', connectionId: 'c0', after: FROM_ACK, at: T - 1 });
    inbox.connect('newcomer', 'c-new', T + 1_000);
    inbox.connect('d0', 'c0', T + 1_000);
    assert.deepEqual(inbox.deliveredSeqs('c0'), [3], 'resumed after its applied ack of 2');
  });

  it(`replays for a connection whose Sync was pushed out past MAX_PENDING_SYNCS (${MAX_PENDING_SYNCS})`, () => {
    const inbox = new Inbox();
    inbox.append('m1');
    const ids = Array.from({ length: MAX_PENDING_SYNCS + 1 }, (_, i) => `c${i}`);
    for (const [i, c] of ids.entries()) inbox.sync(`dev${i}`, c);
    assert.equal(Object.keys(inbox.meta.pendingSyncs).length, MAX_PENDING_SYNCS);
    for (const [i, c] of ids.entries()) inbox.connect(`dev${i}`, c);
    inbox.append('m2');
    for (const c of ids) assert.deepEqual(inbox.deliveredSeqs(c), [1, 2], c);
    assert.deepEqual(inbox.meta.droppedSyncs, [], 'forgotten once its CONNECTED is read');
  });
});
