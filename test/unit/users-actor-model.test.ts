/**
 * Model-based randomized test of the users actor: the real InboxProcessor of
 * processors/users/topology.ts (and so the decider through it), on in-memory stores that
 * round-trip their values through JSON as RocksDB's serde does, fed what gateways, clients and
 * the actor itself would write, with the three source topics of one user read in any
 * interleaving (each in its own order). A small reference model of each inbox, device and
 * connection checks the client-visible guarantees after every record and every tick:
 *
 * - seq gapless, strictly increasing, per inbox; no dedup key twice in an inbox;
 * - on every connection, entries in seq order, never past a gap (except what the device acked
 *   or was pruned), consecutive within one record's output; no live entry to a silent gateway;
 * - at quiescence (every gateway heard, every queue drained, every replay part asked for), every
 *   open synced connection has every kept entry above its device's ack, and is live;
 * - nothing pruned that a known device did not ack, unless expired;
 * - `delivered` receipts at most once per (message, recipient), only for a message an ack
 *   covered, to its sender, never for one's own; and at quiescence, one for every message an ack
 *   covered while it was kept;
 * - `read` receipts only for a message of another user in the reader's inbox; refusal only for
 *   one that is not;
 * - typing relayed only to live sessions on live gateways, never stored, changing nothing;
 * - DISCONNECTED removes exactly the session it names;
 * - no session left for a connection of an earlier run of a restarted gateway;
 * - no push while a session of the user is on a live gateway;
 * - nothing throws.
 *
 * A second part drives the pure decider: evolve over every event emitted equals the state the
 * processor keeps; decide neither mutates its view nor depends on the JSON round trip.
 *
 * 300 seeds by default (about 20 s; a review ran 2,000 clean). SEEDS=n STEPS=m to change the
 * bounds; SEED=k to run one seed (with its trace on failure). Written by a review helper
 * (session 18), which found the connectionId lookups that resolved `toString` or `constructor`
 * on Object.prototype (the odd-input test).
 */
import assert from 'node:assert/strict';
import { branchOf } from '../../schemas/avro.ts';
import { usersTopology, DEFAULT_RETENTION_MS } from '../../processors/users/topology.ts';
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
import type {
  Delivery,
  InboxCommand,
  InboxEntry,
  UserCommand as UserCommandRecord,
} from '../../schemas/types.generated.ts';
import type { KeyValueStore, ScanSlice } from '../../state/store.ts';
import type {
  Processor,
  ProcessorContext,
  Record as Rec,
} from '../../processors/runtime/topology.ts';
import { seededRandom } from '../support/random.ts';

const DAY = 86_400_000;
const T0 = 1_800_000_000_000;
const RETENTION = DEFAULT_RETENTION_MS;

/** A store whose values go through JSON, as the RocksDB serde's do. */
class JsonStore<V> implements KeyValueStore<V> {
  readonly data = new Map<string, string>();
  constructor(readonly name: string) {}
  async get(key: string) {
    const v = this.data.get(key);
    return v === undefined ? undefined : (JSON.parse(v) as V);
  }
  getNow(key: string): V | undefined {
    const v = this.data.get(key);
    return v === undefined ? undefined : (JSON.parse(v) as V);
  }
  private keys: string[] | undefined;
  put(key: string, value: V) {
    if (!this.data.has(key)) this.keys = undefined;
    const text = JSON.stringify(value, (k, v) => {
      if (typeof v === 'number' && !Number.isFinite(v))
        throw new Error(`${this.name}: ${k} is ${v}, not JSON-safe`);
      return v as unknown;
    });
    this.data.set(key, text);
  }
  delete(key: string) {
    if (this.data.delete(key)) this.keys = undefined;
  }
  private sorted() {
    this.keys ??= [...this.data.keys()].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));
    return this.keys;
  }
  async range(from: string, to: string) {
    const keys = this.sorted();
    let lo = 0;
    let hi = keys.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (keys[mid]! < from) lo = mid + 1;
      else hi = mid;
    }
    const out: string[] = [];
    for (let i = lo; i < keys.length && keys[i]! < to; i++) out.push(keys[i]!);
    return out.map((k) => [k, JSON.parse(this.data.get(k)!)] as [string, V]);
  }
  async all() {
    return this.sorted().map((k) => [k, JSON.parse(this.data.get(k)!)] as [string, V]);
  }
  async scan(from: string, limit: number): Promise<ScanSlice<V>> {
    const keys = this.sorted().filter((k) => k >= from);
    const slice = keys.slice(0, limit);
    return {
      entries: slice.map((k) => [k, JSON.parse(this.data.get(k)!)] as [string, V]),
      next: keys.length > limit ? `${slice[slice.length - 1]}\0` : undefined,
    };
  }
}

const jsonCodec = {
  encode: (v: unknown) => Buffer.from(JSON.stringify(v)),
  decode: async (b: Buffer) => JSON.parse(b.toString('utf8')) as unknown,
} as never;

type Input =
  | { source: 'connection'; value: unknown }
  | { source: 'message'; value: InboxCommand }
  | { source: 'command'; value: UserCommandRecord };

interface Output {
  child: string;
  key: string;
  value: Buffer | null;
  gatewayId?: string;
}

interface Conn {
  cid: string;
  userId: string;
  deviceId: string;
  gatewayId: string;
  /** The client holds it open (the gateway has not lost it). */
  open: boolean;
  /** Its CONNECTED has been processed and opened a session. */
  opened: boolean;
  /** Seqs received. */
  received: Set<number>;
  /** Highest seq received. */
  seen: number;
  connectedAt: number;
}

interface ModelEntry {
  seq: number;
  key: string;
  messageId?: string;
  from?: string;
  at: number;
}

interface ModelUser {
  entries: ModelEntry[]; // by seq - 1
  dedup: Map<string, ModelEntry>;
  acks: Map<string, number>;
  highestAck: number;
  /** delivered receipts emitted by this user, by messageId */
  delivered: Map<string, number>;
  /** seqs pruned by expiry before any ack covered them */
  expiredUnacked: Set<number>;
  /** seqs acked (highestAck covered them) while kept */
  ackedWhileKept: Set<number>;
}

