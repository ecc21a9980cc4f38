/**
 * The users actor on the runtime: the processor around the pure decider. It turns the three
 * co-partitioned inputs into commands, loads what each command needs (the user's meta, the
 * kept entries, a dedup key), runs decide/evolve, writes the stores and forwards the records the
 * events call for.
 *
 *   chat.connections ─┐                      ┌─> chat.deliveries.<gatewayId>  (entries, typing)
 *   chat.messages ────┼─> inbox ─[stores]────┼─> chat.messages                (receipts owed)
 *   chat.user-commands┘   inbox-meta, inbox, ├─> chat.push                    (offline users)
 *                         dedup, sessions    └─> chat.inbox-entries           (for the archive)
 */
import type {
  ConnectionEvent,
  Delivery,
  InboxCommand,
  InboxEntry,
  PushRequest,
  UserCommand as UserCommandRecord,
} from '../../schemas/types.generated.ts';
import { branchOf } from '../../schemas/avro.ts';
import { deliveriesTopic, topics } from '../../schemas/topics.ts';
import type { TopicCodec } from '../../schemas/codec.ts';
import { keyAfter, type KeyValueStore } from '../../state/store.ts';
import {
  Topology,
  type Processor,
  type ProcessorContext,
  type Record,
} from '../runtime/topology.ts';
import {
  decide,
  entriesNeeded,
  evolve,
  messageOf,
  newUserMeta,
  own,
  PRUNE_SLICE_ENTRIES,
  sessionsBehind,
  type UserCommand,
  type UserEvent,
  type UserMeta,
} from './decider.ts';

export const USERS_APPLICATION = 'users';
/** PROTOCOL's INBOX_RETENTION: 30 days. */
export const DEFAULT_RETENTION_MS = 30 * 86_400_000;
/**
 * What every device acked is pruned by the ack itself; the walks are left with what ages out
 * (entries and dedup keys past the retention), which is counted in days: each walk goes round
 * at most once an hour, a slice per tick, so that a tick holds its task up for a bounded time
 * whatever the stores hold. At 1,000 users a second, a walk goes round a million users in 17
 * minutes; at 2,000 dedup keys a second, 10 million in under an hour and a half. (Walking the
 * users every minute cost a task a meta read per user per minute; walking the dedup keys every
 * minute, up to 5,000 reads a second for nothing: bench/README.md, chat.)
 */
const PRUNE_DEFAULTS: PruneOptions = {
  everyMs: 3_600_000,
  dedupEveryMs: 3_600_000,
  tickMs: 1_000,
  usersPerTick: 1_000,
  dedupKeysPerTick: 2_000,
};
/** Expired slices of PRUNE_SLICE_ENTRIES pruned from one inbox per visit of the walk, at most. */
const PRUNE_SLICES_PER_VISIT = 16;

export interface PruneOptions {
  /** The users walk starts again at most this long after the previous one started. */
  everyMs: number;
  /** The same for the dedup keys' walk. */
  dedupEveryMs: number;
  tickMs: number;
  usersPerTick: number;
  dedupKeysPerTick: number;
}

/** A walk over a store a slice per call, started again at most every `everyMs`. */
class SlicedWalk {
  /** Where the next slice starts (undefined: between walks). */
  private from: string | undefined;
  private startedAt = -Infinity;

  constructor(private readonly everyMs: number) {}

  /** Where the walk is now, to put it back there (a tick that failed). */
  position(): () => void {
    const { from, startedAt } = this;
    return () => {
      this.from = from;
      this.startedAt = startedAt;
    };
  }

  async slice<V>(store: KeyValueStore<V>, limit: number, now: number): Promise<Array<[string, V]>> {
    if (this.from === undefined) {
      if (now - this.startedAt < this.everyMs) return [];
      this.from = '';
      this.startedAt = now;
    }
    const { entries, next } = await store.scan(this.from, limit);
    this.from = next;
    return entries;
  }
}
/** Ticks in a row a user's work may fail before the ticks leave that user out for a while. */
const TICK_TRIES = 3;
/** How long a user whose work failed TICK_TRIES ticks in a row is left out of the ticks. */
const LEFT_OUT_MS = 10 * 60_000;
/** How often the actor looks for gateways heard again, whose sessions may have missed entries. */
const CATCH_UP_INTERVAL_MS = 1_000;
/**
 * Users with sessions on a changed gateway looked at per tick: a gateway of 10,000 connections
 * that restarts is gone through in ten ticks, each holding its task up only briefly.
 */
const GATEWAY_USERS_PER_TICK = 1_000;

export interface UsersCodecs {
  connections: TopicCodec<ConnectionEvent>;
  messages: TopicCodec<InboxCommand>;
  userCommands: TopicCodec<UserCommandRecord>;
  /** Any gateway's deliveries topic: they share one schema. */
  deliveries: TopicCodec<Delivery>;
  push: TopicCodec<PushRequest>;
  inboxEntries: TopicCodec<InboxEntry>;
}

export interface UsersOptions {
  codecs: UsersCodecs;
  /** Gateways heard from lately (the chat.gateways global table). */
  liveGateways(): ReadonlySet<string>;
  /** When the current run of a gateway started, as its heartbeats say (undefined: not told). */
  gatewayStartedAt?(gatewayId: string): number | undefined;
  retentionMs?: number;
  /** How pruning paces itself (for tests; the defaults are above). */
  prune?: PruneOptions;
  /** Users on changed gateways looked at per tick (for tests; GATEWAY_USERS_PER_TICK). */
  gatewayUsersPerTick?: number;
  now?: () => number;
  /** Told how many sessions a catch-up sent what they missed (for metrics and logs). */
  onCatchUp?(sessions: number): void;
  /** Told how many sessions of an earlier run of their gateway were closed. */
  onStaleSessions?(sessions: number, gatewayIds: string[]): void;
}

type Input =
  | { source: 'connection'; value: ConnectionEvent }
  | { source: 'message'; value: InboxCommand }
  | { source: 'command'; value: UserCommandRecord };

/** What makes two entries the same, so that an inbox never holds one twice. */
export function dedupKeyOf(entry: InboxEntry['entry']): string {
  const { name, value } = branchOf(entry);
  switch (name) {
    case 'chat.v1.MessageCopy':
      return `m:${value.messageId}`;
    case 'chat.v1.Receipt':
      return `r:${value.messageId}:${value.by}:${value.status}`;
    case 'chat.v1.GroupEvent':
      return `g:${value.groupId}:${value.version}`;
    case 'chat.v1.Rejection':
      return `x:${value.messageId}`;
  }
}

const seqKey = (userId: string, seq: number) => `${userId}/${seq.toString().padStart(12, '0')}`;

/** The dedup store's key of an entry's dedupKeyOf in a user's inbox: `<userId>/<dedupKey>`. */
const dedupStoreKey = (userId: string, dedupKey: string) => `${userId}/${dedupKey}`;
const userOfDedupStoreKey = (key: string) => key.slice(0, key.indexOf('/'));

/**
 * The sessions store indexes users by the gateways their sessions are on: key
 * `<gatewayId> NUL <userId>`, value the connectionIds. A gateway heard again or restarted is
 * looked at through its own users, not every user of the task.
 */
const sessionKey = (gatewayId: string, userId: string) => `${gatewayId}\u0000${userId}`;
const userOfSessionKey = (key: string) => key.slice(key.indexOf('\u0000') + 1);