const USERS = ['alice', 'bob', 'carol'];
const DEVICES = ['phone', 'tablet', 'laptop', '__proto__', 'constructor'];
const GATEWAYS = ['gw1', 'gw2', 'gw3'];

class World {
  now = T0;
  live = new Set(GATEWAYS);
  starts = new Map<string, number>();
  stores = new Map<string, JsonStore<unknown>>();
  punctuators: Array<(now: number) => void | Promise<void>> = [];
  outputs: Output[] = [];
  processor: Processor<Input, unknown>;
  queues = new Map<string, { connections: Input[]; messages: Input[]; commands: Input[] }>();
  conns = new Map<string, Conn>();
  users = new Map<string, ModelUser>();
  /** continued syncs the gateways owe */
  asks: Array<{ userId: string; cid: string; deviceId: string; after: number }> = [];
  nConn = 0;
  nMsg = 0;
  trace: string[] = [];
  /** sends made, for retries: messageId, from, to/group recipients */
  sends: Array<{ messageId: string; from: string; recipients: string[]; group: string | null }> =
    [];
  pushRegistered = new Set<string>();
  processedCount = 0;

  devices: string[] = DEVICES;
  bursts = false;

  constructor(readonly random: () => number) {
    if (random() < 0.25)
      this.devices = [...DEVICES, ...Array.from({ length: 90 }, (_, i) => `d${i}`)];
    this.bursts = random() < 0.3;
    const topology = usersTopology({
      codecs: {
        connections: jsonCodec,
        messages: jsonCodec,
        userCommands: jsonCodec,
        deliveries: jsonCodec,
        push: jsonCodec,
        inboxEntries: jsonCodec,
      },
      liveGateways: () => new Set(this.live),
      gatewayStartedAt: (g) => this.starts.get(g),
      retentionMs: RETENTION,
      prune: {
        everyMs: 0,
        dedupEveryMs: 0,
        tickMs: 1000,
        usersPerTick: 100,
        dedupKeysPerTick: 10_000,
      },
      now: () => this.now,
    });
    const node = topology.nodes.get('inbox');
    assert.ok(node && node.kind === 'processor');
    for (const name of ['inbox-meta', 'inbox', 'dedup', 'sessions'])
      this.stores.set(name, new JsonStore(name));
    this.processor = node.supplier() as Processor<Input, unknown>;
    const context: ProcessorContext<unknown> = {
      applicationId: 'users',
      taskId: 'users_0',
      partition: 0,
      forward: async (record: Rec<unknown>, child?: string) => {
        const v = record.value as { value: Buffer | null; gatewayId?: string };
        this.outputs.push({
          child: child!,
          key: record.key,
          value: v.value,
          gatewayId: v.gatewayId,
        });
      },
      getStateStore: <V>(name: string) => this.stores.get(name)! as unknown as KeyValueStore<V>,
      schedule: (_ms, _type, fn) => {
        this.punctuators.push(fn);
        return { cancel() {} };
      },
      recordMetadata: () => undefined,
    };
    void this.processor.init?.(context);
    for (const u of USERS) {
      this.queues.set(u, { connections: [], messages: [], commands: [] });
      this.users.set(u, {
        entries: [],
        dedup: new Map(),
        acks: new Map(),
        highestAck: 0,
        delivered: new Map(),
        expiredUnacked: new Set(),
        ackedWhileKept: new Set(),
      });
    }
  }

  meta(userId: string): UserMeta {
    return (this.stores.get('inbox-meta')!.getNow(userId) as UserMeta | undefined) ?? newUserMeta();
  }

  pick<V>(list: V[]): V {
    return list[Math.floor(this.random() * list.length)]!;
  }

  fail(message: string): never {
    throw new assert.AssertionError({
      message: `${message}\n--- last steps:\n${this.trace.slice(-Number(process.env.TRACE ?? 60)).join('\n')}`,
    });
  }

  check(cond: unknown, message: string): asserts cond {
    if (!cond) this.fail(message);
  }

  // ---- inputs ----------------------------------------------------------------------------

  command(userId: string, command: UserCommandRecord['command'], at = this.now) {
    this.queues.get(userId)!.commands.push({ source: 'command', value: { userId, at, command } });
  }

  /** The gateway asks for a replay's next part: a continued Sync. */
  askNextPart(ask: World['asks'][number]) {
    this.command(ask.userId, {
      'chat.v1.Sync': {
        deviceId: ask.deviceId,
        connectionId: ask.cid,
        after: ask.after,
        continued: true,
      },
    });
  }

  connect(userId: string) {
    const cid = `c${++this.nConn}`;
    const deviceId = this.pick(this.devices);
    const gatewayId = this.pick(GATEWAYS);
    const conn: Conn = {
      cid,
      userId,
      deviceId,
      gatewayId,
      open: true,
      opened: false,
      received: new Set(),
      seen: 0,
      connectedAt: this.now,
    };
    this.conns.set(cid, conn);
    this.queues.get(userId)!.connections.push({
      source: 'connection',
      value: { userId, deviceId, gatewayId, connectionId: cid, state: 'CONNECTED', at: this.now },
    });
    this.command(userId, {
      'chat.v1.Sync': { deviceId, connectionId: cid, after: FROM_ACK, continued: false },
    });
    this.trace.push(`connect ${userId}/${deviceId} ${cid}@${gatewayId}`);
  }

  disconnect(conn: Conn, write = true) {
    conn.open = false;
    this.asks = this.asks.filter((a) => a.cid !== conn.cid);
    if (write)
      this.queues.get(conn.userId)!.connections.push({
        source: 'connection',
        value: {
          userId: conn.userId,
          deviceId: conn.deviceId,
          gatewayId: conn.gatewayId,
          connectionId: conn.cid,
          state: 'DISCONNECTED',
          at: this.now,
        },
      });
    this.trace.push(`disconnect ${conn.cid}${write ? '' : ' (silently)'}`);
  }