function toCommand(input: Input, at: number): UserCommand | undefined {
  if (input.source === 'connection') {
    const e = input.value;
    return e.state === 'CONNECTED'
      ? {
          kind: 'connected',
          deviceId: e.deviceId,
          gatewayId: e.gatewayId,
          connectionId: e.connectionId,
          at: e.at,
        }
      : { kind: 'disconnected', connectionId: e.connectionId, at: e.at };
  }
  if (input.source === 'message') {
    return {
      kind: 'append',
      entry: input.value.entry,
      dedupKey: dedupKeyOf(input.value.entry),
      at,
    };
  }
  const { name, value } = branchOf(input.value.command);
  const when = input.value.at;
  switch (name) {
    case 'chat.v1.Ack':
      return {
        kind: 'ack',
        deviceId: value.deviceId,
        upTo: value.upTo,
        continued: value.continued,
        at: when,
      };
    case 'chat.v1.Read':
      return {
        kind: 'read',
        deviceId: value.deviceId,
        messageId: value.messageId,
        connectionId: value.connectionId,
        id: value.id,
        at: when,
      };
    case 'chat.v1.Typing':
      return { kind: 'typing', typing: value };
    case 'chat.v1.Sync':
      return {
        kind: 'sync',
        deviceId: value.deviceId,
        connectionId: value.connectionId,
        after: value.after,
        continued: value.continued,
        at: when,
      };
    case 'chat.v1.DeviceRegistered':
      return {
        kind: 'device-registered',
        deviceId: value.deviceId,
        pushToken: value.pushToken,
        platform: value.platform,
      };
    case 'chat.v1.DeviceRemoved':
      return { kind: 'device-removed', deviceId: value.deviceId, pushToken: value.pushToken };
  }
}

class InboxProcessor implements Processor<Input, unknown> {
  private context!: ProcessorContext<unknown>;
  private metas!: KeyValueStore<UserMeta>;
  private entries!: KeyValueStore<InboxEntry>;
  /** By `<userId>/<dedup key>`: the entry's seq and time, and for a message its sender. */
  private dedup!: KeyValueStore<{ seq: number; at: number; from?: string }>;
  private sessions!: KeyValueStore<string[]>;
  /**
   * The live gateways at the last tick of watchGateways, each with when its run started
   * (undefined before the first tick).
   */
  private startsBefore: Map<string, number | undefined> | undefined;
  /**
   * Gateways that counted as silent when an entry was held back from their sessions since the
   * last tick: looked at if the tick finds them live again, however short the silence was (the
   * tick may not have seen it).
   */
  private heldBackOn = new Set<string>();
  /** Changed gateways whose users are still to be looked at, with the key the walk goes on at. */
  private looking = new Map<string, string>();
  /** Users whose last visit had more to prune than a visit may: visited at the next tick. */
  private revisits = new Set<string>();
  /** The user a tick is working on (keepingPlaces): the one to blame should the tick fail. */
  private working: string | undefined;
  /** Ticks in a row that failed at each user (a tick that gets through a user clears it). */
  private readonly failedAt = new Map<string, number>();
  /** The users the running tick has worked on. */
  private readonly workedOn = new Set<string>();
  /** Users left out of the ticks, until when (their work failed TICK_TRIES ticks in a row). */
  private readonly leftOut = new Map<string, number>();
  /** How pruning paces itself, and its two walks. */
  private readonly pacing: PruneOptions;
  private readonly pruneWalks: { users: SlicedWalk; dedup: SlicedWalk };

  constructor(private readonly options: UsersOptions) {
    this.pacing = options.prune ?? PRUNE_DEFAULTS;
    this.pruneWalks = {
      users: new SlicedWalk(this.pacing.everyMs),
      dedup: new SlicedWalk(this.pacing.dedupEveryMs),
    };
  }

  init(context: ProcessorContext<unknown>): void {
    this.context = context;
    this.metas = context.getStateStore('inbox-meta');
    this.entries = context.getStateStore('inbox');
    this.dedup = context.getStateStore('dedup');
    this.sessions = context.getStateStore('sessions');
    context.schedule(this.pacing.tickMs, 'WALL_CLOCK_TIME', (now) =>
      this.keepingPlaces(now, () => this.prune(now)),
    );
    context.schedule(CATCH_UP_INTERVAL_MS, 'WALL_CLOCK_TIME', (now) =>
      this.keepingPlaces(now, () => this.watchGateways(now)),
    );
  }

  async process(record: Record<Input>): Promise<void> {
    const command = toCommand(record.value, record.timestamp);
    if (command) await this.handle(record.key, command);
  }