  staleDisconnect(userId: string) {
    const old = [...this.conns.values()].filter((c) => c.userId === userId && !c.open);
    const cid = old.length > 0 && this.random() < 0.7 ? this.pick(old).cid : `ghost${this.nConn}`;
    this.queues.get(userId)!.connections.push({
      source: 'connection',
      value: {
        userId,
        deviceId: this.pick(DEVICES),
        gatewayId: this.pick(GATEWAYS),
        connectionId: cid,
        state: 'DISCONNECTED',
        at: this.now,
      },
    });
    this.trace.push(`stale DISCONNECTED ${userId} ${cid}`);
  }

  copy(owner: string, messageId: string, from: string, to: string | null, group: string | null) {
    this.queues.get(owner)!.messages.push({
      source: 'message',
      value: {
        userId: owner,
        entry: {
          'chat.v1.MessageCopy': {
            messageId,
            from,
            to,
            group,
            body: JSON.stringify({ text: messageId }),
            sentAt: this.now,
          },
        },
      },
    });
  }

  send(from: string) {
    const r = this.random();
    if (r < 0.15 && this.sends.length > 0) {
      // a retry: the same copies again
      const s = this.pick(this.sends);
      for (const to of s.recipients)
        this.copy(to, s.messageId, s.from, s.group ? null : to, s.group);
      this.copy(s.from, s.messageId, s.from, s.group ? null : s.recipients[0]!, s.group);
      this.trace.push(`retry ${s.messageId}`);
      return;
    }
    const messageId = `m${++this.nMsg}`;
    if (r < 0.3) {
      // a group: the same messageId to every other member, and the sender's own copy
      const members = USERS.filter((u) => u !== from);
      const group = 'g1';
      for (const to of members) this.copy(to, messageId, from, null, group);
      this.copy(from, messageId, from, null, group);
      this.sends.push({ messageId, from, recipients: members, group });
      this.trace.push(`group send ${from} ${messageId}`);
      return;
    }
    const to = r < 0.35 ? from : this.pick(USERS.filter((u) => u !== from));
    this.copy(to, messageId, from, to, null);
    this.copy(from, messageId, from, to, null);
    this.sends.push({ messageId, from, recipients: [to], group: null });
    this.trace.push(`send ${from}->${to} ${messageId}`);
  }

  // ---- processing ------------------------------------------------------------------------

  async processNext(userId: string, topic: 'connections' | 'messages' | 'commands') {
    const input = this.queues.get(userId)![topic].shift();
    if (!input) return;
    this.trace.push(`  process ${userId} ${topic} ${JSON.stringify(input.value)}`);
    const metas = new Map(USERS.map((u) => [u, this.meta(u)]));
    this.outputs = [];
    try {
      await this.processor.process({ key: userId, value: input, timestamp: this.now });
    } catch (error) {
      this.fail(`process threw: ${(error as Error).stack}`);
    }
    this.processedCount++;
    this.observe(metas, { userId, input });
  }

  async tick() {
    this.now += 1000;
    const metas = new Map(USERS.map((u) => [u, this.meta(u)]));
    this.outputs = [];
    this.trace.push(`  tick @${this.now - T0} live=${[...this.live].join(',')}`);
    for (const p of this.punctuators) {
      try {
        await p(this.now);
      } catch (error) {
        this.fail(`punctuator threw: ${(error as Error).stack}`);
      }
    }
    this.observe(metas, undefined);
  }