  /** Runs one command for one user; answers the user's meta afterwards. */
  private async handle(userId: string, command: UserCommand): Promise<UserMeta> {
    const meta = (await this.metas.get(userId)) ?? newUserMeta();
    const liveGateways = this.options.liveGateways();
    let entries: InboxEntry[] = [];
    let pruned: { messageId: string; from: string } | undefined;
    for (const { from, to } of entriesNeeded(command, meta, liveGateways)) {
      const range = await this.entries.range(seqKey(userId, from), seqKey(userId, to));
      for (const [, entry] of range) entries.push(entry);
    }
    if (command.kind === 'read') {
      const found = await this.dedup.get(dedupStoreKey(userId, `m:${command.messageId}`));
      const entry = found && (await this.entries.get(seqKey(userId, found.seq)));
      if (entry) entries = [entry];
      else if (found?.from !== undefined)
        pruned = { messageId: command.messageId, from: found.from };
    }
    const duplicate =
      command.kind === 'append' &&
      (await this.dedup.get(dedupStoreKey(userId, command.dedupKey))) !== undefined;
    const events = decide(command, {
      userId,
      meta,
      entries,
      pruned,
      duplicate,
      liveGateways,
      gatewayStartedAt:
        command.kind === 'connected'
          ? this.options.gatewayStartedAt?.(command.gatewayId)
          : undefined,
    });
    if (command.kind === 'append' && !duplicate)
      for (const session of Object.values(meta.sessions))
        if (session.live && !liveGateways.has(session.gatewayId))
          this.heldBackOn.add(session.gatewayId);
    let next = meta;
    for (const event of events) {
      await this.indexSessions(userId, event, next);
      const before = next;
      next = evolve(next, event);
      await this.apply(userId, event, before);
    }
    if (next !== meta) this.metas.put(userId, next);
    return next;
  }

  /** Keeps the sessions store in step with the user's sessions (`before`: the meta before). */
  private async indexSessions(userId: string, event: UserEvent, before: UserMeta): Promise<void> {
    let gatewayId: string;
    if (event.type === 'session-opened') gatewayId = event.gatewayId;
    else if (event.type === 'session-closed' && own(before.sessions, event.connectionId))
      gatewayId = own(before.sessions, event.connectionId)!.gatewayId;
    else return;
    const key = sessionKey(gatewayId, userId);
    const others = ((await this.sessions.get(key)) ?? []).filter((c) => c !== event.connectionId);
    const held = event.type === 'session-opened' ? [...others, event.connectionId] : others;
    if (held.length > 0) this.sessions.put(key, held);
    else this.sessions.delete(key);
  }

  /** Writes the stores and forwards the records of one event (`before`: the meta before it). */
  private async apply(userId: string, event: UserEvent, before: UserMeta): Promise<void> {
    const { codecs } = this.options;
    switch (event.type) {
      case 'entry-appended':
        this.entries.put(seqKey(userId, event.entry.seq), event.entry);
        this.dedup.put(dedupStoreKey(userId, event.dedupKey), {
          seq: event.entry.seq,
          at: event.entry.at,
          // A message's sender, kept for a `read` of it after the entry is pruned.
          from: messageOf(event.entry)?.from,
        });
        return this.send('inbox-entries', userId, codecs.inboxEntries.encode(event.entry));
      case 'pruned':
        // Every kept entry below: those every device acked were not read, but go too.
        for (let seq = before.firstKept; seq < event.below; seq++)
          this.entries.delete(seqKey(userId, seq));
        return;
      case 'delivered':
        for (const entry of event.entries) {
          const delivery: Delivery = {
            userId,
            targets: event.targets,
            frame: { 'chat.v1.InboxEntry': entry },
            // On the part's last entry: the gateway asks for the next part once it is taken.
            more: event.more === true && entry === event.entries[event.entries.length - 1],
          };
          await this.send(
            'deliveries',
            userId,
            codecs.deliveries.encode(delivery),
            event.gatewayId,
          );
        }
        return;
      case 'typing-relayed': {
        const delivery: Delivery = {
          userId,
          targets: event.targets,
          frame: { 'chat.v1.Typing': event.typing },
          more: false,
        };
        return this.send('deliveries', userId, codecs.deliveries.encode(delivery), event.gatewayId);
      }
      case 'receipt-owed': {
        const command: InboxCommand = {
          userId: event.to,
          entry: { 'chat.v1.Receipt': event.receipt },
        };
        return this.send('receipts', event.to, codecs.messages.encode(command));
      }
      case 'push-requested':
        return this.send('push', userId, codecs.push.encode(event.request));
      case 'receipts-continued': {
        // A continued ack, keyed by this user: this task reads it after this commit.
        const command: UserCommandRecord = {
          userId,
          at: event.at,
          command: {
            'chat.v1.Ack': { deviceId: event.deviceId, upTo: event.upTo, continued: true },
          },
        };
        return this.send('own-acks', userId, codecs.userCommands.encode(command));
      }
      case 'refused': {
        const delivery: Delivery = {
          userId,
          targets: event.targets,
          frame: {
            'chat.v1.ErrorFrame': { id: event.id, code: event.code, message: event.message },
          },
          more: false,
        };
        return this.send('deliveries', userId, codecs.deliveries.encode(delivery), event.gatewayId);
      }
      default:
        return;
    }
  }