  /** Checks a record's (or a tick's) outputs and the stores after it against the model. */
  observe(before: Map<string, UserMeta>, cause: { userId: string; input: Input } | undefined) {
    const after = new Map(USERS.map((u) => [u, this.meta(u)]));
    const command =
      cause?.input.source === 'command' ? branchOf(cause.input.value.command) : undefined;
    const kind = cause
      ? cause.input.source === 'command'
        ? command!.name
        : cause.input.source
      : 'tick';

    // acks first: the model's acks as the actor applied them (clamped to the head)
    if (command?.name === 'chat.v1.Ack' && !command.value.continued) {
      const m = this.users.get(cause!.userId)!;
      const head = before.get(cause!.userId)!.nextSeq - 1;
      const upTo = Math.min(command.value.upTo, head);
      const prev = m.acks.get(command.value.deviceId);
      m.acks.set(command.value.deviceId, Math.max(prev ?? upTo, upTo));
      if (upTo > m.highestAck) {
        for (
          let s = Math.max(m.highestAck + 1, before.get(cause!.userId)!.firstKept);
          s <= upTo;
          s++
        )
          m.ackedWhileKept.add(s);
        m.highestAck = upTo;
      }
    }
    if (cause?.input.source === 'connection') {
      const e = cause.input.value as { connectionId: string; state: string; deviceId: string };
      const conn = this.conns.get(e.connectionId);
      const opened = after.get(cause.userId)!.sessions[e.connectionId];
      if (e.state === 'CONNECTED' && opened && conn) {
        conn.opened = true;
        const m = this.users.get(cause.userId)!;
        if (!m.acks.has(e.deviceId)) m.acks.set(e.deviceId, 0);
      }
      if (e.state === 'DISCONNECTED') {
        const b = Object.keys(before.get(cause.userId)!.sessions).sort();
        const a = Object.keys(after.get(cause.userId)!.sessions).sort();
        const expected = b.filter((c) => c !== e.connectionId);
        this.check(
          JSON.stringify(a) === JSON.stringify(expected),
          `DISCONNECTED ${e.connectionId} left sessions ${a} (before ${b})`,
        );
      }
    }

    // appended entries: gapless, no dedup key twice
    const appended = new Map<string, InboxEntry[]>();
    for (const o of this.outputs.filter((o) => o.child === 'inbox-entries')) {
      const entry = JSON.parse(o.value!.toString()) as InboxEntry;
      const m = this.users.get(o.key)!;
      this.check(entry.userId === o.key, 'inbox entry keyed by another user');
      this.check(
        entry.seq === m.entries.length + 1,
        `${o.key}: appended seq ${entry.seq}, expected ${m.entries.length + 1}`,
      );
      const { name, value } = branchOf(entry.entry);
      const key =
        name === 'chat.v1.MessageCopy'
          ? `m:${value.messageId}`
          : name === 'chat.v1.Receipt'
            ? `r:${value.messageId}:${value.by}:${value.status}`
            : `${name}:${JSON.stringify(value)}`;
      const dup = m.dedup.get(key);
      this.check(
        !dup || this.now - dup.at > RETENTION,
        `${o.key}: ${key} appended twice (seq ${dup?.seq} and ${entry.seq})`,
      );
      const me: ModelEntry = {
        seq: entry.seq,
        key,
        at: entry.at,
        ...(name === 'chat.v1.MessageCopy' ? { messageId: value.messageId, from: value.from } : {}),
      };
      m.entries.push(me);
      m.dedup.set(key, me);
      this.trace.push(
        `    -> ${o.key} seq ${entry.seq} ${key}${dup ? ` again (was seq ${dup.seq})` : ''}`,
      );
      appended.set(o.key, [...(appended.get(o.key) ?? []), entry]);
    }
    if (cause?.input.source === 'message') {
      const entry = cause.input.value.entry;
      const { name, value } = branchOf(entry);
      const key =
        name === 'chat.v1.MessageCopy'
          ? `m:${value.messageId}`
          : name === 'chat.v1.Receipt'
            ? `r:${value.messageId}:${value.by}:${value.status}`
            : '?';
      const got = appended.get(cause.userId)?.length ?? 0;
      const had = this.users.get(cause.userId)!.dedup.get(key);
      const fresh = had?.seq === this.users.get(cause.userId)!.entries.length && got === 1;
      this.check(got <= 1, 'one copy appended more than once');
      if (!fresh && got === 0)
        this.check(had !== undefined, `${cause.userId}: copy ${key} neither appended nor held`);
    } else {
      this.check(appended.size === 0, `${kind} appended an entry`);
    }

    // deliveries
    const perConn = new Map<string, number>();
    for (const o of this.outputs.filter((o) => o.child === 'deliveries')) {
      const d = JSON.parse(o.value!.toString()) as Delivery;
      const frame = branchOf(d.frame);
      const b = before.get(d.userId)!;
      for (const target of d.targets) {
        const conn = this.conns.get(target.connectionId);
        this.check(conn, `delivery to unknown connection ${target.connectionId}`);
        this.check(conn.userId === d.userId, 'delivery to a connection of another user');
        this.check(conn.gatewayId === o.gatewayId, 'delivery to the wrong gateway');
        if (frame.name === 'chat.v1.Typing') {
          this.check(kind === 'chat.v1.Typing', `typing relayed on ${kind}`);
          this.check(this.live.has(o.gatewayId!), 'typing to a silent gateway');
          this.check(b.sessions[target.connectionId]?.live, 'typing to a session that is not live');
          continue;
        }
        if (frame.name === 'chat.v1.ErrorFrame') {
          this.check(kind === 'chat.v1.Read', `error frame on ${kind}`);
          continue;
        }
        const entry = frame.value;
        const m = this.users.get(d.userId)!;
        const model = m.entries[entry.seq - 1];
        this.check(model, `${d.userId}: delivered seq ${entry.seq} never appended`);
        this.check(
          entry.seq >= b.firstKept || appended.get(d.userId)?.some((e) => e.seq === entry.seq),
          `${target.connectionId}: delivered seq ${entry.seq}, pruned (firstKept ${b.firstKept})`,
        );
        if (kind === 'message')
          this.check(
            this.live.has(o.gatewayId!),
            `live entry ${entry.seq} to silent ${o.gatewayId}`,
          );
        // consecutive within one record's output
        const prev = perConn.get(target.connectionId);
        this.check(
          prev === undefined || entry.seq === prev + 1,
          `${target.connectionId}: ${entry.seq} right after ${prev} in one ${kind}`,
        );
        perConn.set(target.connectionId, entry.seq);
        // never past a gap
        const floor = Math.max(
          conn.seen,
          // a tick prunes (expiry) before it catches sessions up
          after.get(d.userId)!.firstKept - 1,
          Object.prototype.hasOwnProperty.call(b.devices, conn.deviceId)
            ? b.devices[conn.deviceId]!.ack
            : 0,
        );
        if (prev === undefined)
          this.check(
            entry.seq <= floor + 1,
            `${target.connectionId} (${conn.deviceId}): got ${entry.seq} after ${conn.seen} (floor ${floor}) on ${kind}\nbefore ${JSON.stringify(b)}\nafter ${JSON.stringify(after.get(d.userId))}`,
          );
        // a resend on a live connection needs a sync or a reconnect
        if (entry.seq <= conn.seen && prev === undefined)
          this.check(
            kind === 'chat.v1.Sync' || kind === 'connection',
            `${target.connectionId}: seq ${entry.seq} sent again (seen ${conn.seen}) on ${kind}`,
          );
        conn.received.add(entry.seq);
        conn.seen = Math.max(conn.seen, entry.seq);
        if (d.more && conn.open)
          this.asks.push({
            userId: d.userId,
            cid: conn.cid,
            deviceId: conn.deviceId,
            after: entry.seq,
          });
      }
    }

    // receipts
    for (const o of this.outputs.filter((o) => o.child === 'receipts')) {
      const c = JSON.parse(o.value!.toString()) as InboxCommand;
      const { name, value } = branchOf(c.entry);
      this.check(name === 'chat.v1.Receipt', 'receipts sink: not a receipt');
      const m = this.users.get(value.by)!;
      this.check(
        cause === undefined || value.by === cause.userId || command?.name === undefined,
        'receipt by another user',
      );
      const entry = m.dedup.get(`m:${value.messageId}`);
      this.check(entry, `${value.by}: receipt for ${value.messageId}, not in the inbox`);
      this.check(
        entry.from === o.key,
        `receipt for ${value.messageId} to ${o.key}, not its sender`,
      );
      this.check(entry.from !== value.by, `${value.by}: receipt for its own ${value.messageId}`);
      this.trace.push(
        `    -> ${value.status} receipt ${value.messageId} by ${value.by} (seq ${entry.seq}) to ${o.key}`,
      );
      if (value.status === 'delivered') {
        // per copy: a retry past the dedup key's retention is a new copy (documented)
        const n = (m.delivered.get(`${value.messageId}#${entry.seq}`) ?? 0) + 1;
        m.delivered.set(`${value.messageId}#${entry.seq}`, n);
        this.check(
          n === 1,
          `${value.by}: delivered receipt for ${value.messageId} owed ${n} times`,
        );
        this.check(
          entry.seq <= m.highestAck,
          `${value.by}: delivered receipt for seq ${entry.seq} with acks up to ${m.highestAck}`,
        );
      } else {
        this.check(kind === 'chat.v1.Read', `read receipt on ${kind}`);
        this.check(
          command?.name === 'chat.v1.Read' && command.value.messageId === value.messageId,
          'read receipt for another message',
        );
      }
      // back into the sender's inbox
      this.queues.get(o.key)!.messages.push({ source: 'message', value: c });
    }
    if (command?.name === 'chat.v1.Read') {
      const m = this.users.get(cause!.userId)!;
      const entry = m.dedup.get(`m:${command.value.messageId}`);
      const receipts = this.outputs.filter((o) => o.child === 'receipts').length;
      const errors = this.outputs.filter(
        (o) =>
          o.child === 'deliveries' && JSON.parse(o.value!.toString()).frame['chat.v1.ErrorFrame'],
      ).length;
      const old = entry && this.now - entry.at > RETENTION;
      if (entry && !old) {
        this.check(errors === 0, `read of ${command.value.messageId} (seq ${entry.seq}) refused`);
        this.check(
          receipts === (entry.from === cause!.userId ? 0 : 1),
          `read of ${command.value.messageId} from ${entry.from}: ${receipts} receipts`,
        );
      }
      if (!entry) this.check(receipts === 0, 'read receipt for a message not in the inbox');
    }

    // own acks back
    for (const o of this.outputs.filter((o) => o.child === 'own-acks')) {
      const c = JSON.parse(o.value!.toString()) as UserCommandRecord;
      this.queues.get(o.key)!.commands.push({ source: 'command', value: c });
    }

    // push
    for (const o of this.outputs.filter((o) => o.child === 'push')) {
      const b = before.get(o.key)!;
      const online = Object.values(b.sessions).some((s) => this.live.has(s.gatewayId));
      this.check(!online, `${o.key}: push while online`);
      this.check(kind === 'message', `push on ${kind}`);
    }

    if (kind === 'message' && appended.size > 0) {
      const b = before.get(cause!.userId)!;
      const entry = appended.get(cause!.userId)![0]!;
      const copy = branchOf(entry.entry);
      const online = Object.values(b.sessions).some((x) => this.live.has(x.gatewayId));
      const expected =
        copy.name === 'chat.v1.MessageCopy' &&
        copy.value.from !== cause!.userId &&
        !online &&
        Object.keys(b.push).length > 0;
      const pushed = this.outputs.some((o) => o.child === 'push');
      this.check(pushed === expected, `${cause!.userId}: push ${pushed}, expected ${expected}`);
    }

    // typing changes nothing
    if (command?.name === 'chat.v1.Typing') {
      for (const u of USERS)
        this.check(
          JSON.stringify(before.get(u)) === JSON.stringify(after.get(u)),
          'typing changed a meta',
        );
    }

    // pruning
    for (const u of USERS) {
      const b = before.get(u)!;
      const a = after.get(u)!;
      const m = this.users.get(u)!;
      this.check(a.firstKept >= b.firstKept, `${u}: firstKept fell`);
      this.check(
        a.nextSeq === m.entries.length + 1,
        `${u}: nextSeq ${a.nextSeq} vs model ${m.entries.length + 1}`,
      );
      this.check(a.firstKept <= a.nextSeq, `${u}: firstKept past nextSeq`);
      for (let s = b.firstKept; s < a.firstKept; s++) {
        const e = m.entries[s - 1]!;
        const expired = this.now - e.at > RETENTION;
        const unacked = [...m.acks].filter(([, ack]) => ack < s).map(([d]) => d);
        this.check(
          expired || unacked.length === 0,
          `${u}: seq ${s} pruned on ${kind}, not acked by ${unacked.join(',')} and not expired`,
        );
        if (e.from !== undefined && e.from !== u) {
          if (s <= m.highestAck)
            this.check(
              m.delivered.has(`${e.messageId!}#${s}`),
              `${u}: seq ${s} acked and pruned before its delivered receipt`,
            );
          else m.expiredUnacked.add(s);
        }
      }
      // the store holds exactly the kept entries
      const kept = [...this.stores.get('inbox')!.data.keys()].filter((k) => k.startsWith(`${u}/`));
      this.check(
        kept.length === a.nextSeq - a.firstKept,
        `${u}: ${kept.length} entries stored, ${a.nextSeq - a.firstKept} kept`,
      );
    }
  }