  private send(
    child: string,
    key: string,
    value: Buffer | null,
    gatewayId?: string,
  ): Promise<void> {
    return this.context.forward(
      { key, value: { value, gatewayId }, timestamp: this.options.now?.() ?? Date.now() },
      child,
    );
  }

  /**
   * Runs a tick; should it fail, puts back where its walks were. The task rolls the stores back
   * to before the tick, and a walk that went on past users whose work was undone would never
   * come back to them (a stale session left open for good, pruning skipped for a walk's round).
   * The user the tick failed at is blamed: one that fails TICK_TRIES ticks in a row is left out
   * of them for LEFT_OUT_MS, so that what fails for good for one user stops no walk for the
   * task's others.
   */
  private async keepingPlaces(now: number, tick: () => Promise<void>): Promise<void> {
    const looking = new Map(this.looking);
    const heldBackOn = new Set(this.heldBackOn);
    const startsBefore = this.startsBefore;
    const revisits = new Set(this.revisits);
    const walks = [this.pruneWalks.users.position(), this.pruneWalks.dedup.position()];
    this.workedOn.clear();
    try {
      await tick();
      for (const userId of this.workedOn) this.failedAt.delete(userId);
    } catch (error) {
      this.looking = looking;
      this.heldBackOn = heldBackOn;
      this.revisits = revisits;
      this.startsBefore = startsBefore;
      for (const putBack of walks) putBack();
      const blamed = this.working;
      if (blamed !== undefined) {
        const failed = (this.failedAt.get(blamed) ?? 0) + 1;
        this.failedAt.set(blamed, failed);
        if (failed >= TICK_TRIES) {
          this.failedAt.delete(blamed);
          this.leftOut.set(blamed, now + LEFT_OUT_MS);
        }
      }
      throw error;
    } finally {
      this.working = undefined;
    }
  }

  /** Whether the ticks leave this user out now; else it becomes the user they work on. */
  private leavesOut(userId: string, now: number): boolean {
    const until = this.leftOut.get(userId);
    if (until !== undefined && now < until) return true;
    if (until !== undefined) this.leftOut.delete(userId);
    this.working = userId;
    this.workedOn.add(userId);
    return false;
  }