  // ---- quiescence ------------------------------------------------------------------------

  async settle() {
    this.live = new Set(GATEWAYS);
    this.trace.push('settle');
    for (let round = 0; round < 10_000; round++) {
      const work: Array<[string, 'connections' | 'messages' | 'commands']> = [];
      for (const u of USERS)
        for (const t of ['connections', 'messages', 'commands'] as const)
          if (this.queues.get(u)![t].length > 0) work.push([u, t]);
      if (work.length === 0 && this.asks.length === 0) {
        await this.tick();
        await this.tick();
        // ticks may owe more
        const more = USERS.some((u) =>
          (['connections', 'messages', 'commands'] as const).some(
            (t) => this.queues.get(u)![t].length > 0,
          ),
        );
        if (!more && this.asks.length === 0) return;
        continue;
      }
      if (work.length > 0 && (this.asks.length === 0 || this.random() < 0.7)) {
        const [u, t] = this.pick(work);
        await this.processNext(u, t);
      } else {
        this.askNextPart(this.asks.shift()!);
      }
    }
    this.fail('did not settle');
  }

  /** After settle: every open synced connection has every kept entry above its device's ack. */
  checkSettled() {
    for (const conn of this.conns.values()) {
      if (!conn.open || !conn.opened) continue;
      const meta = this.meta(conn.userId);
      const session = meta.sessions[conn.cid];
      if (!session) {
        // closed for the session limit only (never reached here), or a restart
        const start = this.starts.get(conn.gatewayId);
        this.check(
          start !== undefined && conn.connectedAt < start,
          `${conn.cid}: open connection without a session`,
        );
        continue;
      }
      this.check(session.live, `${conn.cid}: not live after settling`);
      this.check(session.resumeAfter === undefined, `${conn.cid}: waits for a part after settling`);
      const ack = Object.prototype.hasOwnProperty.call(meta.devices, conn.deviceId)
        ? meta.devices[conn.deviceId]!.ack
        : 0;
      for (let s = Math.max(meta.firstKept, ack + 1); s < meta.nextSeq; s++)
        this.check(
          conn.received.has(s),
          `${conn.cid} (${conn.userId}/${conn.deviceId}): kept seq ${s} above ack ${ack} never sent (head ${meta.nextSeq - 1})`,
        );
    }
    for (const [g, start] of this.starts)
      for (const u of USERS)
        for (const [cid, s] of Object.entries(this.meta(u).sessions))
          this.check(
            s.gatewayId !== g || (s.connectedAt ?? Infinity) >= start,
            `${u}: session ${cid} of an earlier run of ${g} kept`,
          );
    // every message an ack covered while kept has its delivered receipt
    for (const u of USERS) {
      const m = this.users.get(u)!;
      for (const s of m.ackedWhileKept) {
        const e = m.entries[s - 1]!;
        if (e.from === undefined || e.from === u) continue;
        this.check(
          m.delivered.has(`${e.messageId!}#${s}`),
          `${u}: seq ${s} (${e.messageId}) acked, no delivered receipt`,
        );
      }
    }
  }

  // ---- one random step -------------------------------------------------------------------

  async step() {
    const r = this.random();
    const openConns = [...this.conns.values()].filter((c) => c.open);
    if (r < 0.3) {
      // process something
      const work: Array<[string, 'connections' | 'messages' | 'commands']> = [];
      for (const u of USERS)
        for (const t of ['connections', 'messages', 'commands'] as const)
          if (this.queues.get(u)![t].length > 0) work.push([u, t]);
      for (let i = 1 + Math.floor(this.random() * 4); i > 0 && work.length > 0; i--) {
        const [u, t] = this.pick(work);
        await this.processNext(u, t);
      }
    } else if (r < 0.42) {
      if (this.bursts && this.random() < 0.05) {
        // a burst past a replay part: one sender, one recipient
        const from = this.pick(USERS);
        const to = this.pick(USERS.filter((u) => u !== from));
        for (let i = 0; i < 300; i++) {
          const messageId = `m${++this.nMsg}`;
          this.copy(to, messageId, from, to, null);
          this.copy(from, messageId, from, to, null);
        }
        this.trace.push(`burst ${from}->${to}`);
      } else this.send(this.pick(USERS));
    } else if (r < 0.48) {
      this.connect(this.pick(USERS));
    } else if (r < 0.52 && openConns.length > 0) {
      this.disconnect(this.pick(openConns));
    } else if (r < 0.54) {
      this.staleDisconnect(this.pick(USERS));
    } else if (r < 0.64 && openConns.length > 0) {
      const c = this.pick(openConns);
      const head = this.users.get(c.userId)!.entries.length;
      const upTo = this.pick([
        c.seen,
        c.seen,
        Math.floor(this.random() * (c.seen + 1)),
        head + 3,
        0,
      ]);
      const deviceId = this.random() < 0.05 ? `stranger${this.nConn}` : c.deviceId;
      this.command(c.userId, { 'chat.v1.Ack': { deviceId, upTo, continued: false } });
      this.trace.push(`ack ${c.cid} ${deviceId} upTo ${upTo}`);
    } else if (r < 0.67 && openConns.length > 0) {
      const c = this.pick(openConns);
      const after = Math.floor(this.random() * (c.seen + 1));
      this.command(c.userId, {
        'chat.v1.Sync': { deviceId: c.deviceId, connectionId: c.cid, after, continued: false },
      });
      this.trace.push(`sync ${c.cid} after ${after}`);
    } else if (r < 0.72 && openConns.length > 0) {
      const c = this.pick(openConns);
      const m = this.users.get(c.userId)!;
      const ids = m.entries.filter((e) => e.messageId).map((e) => e.messageId!);
      const messageId =
        this.random() < 0.7 && ids.length > 0
          ? this.pick(ids)
          : this.random() < 0.5 && this.sends.length > 0
            ? this.pick(this.sends).messageId
            : 'nope';
      this.command(c.userId, {
        'chat.v1.Read': { deviceId: c.deviceId, messageId, connectionId: c.cid, id: 'r1' },
      });
      this.trace.push(`read ${c.cid} ${messageId}`);
    } else if (r < 0.75) {
      const from = this.pick(USERS);
      const to = this.pick(USERS);
      this.command(to, {
        'chat.v1.Typing': { from, to, group: null, state: 'start', at: this.now },
      } as never);
    } else if (r < 0.78) {
      // a gateway goes silent or is heard again
      const g = this.pick(GATEWAYS);
      if (this.live.has(g)) this.live.delete(g);
      else this.live.add(g);
      this.trace.push(`live ${[...this.live].join(',')}`);
    } else if (r < 0.79) {
      // a gateway restarts under its id: its connections are gone, no DISCONNECTED
      const g = this.pick(GATEWAYS);
      this.now += 1;
      this.starts.set(g, this.now);
      for (const c of openConns) if (c.gatewayId === g) this.disconnect(c, false);
      this.asks = this.asks.filter((a) => this.conns.get(a.cid)!.open);
      this.trace.push(`restart ${g}`);
    } else if (r < 0.85) {
      await this.tick();
    } else if (r < 0.9 && this.asks.length > 0) {
      // the gateway asks for the next part (late, any order, sometimes twice)
      const i = Math.floor(this.random() * this.asks.length);
      const ask = this.asks[i]!;
      if (this.random() < 0.85) this.asks.splice(i, 1);
      if (this.conns.get(ask.cid)!.open) this.askNextPart(ask);
    } else if (r < 0.91) {
      const u = this.pick(USERS);
      this.command(u, {
        'chat.v1.DeviceRegistered': {
          deviceId: this.pick(DEVICES),
          pushToken: 'tok',
          platform: null,
        },
      } as never);
    } else if (r < 0.93) {
      this.now += this.random() < 0.3 ? 31 * DAY : Math.floor(this.random() * 5 * DAY);
      this.trace.push(`clock +, now ${this.now - T0}`);
    } else {
      this.now += Math.floor(this.random() * 10_000);
    }
  }
}