  /**
   * Looks at the sessions on a gateway when it is heard again or has started a new run:
   *
   * - A gateway that crashed and came back under the same id holds none of the connections it
   *   had: their sessions are closed, as a DISCONNECTED would have (else they would count as
   *   online, and hold back push notifications).
   * - Sessions on a gateway that counted as silent (its heartbeats held up, say by a broker
   *   restart) got no live deliveries meanwhile: each that fell behind gets what it missed,
   *   however short the silence was.
   *
   * Only the users with sessions on such a gateway are looked at (the sessions store), at most
   * GATEWAY_USERS_PER_TICK a tick, the rest at the next ticks. The first tick of a task looks at
   * the users of every live gateway: either may have happened while the task was elsewhere.
   * (Sessions on a silent gateway count as offline anyway. Sessions opened
   * before the sessions store was kept are not in it: they close as before, when DISCONNECTED
   * comes or their gateway goes silent.)
   */
  private async watchGateways(now: number): Promise<void> {
    const live = this.options.liveGateways();
    const startedAt = (gatewayId: string) => this.options.gatewayStartedAt?.(gatewayId);
    const starts = new Map([...live].map((gatewayId) => [gatewayId, startedAt(gatewayId)]));
    const heard = [...this.heldBackOn].filter((gatewayId) => live.has(gatewayId));
    // On the first tick every live gateway counts as changed.
    const changed = new Set([
      ...heard,
      ...[...starts.keys()].filter(
        (id) => !this.startsBefore?.has(id) || this.startsBefore.get(id) !== starts.get(id),
      ),
    ]);
    // A gateway that changed again while its walk went on is walked again from its first user.
    for (const gatewayId of changed) this.looking.set(gatewayId, sessionKey(gatewayId, ''));
    this.startsBefore = starts;
    // Heard again: looked at now. Still silent: not needed, since a gateway that is not live at
    // this tick counts as changed at the tick that finds it live again (it is not in
    // startsBefore); kept, the ids of gateways that never come back would pile up.
    this.heldBackOn.clear();

    let budget = this.options.gatewayUsersPerTick ?? GATEWAY_USERS_PER_TICK;
    let caughtUp = 0;
    let closed = 0;
    const closedOn = new Set<string>();
    for (const [gatewayId, from] of this.looking) {
      if (budget <= 0) break;
      const { entries, next } = await this.sessions.scan(from, budget);
      const end = `${gatewayId}\u0001`;
      const mine = entries.filter(([key]) => key < end);
      for (const [key] of mine) {
        const userId = userOfSessionKey(key);
        const looked = this.leavesOut(userId, now)
          ? { closed: 0, caughtUp: 0 }
          : await this.lookAt(userId, live, now);
        for (const id of looked.closedOn ?? []) closedOn.add(id);
        closed += looked.closed;
        caughtUp += looked.caughtUp;
        this.looking.set(gatewayId, keyAfter(key));
      }
      budget -= mine.length;
      if (mine.length < entries.length || next === undefined) this.looking.delete(gatewayId);
    }
    this.working = undefined;
    if (closed > 0) this.options.onStaleSessions?.(closed, [...closedOn]);
    if (caughtUp > 0) this.options.onCatchUp?.(caughtUp);
  }

  /**
   * Closes the user's sessions held for an earlier run of their gateway, then sends the live
   * sessions that fell behind what they missed.
   */
  private async lookAt(
    userId: string,
    live: ReadonlySet<string>,
    now: number,
  ): Promise<{ closed: number; caughtUp: number; closedOn?: string[] }> {
    let meta = await this.metas.get(userId);
    if (!meta) return { closed: 0, caughtUp: 0 };
    const stale = Object.entries(meta.sessions).filter(([, session]) => {
      const start = this.options.gatewayStartedAt?.(session.gatewayId);
      return (
        start !== undefined && session.connectedAt !== undefined && session.connectedAt < start
      );
    });
    for (const [connectionId] of stale)
      meta = await this.handle(userId, { kind: 'disconnected', connectionId, at: now });
    const behind = sessionsBehind(meta, live).length;
    if (behind > 0) await this.handle(userId, { kind: 'catch-up' });
    const closedOn = stale.map(([, session]) => session.gatewayId);
    return { closed: stale.length, caughtUp: behind, closedOn };
  }