const SEEDS = Number(process.env.SEEDS ?? 300);
const STEPS = Number(process.env.STEPS ?? 200);
const ONE = process.env.SEED === undefined ? undefined : Number(process.env.SEED);

describe('users actor: model-based random runs on the processor', function () {
  this.timeout(600_000);
  it(`keeps the client contract over ${ONE ?? SEEDS} seeds x ${STEPS} steps`, async () => {
    const failures: string[] = [];
    for (let seed = ONE ?? 1; seed <= (ONE ?? SEEDS); seed++) {
      const world = new World(seededRandom(seed));
      try {
        for (let step = 0; step < STEPS; step++) {
          await world.step();
          if (step % 50 === 49) {
            await world.settle();
            world.checkSettled();
          }
        }
        await world.settle();
        world.checkSettled();
      } catch (error) {
        const text = (error as Error).message;
        if (ONE !== undefined) console.log(text);
        failures.push(`seed ${seed}: ${ONE !== undefined ? text : text.split('\n')[0]}`);
        if (ONE !== undefined || failures.length >= 20) break;
      }
    }
    assert.deepEqual(failures, []);
  });
});

/**
 * The pure decider under random commands: evolve over every event emitted equals the state kept;
 * decide does not touch its view, gives the same events twice, and the same after the meta's
 * JSON round trip (the store's serde).
 */
describe('users actor: decider is an event-sourced fold', function () {
  this.timeout(300_000);
  const deepFreeze = <V>(v: V): V => {
    if (v && typeof v === 'object' && !Object.isFrozen(v)) {
      Object.freeze(v);
      for (const x of Object.values(v)) deepFreeze(x);
    }
    return v;
  };
  it('folds to the live state', () => {
    const failures: string[] = [];
    for (let seed = 1; seed <= Math.min(SEEDS, 500); seed++) {
      const random = seededRandom(seed);
      const pick = <V>(l: V[]) => l[Math.floor(random() * l.length)]!;
      let meta = newUserMeta();
      let entries: InboxEntry[] = [];
      const dedup = new Set<string>();
      const all: UserEvent[] = [];
      let live = new Set(['gw1', 'gw2']);
      let now = T0;
      let n = 0;
      try {
        for (let step = 0; step < STEPS; step++) {
          now += Math.floor(random() * (random() < 0.02 ? 40 * DAY : 60_000));
          const r = random();
          const cid = `c${Math.floor(random() * 8)}`;
          const deviceId = pick(['phone', 'tablet', '__proto__', 'constructor']);
          let command: UserCommand;
          if (r < 0.3) {
            const id = `m${random() < 0.2 ? Math.floor(random() * (n + 1)) : ++n}`;
            command = {
              kind: 'append',
              entry: {
                'chat.v1.MessageCopy': {
                  messageId: id,
                  from: pick(['alice', 'bob']),
                  to: 'alice',
                  group: null,
                  body: '"x"',
                  sentAt: now,
                },
              },
              dedupKey: `m:${id}`,
              at: now,
            };
          } else if (r < 0.4)
            command = {
              kind: 'connected',
              deviceId,
              gatewayId: pick(['gw1', 'gw2']),
              connectionId: cid,
              at: now,
            };
          else if (r < 0.45) command = { kind: 'disconnected', connectionId: cid, at: now };
          else if (r < 0.6)
            command = {
              kind: 'ack',
              deviceId,
              upTo: Math.floor(random() * (meta.nextSeq + 3)) - 1,
              at: now,
            };
          else if (r < 0.7)
            command = {
              kind: 'sync',
              deviceId,
              connectionId: cid,
              after: random() < 0.5 ? FROM_ACK : Math.floor(random() * meta.nextSeq),
              continued: random() < 0.3,
              at: now,
            };
          else if (r < 0.75)
            command = {
              kind: 'read',
              deviceId,
              messageId: `m${Math.floor(random() * (n + 2))}`,
              connectionId: cid,
              id: null,
              at: now,
            };
          else if (r < 0.8)
            command = {
              kind: 'typing',
              typing: { from: 'bob', to: 'alice', group: null, state: 'start', at: now },
            };
          else if (r < 0.85) command = { kind: 'prune', now, retentionMs: 30 * DAY };
          else if (r < 0.9) command = { kind: 'catch-up' };
          else if (r < 0.93)
            command = {
              kind: 'device-registered',
              deviceId,
              pushToken: pick(['a', 'b']),
              platform: null,
            };
          else if (r < 0.95)
            command = { kind: 'device-removed', deviceId, pushToken: random() < 0.5 ? null : 'a' };
          else {
            live = new Set(['gw1', 'gw2'].filter(() => random() < 0.6));
            continue;
          }
          const needed = entriesNeeded(command, meta, live);
          const base = entries[0]?.seq ?? meta.firstKept;
          let loaded =
            command.kind === 'read'
              ? entries.filter(
                  (e) =>
                    (branchOf(e.entry).value as { messageId?: string }).messageId ===
                    command.messageId,
                )
              : needed.flatMap((x) =>
                  entries.slice(Math.max(0, x.from - base), Math.max(0, x.to - base)),
                );
          const view = {
            userId: 'alice',
            meta: deepFreeze(structuredClone(meta)),
            entries: deepFreeze(structuredClone(loaded)),
            duplicate: command.kind === 'append' && dedup.has(command.dedupKey),
            liveGateways: live,
          };
          let events: UserEvent[];
          try {
            events = decide(command, view);
          } catch (error) {
            throw new Error(
              `decide(${JSON.stringify(command)}) threw: ${(error as Error).message}`,
            );
          }
          const again = decide(command, {
            ...view,
            meta: JSON.parse(JSON.stringify(meta)) as UserMeta,
          });
          assert.deepEqual(again, events, 'decide differs after the JSON round trip');
          for (const e of events) {
            meta = evolve(deepFreeze(meta), e);
            all.push(e);
            if (e.type === 'entry-appended') {
              entries.push(e.entry);
              dedup.add(e.dedupKey);
            }
            if (e.type === 'pruned') entries = entries.filter((x) => x.seq >= e.below);
          }
          // store round trip, as the processor's
          meta = JSON.parse(JSON.stringify(meta)) as UserMeta;
          loaded = [];
          const folded = JSON.parse(JSON.stringify(all.reduce(evolve, newUserMeta()))) as UserMeta;
          assert.deepEqual(folded, meta, 'fold of the events differs from the state');
        }
      } catch (error) {
        failures.push(`seed ${seed}: ${(error as Error).message.split('\n')[0]}`);
        if (failures.length >= 10) break;
      }
    }
    assert.deepEqual(failures, []);
  });
});