  /**
   * Drops a user's acknowledged entries, and its expired ones a slice at a time: another slice
   * while the one before was expired whole, up to PRUNE_SLICES_PER_VISIT; a user with more to
   * prune than that is visited again at the next tick (else an inbox that gains more than a
   * visit prunes an hour would grow for good).
   */
  private async pruneInbox(userId: string, now: number, retentionMs: number): Promise<void> {
    let firstKept = (await this.metas.get(userId))?.firstKept ?? 0;
    for (let slice = 0; slice < PRUNE_SLICES_PER_VISIT; slice++) {
      const before = firstKept;
      firstKept = (await this.handle(userId, { kind: 'prune', now, retentionMs })).firstKept;
      if (firstKept - before < PRUNE_SLICE_ENTRIES) return;
    }
    this.revisits.add(userId);
  }

  /** Drops acknowledged and expired entries, and dedup keys past retention. */
  private async prune(now: number): Promise<void> {
    const retentionMs = this.options.retentionMs ?? DEFAULT_RETENTION_MS;
    const { usersPerTick, dedupKeysPerTick } = this.pacing;
    let budget = usersPerTick;
    for (const userId of [...this.revisits].slice(0, budget)) {
      this.revisits.delete(userId);
      if (!this.leavesOut(userId, now)) await this.pruneInbox(userId, now, retentionMs);
      budget--;
    }
    const walked = budget > 0 ? await this.pruneWalks.users.slice(this.metas, budget, now) : [];
    for (const [userId, meta] of walked) {
      if (meta.firstKept < meta.nextSeq && !this.leavesOut(userId, now))
        await this.pruneInbox(userId, now, retentionMs);
    }
    this.working = undefined; // no user's work from here on
    for (const [key, { seq, at }] of await this.pruneWalks.dedup.slice(
      this.dedup,
      dedupKeysPerTick,
      now,
    )) {
      if (now - at <= retentionMs) continue;
      // Nor while the inbox still holds its entry (the walks run apart, and entries expire in
      // seq order, not by time): a retry would then be appended twice.
      const userId = userOfDedupStoreKey(key);
      // A user whose meta does not decode keeps its keys (the walk goes on past them).
      const firstKept = await this.metas.get(userId).then(
        (meta) => meta?.firstKept ?? Infinity,
        () => -Infinity,
      );
      if (seq >= firstKept) continue;
      this.dedup.delete(key);
    }
  }
}

/** Encoded records travel to the sinks as-is: the sink picks the topic. */
type Encoded = { value: Buffer | null; gatewayId?: string };

export function usersTopology(options: UsersOptions): Topology {
  const { codecs } = options;
  const source = <K extends Input['source']>(kind: K, codec: TopicCodec<unknown>) => ({
    decode: async (value: Buffer | null) => {
      if (value === null) throw new Error('a tombstone is not a command');
      return { source: kind, value: await codec.decode(value) } as Input;
    },
  });
  return new Topology()
    .addSource('connections', {
      topics: [topics.connections],
      ...source('connection', codecs.connections),
    })
    .addSource('messages', { topics: [topics.messages], ...source('message', codecs.messages) })
    .addSource('commands', {
      topics: [topics.userCommands],
      ...source('command', codecs.userCommands),
    })
    .addProcessor('inbox', () => new InboxProcessor(options), 'connections', 'messages', 'commands')
    .addStateStore({ name: 'inbox-meta' }, 'inbox')
    .addStateStore({ name: 'inbox' }, 'inbox')
    .addStateStore({ name: 'dedup' }, 'inbox')
    .addStateStore({ name: 'sessions' }, 'inbox')
    .addSink<Encoded>(
      'deliveries',
      { topic: (r) => deliveriesTopic(r.value.gatewayId!), encode: (e) => e.value },
      'inbox',
    )
    .addSink<Encoded>('receipts', { topic: topics.messages, encode: (e) => e.value }, 'inbox')
    .addSink<Encoded>('push', { topic: topics.push, encode: (e) => e.value }, 'inbox')
    .addSink<Encoded>('own-acks', { topic: topics.userCommands, encode: (e) => e.value }, 'inbox')
    .addSink<Encoded>(
      'inbox-entries',
      { topic: topics.inboxEntries, encode: (e) => e.value },
      'inbox',
    );
}