/**
 * Odd input straight into the decider (records a buggy or forged writer could put on the log):
 * connectionIds and deviceIds that name Object.prototype's members, negative and huge numbers.
 * Nothing throws; every session kept is a real one (a deviceId and a gatewayId); every event
 * that sends names a gateway.
 */
describe('users actor: decider on odd input', () => {
  it('never throws and never makes up a session', () => {
    const odd = ['__proto__', 'constructor', 'toString', 'hasOwnProperty', 'c1'];
    const numbers = [-5, -1, 0, 1, 3, 2 ** 53 - 2, Number.MAX_SAFE_INTEGER];
    const failures: string[] = [];
    for (let seed = 1; seed <= 300; seed++) {
      const random = seededRandom(seed);
      const pick = <V>(l: V[]) => l[Math.floor(random() * l.length)]!;
      let meta = newUserMeta();
      let entries: InboxEntry[] = [];
      const trace: string[] = [];
      try {
        for (let step = 0; step < 60; step++) {
          const connectionId = pick(odd);
          const deviceId = pick(odd);
          const r = random();
          const command: UserCommand =
            r < 0.25
              ? {
                  kind: 'append',
                  entry: {
                    'chat.v1.MessageCopy': {
                      messageId: `m${step}`,
                      from: 'bob',
                      to: 'alice',
                      group: null,
                      body: '"x"',
                      sentAt: T0,
                    },
                  },
                  dedupKey: `m:m${step}`,
                  at: T0,
                }
              : r < 0.4
                ? { kind: 'connected', deviceId, gatewayId: 'gw1', connectionId, at: T0 }
                : r < 0.5
                  ? { kind: 'disconnected', connectionId, at: T0 }
                  : r < 0.7
                    ? { kind: 'ack', deviceId, upTo: pick(numbers), at: T0 }
                    : r < 0.85
                      ? {
                          kind: 'sync',
                          deviceId,
                          connectionId,
                          after: pick(numbers),
                          continued: random() < 0.3,
                          at: T0,
                        }
                      : r < 0.9
                        ? {
                            kind: 'read',
                            deviceId,
                            messageId: pick(['m1', '__proto__']),
                            connectionId,
                            id: null,
                            at: T0,
                          }
                        : { kind: 'prune', now: T0 + pick([0, 40 * DAY]), retentionMs: 30 * DAY };
          trace.push(JSON.stringify(command));
          const needed = entriesNeeded(command, meta, new Set(['gw1']));
          const loaded = needed.flatMap((x) =>
            entries.filter((e) => e.seq >= x.from && e.seq < x.to),
          );
          const events = decide(command, {
            userId: 'alice',
            meta,
            entries: loaded,
            duplicate: false,
            liveGateways: new Set(['gw1']),
          });
          for (const e of events) {
            if (e.type === 'delivered' || e.type === 'typing-relayed' || e.type === 'refused')
              assert.equal(typeof e.gatewayId, 'string', `${e.type} to gateway ${e.gatewayId}`);
            meta = evolve(meta, e);
            if (e.type === 'entry-appended') entries.push(e.entry);
            if (e.type === 'pruned') entries = entries.filter((x) => x.seq >= e.below);
          }
          meta = JSON.parse(JSON.stringify(meta)) as UserMeta;
          for (const [cid, s] of Object.entries(meta.sessions))
            assert.ok(
              typeof s.deviceId === 'string' && typeof s.gatewayId === 'string',
              `made-up session ${cid}: ${JSON.stringify(s)}`,
            );
          for (const [d, dev] of Object.entries(meta.devices))
            assert.ok(Number.isFinite(dev.ack), `device ${d} ack ${dev.ack}`);
        }
      } catch (error) {
        failures.push(
          `seed ${seed}: ${(error as Error).message.split('\n')[0]} after ${trace.slice(-4).join(' ; ')}`,
        );
        if (failures.length >= 8) break;
      }
    }
    assert.deepEqual(failures, []);
  });
});
