/**
 * The users actor as a decider: the single writer of each user's inbox.
 *
 * `decide(command, view)` answers what happens to one user; `evolve(meta, event)` what the
 * actor knows afterwards. Inbox entries themselves are kept apart from the user's meta (one
 * store record per entry), so that an append reads and writes only the meta; commands that need
 * the entries (a connect, a sync, an ack, a prune) get them in the view, loaded by the
 * processor around this code.
 *
 * Replays and the order of seq: a new session is not live until its sync has run. The gateway
 * follows every CONNECTED with a Sync on `chat.user-commands`, the topic and partition that also
 * carries the device's acks, so every ack made before the reconnect is applied before the
 * replay: the replay starts above the device's last applied ack, and live deliveries start only
 * after it, keeping seq order. A Sync that overtakes its CONNECTED (they travel on different
 * topics) waits as pending until the session appears.
 *
 * Replays go out in parts (REPLAY_PART_ENTRIES, REPLAY_PART_BYTES): a device back from a long
 * absence may be owed more than its gateway would buffer for one connection. After a part that
 * leaves entries behind, the session waits (not live, `resumeAfter` set) until its gateway has
 * written the part and the client has read most of it; the gateway then asks for the next part
 * with a continued Sync after the part's last seq. Live entries wait meanwhile: the last part
 * ends at the inbox's head and makes the session live, so seq order holds throughout.
 */
import type { InboxEntry, PushRequest, Receipt, Typing } from '../../schemas/types.generated.ts';
import { branchOf } from '../../schemas/avro.ts';
import type { Decider } from '../runtime/decider.ts';
import { FROM_ACK } from '../../schemas/conventions.ts';

export type EntryBody = InboxEntry['entry'];

export interface Session {
  deviceId: string;
  gatewayId: string;
  /** False until the session's replay has been sent whole: live deliveries wait for it. */
  live: boolean;
  /**
   * The last seq of the replay part sent, while more wait for the gateway's continued Sync after
   * it (absent: no part waits).
   */
  resumeAfter?: number;
  /**
   * The highest seq sent to this connection, by its replay or live. What it missed while its
   * gateway counted as silent goes to it, in order, as soon as the gateway is heard again.
   * (Absent in sessions stored before it was kept: taken as having everything.)
   */
  sentUpTo?: number;
  /** When the gateway recorded the connection (absent in sessions stored before it was kept). */
  connectedAt?: number;
}

export interface UserMeta {
  /** The seq the next entry gets: 1, 2, 3... */
  nextSeq: number;
  /** The lowest seq still kept; everything below was pruned. */
  firstKept: number;
  /** `delivered` receipts have been owed for every message up to this seq. */
  receiptedUpTo: number;
  /**
   * Every device that opened a WebSocket, with its cumulative ack and when it was last seen
   * (connected or acked; absent in metas stored before it was kept). At most MAX_DEVICES, and
   * the EVICTED placeholder of those evicted past it. None is forgotten: a device gone for good
   * holds back what it did not ack until it expires, as PROTOCOL says.
   */
  devices: Record<string, Device>;
  /** Open connections, by connectionId. */
  sessions: Record<string, Session>;
  /** Syncs that arrived before their connection's CONNECTED, oldest first (MAX_PENDING_SYNCS). */
  pendingSyncs: Record<string, PendingSync>;
  /**
   * Connections whose pending Sync was pushed out past MAX_PENDING_SYNCS, the last
   * DROPPED_SYNCS (absent in metas stored before it was kept): their CONNECTED replays from the
   * device's ack as if the Sync were still waiting, since that Sync will not come again.
   */
  droppedSyncs?: string[];
  /**
   * The last RECENTLY_CLOSED connections closed (absent in metas stored before it was kept): a
   * Sync that comes after its connection's DISCONNECTED is dropped, not left pending for good.
   */
  recentlyClosed?: string[];
  /**
   * While receipts are owed, where the prune walk last saw them owed through and when, by its
   * own clock (absent: not seen owed since it was kept): it starts their chain again when they
   * have not moved on for RECEIPTS_RESTART_MS.
   */
  receiptsWatch?: { through: number; at: number };
  /**
   * The highest ack any device has made, and the device that made it (absent in metas stored
   * before it was kept: the highest in `devices`). It never falls: a device evicted past
   * MAX_DEVICES leaves it here, so what `delivered` receipts are owed for does not hang on
   * which devices are still remembered.
   */
  highestAck?: HighestAck;
  /** Devices registered for push, by deviceId, oldest registration first (MAX_DEVICES). */
  push: Record<string, { pushToken: string; platform: string | null }>;
}

export interface Device {
  ack: number;
  seenAt?: number;
}

export interface HighestAck {
  deviceId: string;
  upTo: number;
}

/**
 * A Sync waiting for its CONNECTED. Its device is registered at once (see `sync-pending`), but
 * the replay is the session's, from the CONNECTED, whatever device the Sync named.
 */
export interface PendingSync {
  /** FROM_ACK, or the lowest `after` of the syncs that waited. */
  after: number;
  /** Another of them asked FROM_ACK too: the replay starts at the lower of both. */
  fromAck?: boolean;
  /** The device the Sync named (absent in metas stored before it was kept). */
  deviceId?: string;
}

/**
 * Where the replay of a pending sync starts above, for the session's device: the ack is read
 * at the CONNECTED, when every ack before the reconnect has been applied.
 */
function pendingAfter(meta: UserMeta, deviceId: string, pending: PendingSync): number {
  const after = replayAfter(meta, deviceId, pending.after);
  return pending.fromAck ? Math.min(after, replayAfter(meta, deviceId, FROM_ACK)) : after;
}

/** Two syncs that waited for one CONNECTED, as one: its replay covers both of theirs. */
function mergedSync(waiting: PendingSync, after: number): PendingSync {
  if (waiting.after === FROM_ACK) return after === FROM_ACK ? { after } : { after, fromAck: true };
  if (after === FROM_ACK) return { after: waiting.after, fromAck: true };
  return { after: Math.min(waiting.after, after), ...(waiting.fromAck ? { fromAck: true } : {}) };
}

/**
 * Devices remembered per user, at most. A user's meta is read and written whole on every
 * record, so it must not grow with every deviceId a client ever made up: past the limit, a new
 * device evicts the least recently seen one without an open connection into the EVICTED
 * placeholder; it counts as a new device when it comes back (docs/websocket.md).
 */
export const MAX_DEVICES = 64;
/**
 * The place of every device evicted past MAX_DEVICES, in `devices`: the lowest of their acks
 * and the latest time one was seen. It holds back pruning as they did, so that nothing they
 * had not acked goes before it expires. Not a deviceId: those are [A-Za-z0-9_-].
 */
export const EVICTED = '*evicted';
/**
 * Sessions per user past which a new one closes the oldest on silent gateways. A session closes
 * on its DISCONNECTED, or when its gateway restarts under the same id; one on a gateway that
 * never comes back (a container that restarts under a new hostname) would otherwise stay for
 * good. Sessions on live gateways are never closed for it: their connections are open, and the
 * gateway would go on holding them without deliveries.
 */
export const MAX_SESSIONS = 64;
/**
 * Syncs waiting for their CONNECTED, per user, at most: past it the oldest is dropped, and its
 * connection is remembered in `droppedSyncs` (DROPPED_SYNCS of them) so that its CONNECTED
 * still replays.
 */
export const MAX_PENDING_SYNCS = 16;
export const DROPPED_SYNCS = 64;
/** Connections remembered as closed, per user. */
export const RECENTLY_CLOSED = 16;

export const newUserMeta = (): UserMeta => ({
  nextSeq: 1,
  firstKept: 1,
  receiptedUpTo: 0,
  devices: {},
  sessions: {},
  pendingSyncs: {},
  recentlyClosed: [],
  push: {},
});

export interface UserView {
  userId: string;
  meta: UserMeta;
  /** The kept entries in seq order, when the command needs them (else empty). */
  entries: InboxEntry[];
  /**
   * For a read whose message is no longer kept (every device acked it, so it was pruned): the
   * message as its dedup key remembers it. Still in the inbox for the reader, who has it.
   */
  pruned?: { messageId: string; from: string };
  /** For an append: the inbox already holds this entry (same dedup key). */
  duplicate: boolean;
  /** Gateways heard from lately: sessions on any other gateway count as offline. */
  liveGateways: ReadonlySet<string>;
  /**
   * For a CONNECTED: when the current run of its gateway started, as the gateway's heartbeats
   * say (undefined: not told). A connection recorded before it belongs to an earlier run.
   */
  gatewayStartedAt?: number;
}

export { FROM_ACK } from '../../schemas/conventions.ts';

export type UserCommand =
  | { kind: 'connected'; deviceId: string; gatewayId: string; connectionId: string; at: number }
  | { kind: 'disconnected'; connectionId: string; at: number }
  | { kind: 'append'; entry: EntryBody; dedupKey: string; at: number }
  /**
   * `continued`: not a device's ack but the actor's own, written by it for itself
   * (`receipts-continued`): receipts are still owed up to `upTo`.
   */
  | { kind: 'ack'; deviceId: string; upTo: number; continued?: boolean; at: number }
  /** view.entries holds the message when the inbox has it. */
  | {
      kind: 'read';
      deviceId: string;
      messageId: string;
      /** Where the read frame came on, and its id: the error answer goes there. */
      connectionId: string | null;
      id: string | null;
      at: number;
    }
  | { kind: 'typing'; typing: Typing }
  /** `continued`: the gateway asks for the next part of a replay (see the module comment). */
  | {
      kind: 'sync';
      deviceId: string;
      connectionId: string;
      after: number;
      continued?: boolean;
      at: number;
    }
  | { kind: 'device-registered'; deviceId: string; pushToken: string; platform: string | null }
  | { kind: 'device-removed'; deviceId: string; pushToken: string | null }
  | { kind: 'prune'; now: number; retentionMs: number }
  /** Send live sessions on live gateways what they missed (their gateway was silent). */
  | { kind: 'catch-up' };

export interface Target {
  deviceId: string;
  connectionId: string;
}

export type UserEvent =
  // Facts that change the meta:
  | {
      type: 'session-opened';
      connectionId: string;
      deviceId: string;
      gatewayId: string;
      live: boolean;
      connectedAt: number;
    }
  /** `at`: when the device was last seen on it (its DISCONNECTED's time), when known. */
  | { type: 'session-closed'; connectionId: string; at?: number }
  | {
      type: 'sync-pending';
      connectionId: string;
      after: number;
      fromAck?: boolean;
      /** The device the Sync named, known from now on, seen at `at`. */
      deviceId: string;
      at: number;
    }
  /** Devices evicted past MAX_DEVICES: folded into the EVICTED placeholder. */
  | { type: 'devices-evicted'; deviceIds: string[]; at: number }
  /** The session's replay has been sent: it has every entry up to `sentUpTo`. */
  | { type: 'session-live'; connectionId: string; sentUpTo: number }
  /** A part of the session's replay has been sent, up to `resumeAfter`; more wait. */
  | { type: 'session-paced'; connectionId: string; resumeAfter: number }
  | { type: 'entry-appended'; entry: InboxEntry; dedupKey: string }
  | { type: 'acked'; deviceId: string; upTo: number; at: number }
  | { type: 'receipted'; upTo: number }
  /** The prune walk saw receipts owed through `through`, at `at` by its clock. */
  | { type: 'receipts-watched'; through: number; at: number }
  | { type: 'push-registered'; deviceId: string; pushToken: string; platform: string | null }
  | { type: 'push-removed'; deviceId: string }
  | { type: 'pruned'; below: number }
  // Facts about what was sent, which the processor turns into records:
  /** `more`: the entries are a part of a replay, and more wait for the gateway to ask. */
  | {
      type: 'delivered';
      gatewayId: string;
      targets: Target[];
      entries: InboxEntry[];
      more?: boolean;
    }
  | { type: 'typing-relayed'; gatewayId: string; targets: Target[]; typing: Typing }
  | {
      type: 'refused';
      gatewayId: string;
      targets: Target[];
      id: string | null;
      code: 'unknown_message';
      message: string;
    }
  | { type: 'receipt-owed'; to: string; receipt: Receipt }
  /**
   * Receipts are owed up to `upTo` past what one command may owe: a continued ack, which the
   * actor writes for itself, goes on with them.
   */
  | { type: 'receipts-continued'; deviceId: string; upTo: number; at: number }
  | { type: 'push-requested'; request: PushRequest };

/**
 * A record's own entry: a deviceId may be `constructor` or `__proto__` ([A-Za-z0-9_-]), which a
 * plain lookup would find on Object.prototype; so may a connectionId on a forged record.
 */
export const own = <V>(record: Record<string, V>, key: string): V | undefined =>
  Object.prototype.hasOwnProperty.call(record, key) ? record[key] : undefined;

/** The message of an entry, when the entry is a message copy. */
export function messageOf(entry: InboxEntry) {
  const { name, value } = branchOf(entry.entry);
  return name === 'chat.v1.MessageCopy' ? value : undefined;
}

/**
 * Live sessions on live gateways that were not sent every entry up to `upTo` (and whose device
 * has not acked them either), with the seq their catch-up starts above.
 */
export function sessionsBehind(
  meta: UserMeta,
  liveGateways: ReadonlySet<string>,
  upTo = meta.nextSeq - 1,
): Array<{ connectionId: string; session: Session; after: number }> {
  const behind = [];
  for (const [connectionId, session] of Object.entries(meta.sessions)) {
    if (!session.live || session.sentUpTo === undefined) continue;
    if (!liveGateways.has(session.gatewayId)) continue;
    const after = Math.max(session.sentUpTo, own(meta.devices, session.deviceId)?.ack ?? 0);
    if (after < upTo) behind.push({ connectionId, session, after });
  }
  return behind;
}

/** Live sessions on live gateways, grouped by gateway. */
function liveTargets(view: UserView, only?: (s: Session, connectionId: string) => boolean) {
  const byGateway = new Map<string, Target[]>();
  for (const [connectionId, session] of Object.entries(view.meta.sessions)) {
    if (!view.liveGateways.has(session.gatewayId)) continue;
    if (only ? !only(session, connectionId) : !session.live) continue;
    const list = byGateway.get(session.gatewayId) ?? [];
    list.push({ deviceId: session.deviceId, connectionId });
    byGateway.set(session.gatewayId, list);
  }
  return byGateway;
}

/**
 * The replay of a sync: every kept entry above `after` (or the device's ack), to one session,
 * its first part now. Sent whether or not the gateway counts as live: the sync itself just came
 * through it.
 */
function replay(
  view: UserView,
  connectionId: string,
  session: Session,
  after: number,
): UserEvent[] {
  const from = replayAfter(view.meta, session.deviceId, after);
  return sendPart(connectionId, session, view.entries, from, view.meta.nextSeq - 1);
}

/**
 * A replay part goes out with at most this many entries: a Kafka transaction and a gateway's
 * batch of deliveries stay bounded, and so does what one command reads from the inbox.
 */
export const REPLAY_PART_ENTRIES = 256;
/**
 * And with at most this many bytes of entries (about what their frames weigh): with the
 * gateway's resume threshold (REPLAY_RESUME_BYTES in gateway/limits.ts) it stays well under a
 * connection's send buffer limit, whatever the bodies weigh.
 */
export const REPLAY_PART_BYTES = 256 * 1024;

/**
 * About the bytes of an entry's frame: a message's body plus room for its other fields; any
 * other entry's fields as JSON (a group notice lists members: not only bodies weigh).
 */
function frameBytes(entry: InboxEntry): number {
  const message = messageOf(entry);
  return message
    ? Buffer.byteLength(message.body) + 256
    : Buffer.byteLength(JSON.stringify(entry.entry)) + 64;
}

/**
 * The entries above `after` that go in one part: in a row of seqs (`entries` may stop short of
 * the head, or have a gap before an entry just appended), at most REPLAY_PART_ENTRIES and
 * REPLAY_PART_BYTES, and at least one.
 */
export function replayPart(entries: InboxEntry[], after: number): InboxEntry[] {
  const part: InboxEntry[] = [];
  let bytes = 0;
  for (const entry of entries) {
    if (entry.seq <= after) continue;
    const last = part[part.length - 1];
    if (last && entry.seq !== last.seq + 1) break;
    bytes += frameBytes(entry);
    if (last && (part.length >= REPLAY_PART_ENTRIES || bytes > REPLAY_PART_BYTES)) break;
    part.push(entry);
  }
  return part;
}

/**
 * Sends a session the part of what it is owed above `after` that goes now. The session is live
 * afterwards when the part reaches `head`, else it waits at the part's last seq.
 */
function sendPart(
  connectionId: string,
  session: Session,
  entries: InboxEntry[],
  after: number,
  head: number,
): UserEvent[] {
  const part = replayPart(entries, after);
  const last = part[part.length - 1]?.seq ?? head;
  const more = last < head;
  const events: UserEvent[] = [];
  if (part.length > 0) {
    events.push({
      type: 'delivered',
      gatewayId: session.gatewayId,
      targets: [{ deviceId: session.deviceId, connectionId }],
      entries: part,
      ...(more ? { more } : {}),
    });
  }
  events.push(
    more
      ? { type: 'session-paced', connectionId, resumeAfter: last }
      : { type: 'session-live', connectionId, sentUpTo: head },
  );
  return events;
}

/** Devices with an open connection, never evicted: a session, or a Sync waiting for its CONNECTED. */
const connectedDevices = (meta: UserMeta) =>
  new Set([
    ...Object.values(meta.sessions).map((s) => s.deviceId),
    ...Object.values(meta.pendingSyncs).flatMap((p) =>
      p.deviceId === undefined ? [] : [p.deviceId],
    ),
  ]);

/**
 * The Sync a CONNECTED replays for: the one waiting for it, or FROM_ACK for a connection whose
 * Sync waited and was pushed out past MAX_PENDING_SYNCS.
 */
function syncWaitingFor(meta: UserMeta, connectionId: string): PendingSync | undefined {
  return (
    own(meta.pendingSyncs, connectionId) ??
    (meta.droppedSyncs?.includes(connectionId) ? { after: FROM_ACK } : undefined)
  );
}

/**
 * Room for a device the actor does not know: when it already remembers MAX_DEVICES, it evicts
 * the least recently seen without an open connection (none: a meta stored without seenAt), at
 * `at` (the time the placeholder takes for devices stored without seenAt).
 */
function makeRoomFor(meta: UserMeta, deviceId: string, at: number): UserEvent[] {
  const known = Object.keys(meta.devices).filter((id) => id !== EVICTED);
  if (own(meta.devices, deviceId) || known.length < MAX_DEVICES) return [];
  const connected = connectedDevices(meta);
  const deviceIds = known
    .filter((id) => !connected.has(id))
    .sort((a, b) => (meta.devices[a]!.seenAt ?? 0) - (meta.devices[b]!.seenAt ?? 0))
    .slice(0, known.length - MAX_DEVICES + 1);
  return deviceIds.length > 0 ? [{ type: 'devices-evicted', deviceIds, at }] : [];
}

/**
 * Room for one more session past MAX_SESSIONS: the oldest on silent gateways closed. While the
 * gateway of the new connection itself counts as silent, the limit is twice that: it has just
 * written the CONNECTED, so the heartbeats lag (a broker restart holds up every gateway's), and
 * the others may be as alive as it is; the sessions past MAX_SESSIONS go at a later CONNECTED.
 * But a gateway never heard at all (one that dies at each start, under a new id each time)
 * must not make sessions pile up without end.
 */
function closeOldestSessions(
  meta: UserMeta,
  liveGateways: ReadonlySet<string>,
  gatewayId: string,
): UserEvent[] {
  const open = Object.entries(meta.sessions);
  const limit = liveGateways.has(gatewayId) ? MAX_SESSIONS : 2 * MAX_SESSIONS;
  if (open.length < limit) return [];
  return open
    .filter(([, s]) => !liveGateways.has(s.gatewayId))
    .sort(([, a], [, b]) => (a.connectedAt ?? 0) - (b.connectedAt ?? 0))
    .slice(0, open.length - limit + 1)
    .map(([connectionId]) => ({ type: 'session-closed', connectionId }));
}

/** Where a replay for this device starts above: `after`, or its ack for FROM_ACK. */
const replayAfter = (meta: UserMeta, deviceId: string, after: number) =>
  after === FROM_ACK ? (own(meta.devices, deviceId)?.ack ?? 0) : after;

/**
 * Entries a prune looks at, at most: the first ones above what every device acked, to see which
 * expired. An inbox that holds more expired entries than this loses them a slice per prune.
 */
export const PRUNE_SLICE_ENTRIES = 64;

/**
 * Entries one command prunes for acks, at most (each is a store delete and a changelog
 * tombstone in the command's transaction): the ack of a device back from a long absence
 * prunes the rest at the next acks, or the walk's visits.
 */
export const PRUNED_PER_COMMAND = 1_024;

/**
 * The seq below which acks alone let entries go: every device that ever connected acked them
 * (at most PRUNED_PER_COMMAND above what is kept).
 */
function prunableBelow(meta: UserMeta): number {
  const devices = Object.values(meta.devices);
  // A loop, not Math.min(...): spread arguments overflow the stack past ~100,000 devices.
  const ackedByAll =
    devices.length === 0 ? 0 : devices.reduce((m, d) => Math.min(m, d.ack), Infinity);
  // Not an entry whose `delivered` receipt is still owed: the receipt is read from it.
  const below = Math.min(ackedByAll, meta.receiptedUpTo) + 1;
  return Math.max(meta.firstKept, Math.min(below, meta.firstKept + PRUNED_PER_COMMAND));
}

/**
 * Entries one ack owes `delivered` receipts for, at most (each is an entry read and a record):
 * an ack that covers more, from a device back from a long absence, asks the actor to go on with
 * a continued ack on `chat.user-commands` for itself, which owes the next ones.
 */
export const RECEIPTED_PER_COMMAND = 1_024;

/**
 * The seq above which `delivered` receipts are still to be owed: receiptedUpTo, or, when
 * entries above it expired unacked (no receipt was owed for them), the last of those.
 */
const receiptedThrough = (meta: UserMeta) => Math.max(meta.receiptedUpTo, meta.firstKept - 1);

/**
 * How long receipts may stay owed without moving on, by the prune walk's clock, before it takes
 * their chain for lost and starts it again (a chain takes milliseconds a link). Not by the
 * acks' times: those are the gateways', and a gateway's clock ahead would hold a restart off.
 */
export const RECEIPTS_RESTART_MS = 60_000;

/** How far an ack up to `upTo` owes receipts in this command. */
const receiptsThrough = (meta: UserMeta, upTo: number) =>
  Math.min(upTo, meta.nextSeq - 1, receiptedThrough(meta) + RECEIPTED_PER_COMMAND);

/**
 * The highest ack any device has made: the one kept, or a device's if higher (a meta stored
 * before it was kept, or since by a processor of an earlier version that did not raise it). In
 * `devices`, a device rather than the EVICTED placeholder at a tie: every device evicted into
 * the placeholder acked at least as far as its ack.
 */
function highestAckOf(meta: UserMeta): HighestAck | undefined {
  let top = meta.highestAck;
  for (const [deviceId, device] of Object.entries(meta.devices))
    if (!top || device.ack > top.upTo || (device.ack === top.upTo && top.deviceId === EVICTED))
      top = { deviceId, upTo: device.ack };
  return top;
}

/**
 * The highest ack, when it is past what receipts have been owed for: the rest are owed through
 * a continued ack naming its device (none: nothing is owed). A processor of an earlier version
 * takes a continued ack for an ack of the device it names, which has acked that far already.
 */
function receiptsPending(meta: UserMeta): HighestAck | undefined {
  const top = highestAckOf(meta);
  return top && top.upTo > receiptedThrough(meta) ? top : undefined;
}

/**
 * Where a prune's kept entries start: above what every device acked, and above the expired
 * entries that follow (a prefix: expiry stops at the first entry that is not too old, and at
 * `owedFrom`, the first whose receipt is still owed). `entries`: the slice right above what
 * every device acked.
 */
function prunedBelow(
  meta: UserMeta,
  entries: InboxEntry[],
  now: number,
  retentionMs: number,
  owedFrom: number,
) {
  let below = prunableBelow(meta);
  for (const entry of entries) {
    if (entry.seq < below) continue;
    if (entry.seq >= owedFrom) break;
    if (entry.seq > below || now - entry.at <= retentionMs) break;
    below = entry.seq + 1;
  }
  return Math.min(below, meta.nextSeq);
}

/** Seqs from `from` up to, not including, `to`. */
export interface SeqRange {
  from: number;
  to: number;
}

/**
 * The seqs of kept entries a command's decision reads, for the processor to load: ranges in
 * seq order that do not overlap (none: empty). `read` finds its one entry by messageId instead.
 * An ack reads only what it may owe receipts for, a replay one part, and a catch-up one part
 * for each session behind (they may be far apart): nothing costs the whole inbox.
 */
export function entriesNeeded(
  command: UserCommand,
  meta: UserMeta,
  liveGateways: ReadonlySet<string>,
): SeqRange[] {
  return merged(rangesNeeded(command, meta, liveGateways));
}

/** The ranges sorted, those that overlap or touch made one. */
function merged(ranges: Array<SeqRange | undefined>): SeqRange[] {
  const out: SeqRange[] = [];
  for (const range of ranges.filter((r) => r !== undefined).sort((a, b) => a.from - b.from)) {
    const last = out[out.length - 1];
    if (last && range.from <= last.to) last.to = Math.max(last.to, range.to);
    else out.push({ ...range });
  }
  return out;
}

function rangesNeeded(
  command: UserCommand,
  meta: UserMeta,
  liveGateways: ReadonlySet<string>,
): Array<SeqRange | undefined> {
  const replayFrom = (deviceId: string, after: number) => replayAfter(meta, deviceId, after) + 1;
  // At most `count` kept entries from `from` on.
  const aSlice = (from: number, count: number) => {
    const first = Math.max(from, meta.firstKept);
    return first < meta.nextSeq
      ? { from: first, to: Math.min(meta.nextSeq, first + count) }
      : undefined;
  };
  // A replay reads one part's worth.
  const aPart = (from: number) => aSlice(from, REPLAY_PART_ENTRIES);
  switch (command.kind) {
    case 'connected': {
      // The replay is the session's, whatever device the sync named (as in decide).
      const pending = syncWaitingFor(meta, command.connectionId);
      return pending ? [aPart(pendingAfter(meta, command.deviceId, pending) + 1)] : [];
    }
    case 'sync': {
      const session = own(meta.sessions, command.connectionId);
      if (!session) return [];
      if (command.continued)
        return session.resumeAfter === command.after ? [aPart(command.after + 1)] : [];
      return [aPart(replayFrom(session.deviceId, command.after))];
    }
    case 'ack': {
      const from = receiptedThrough(meta) + 1;
      const through = receiptsThrough(meta, command.upTo);
      return through >= from ? [{ from, to: through + 1 }] : [];
    }
    case 'prune': {
      // Only the slice right above what every device acked: whether its first entries expired.
      return [aSlice(prunableBelow(meta), PRUNE_SLICE_ENTRIES)];
    }
    case 'append':
    case 'catch-up': {
      // What sessions that fell behind missed, a part each; nothing when none did (the usual
      // case).
      return sessionsBehind(meta, liveGateways).map((b) => aPart(b.after + 1));
    }
    default:
      return [];
  }
}

export function decide(command: UserCommand, view: UserView): UserEvent[] {
  const { meta } = view;
  switch (command.kind) {
    case 'connected': {
      // A redelivered event, or one whose connection closed already.
      if (own(meta.sessions, command.connectionId)) return [];
      if (meta.recentlyClosed?.includes(command.connectionId)) return [];
      if (view.gatewayStartedAt !== undefined && command.at < view.gatewayStartedAt) {
        // The gateway has restarted since, and holds the connection no more: no session opens
        // (it would never close); a sync waiting for it, or still to come, is dropped.
        return [{ type: 'session-closed', connectionId: command.connectionId }];
      }
      const session = {
        deviceId: command.deviceId,
        gatewayId: command.gatewayId,
        live: false,
        connectedAt: command.at,
      } satisfies Session;
      const opened: UserEvent = {
        type: 'session-opened',
        connectionId: command.connectionId,
        ...session,
      };
      const pending = syncWaitingFor(meta, command.connectionId);
      const closed = closeOldestSessions(meta, view.liveGateways, command.gatewayId);
      return [
        ...closed,
        // The devices of the sessions just closed may make room.
        ...makeRoomFor(closed.reduce(evolve, meta), command.deviceId, command.at),
        opened,
        ...(pending
          ? replay(
              view,
              command.connectionId,
              session,
              pendingAfter(meta, command.deviceId, pending),
            )
          : []),
      ];
    }

    case 'disconnected': {
      const known =
        own(meta.sessions, command.connectionId) || own(meta.pendingSyncs, command.connectionId);
      // Only the connection it names: a reconnect's new session is never removed by the old one.
      return known
        ? [{ type: 'session-closed', connectionId: command.connectionId, at: command.at }]
        : [];
    }

    case 'sync': {
      const session = own(meta.sessions, command.connectionId);
      if (command.continued) {
        // The next part, unless the session no longer waits there: it closed, a client sync
        // started its replay again, or this repeats a continued Sync already served.
        if (!session || session.resumeAfter !== command.after) return [];
        return replay(view, command.connectionId, session, command.after);
      }
      if (!session) {
        // After its connection's DISCONNECTED: nothing to replay to, ever.
        if (meta.recentlyClosed?.includes(command.connectionId)) return [];
        // A second sync before the CONNECTED: the replay covers both.
        const waiting = own(meta.pendingSyncs, command.connectionId);
        // Its connection is open (the gateway wrote `ready` once the CONNECTED was durable): its
        // device holds back pruning, and is not evicted, from here on, not only from the
        // CONNECTED, which may be read after acks of other devices that follow this Sync.
        return [
          ...makeRoomFor(meta, command.deviceId, command.at),
          {
            type: 'sync-pending',
            connectionId: command.connectionId,
            ...(waiting ? mergedSync(waiting, command.after) : { after: command.after }),
            deviceId: command.deviceId,
            at: command.at,
          },
        ];
      }
      return replay(view, command.connectionId, session, command.after);
    }

    case 'append': {
      if (view.duplicate) return []; // exactly once in the inbox
      const entry: InboxEntry = {
        userId: view.userId,
        seq: meta.nextSeq,
        at: command.at,
        entry: command.entry,
      };
      const events: UserEvent[] = [{ type: 'entry-appended', entry, dedupKey: command.dedupKey }];
      // A session that missed entries gets them first, with this one: it never sees a gap.
      const behind = sessionsBehind(meta, view.liveGateways);
      const lagging = new Set(behind.map((b) => b.connectionId));
      const targets = liveTargets(view, (s, connectionId) => s.live && !lagging.has(connectionId));
      for (const [gatewayId, list] of targets)
        events.push({ type: 'delivered', gatewayId, targets: list, entries: [entry] });
      // A session that fell behind gets the first part of what it missed.
      for (const { connectionId, session, after } of behind)
        events.push(...sendPart(connectionId, session, [...view.entries, entry], after, entry.seq));
      const message = messageOf(entry);
      const online = Object.values(meta.sessions).some((s) => view.liveGateways.has(s.gatewayId));
      const pushDevices = Object.entries(meta.push);
      if (message && message.from !== view.userId && !online && pushDevices.length > 0) {
        events.push({
          type: 'push-requested',
          request: {
            userId: view.userId,
            seq: entry.seq,
            messageId: message.messageId,
            from: message.from,
            group: message.group,
            devices: pushDevices.map(([deviceId, d]) => ({
              deviceId,
              pushToken: d.pushToken,
              platform: d.platform,
            })),
            notification: { title: message.from, body: previewOf(message.body) },
            at: command.at,
          },
        });
      }
      return events;
    }

    case 'ack': {
      const device = own(meta.devices, command.deviceId);
      // Acks are cumulative and cannot reach past what the inbox holds.
      const upTo = Math.min(command.upTo, meta.nextSeq - 1);
      // The actor's own continued ack only owes receipts: it moves no ack, evicts no device.
      const raises = !command.continued && (!device || upTo > device.ack);
      // Owed receipts: of this ack, or of an earlier one that covered more than one command owes.
      const from = receiptedThrough(meta);
      const through = receiptsThrough(meta, upTo);
      if (!raises && through <= from) return [];
      const events: UserEvent[] = raises
        ? [
            ...makeRoomFor(meta, command.deviceId, command.at),
            { type: 'acked', deviceId: command.deviceId, upTo, at: command.at },
          ]
        : [];
      if (through > from) {
        // One `delivered` per message and recipient: on the first ack of any device covering it.
        for (const entry of view.entries) {
          const message = messageOf(entry);
          if (!message || entry.seq <= from || entry.seq > through || message.from === view.userId)
            continue;
          events.push({
            type: 'receipt-owed',
            to: message.from,
            receipt: {
              messageId: message.messageId,
              by: view.userId,
              status: 'delivered',
              at: command.at,
            },
          });
        }
        events.push({ type: 'receipted', upTo: through });
        if (through < upTo)
          events.push({
            type: 'receipts-continued',
            deviceId: command.deviceId,
            upTo,
            at: command.at,
          });
      }
      // What every device has now acked goes at once; the prune walk is left with expiry.
      const below = prunableBelow(events.reduce(evolve, meta));
      if (below > meta.firstKept) events.push({ type: 'pruned', below });
      return events;
    }

    case 'read': {
      const message =
        view.entries.map(messageOf).find((m) => m?.messageId === command.messageId) ??
        (view.pruned?.messageId === command.messageId ? view.pruned : undefined);
      if (!message) {
        // Answered on the connection the read came on (or, when unknown, the device's).
        const targets = liveTargets(view, (s, connectionId) =>
          command.connectionId
            ? connectionId === command.connectionId
            : s.deviceId === command.deviceId,
        );
        return [...targets].map(([gatewayId, list]) => ({
          type: 'refused' as const,
          gatewayId,
          targets: list,
          id: command.id,
          code: 'unknown_message' as const,
          message: `no message ${command.messageId} in your inbox`,
        }));
      }
      if (message.from === view.userId) return []; // reading one's own message owes no receipt
      return [
        {
          type: 'receipt-owed',
          to: message.from,
          receipt: {
            messageId: message.messageId,
            by: view.userId,
            status: 'read',
            at: command.at,
          },
        },
      ];
    }

    case 'typing': {
      // Relayed to live devices only, never stored.
      return [...liveTargets(view)].map(([gatewayId, targets]) => ({
        type: 'typing-relayed' as const,
        gatewayId,
        targets,
        typing: command.typing,
      }));
    }

    case 'device-registered': {
      const current = own(meta.push, command.deviceId);
      if (current?.pushToken === command.pushToken && current.platform === command.platform)
        return [];
      return [
        {
          type: 'push-registered',
          deviceId: command.deviceId,
          pushToken: command.pushToken,
          platform: command.platform,
        },
      ];
    }

    case 'device-removed': {
      const current = own(meta.push, command.deviceId);
      if (!current) return [];
      // The push actor names the token it found invalid: one registered since is kept.
      if (command.pushToken !== null && current.pushToken !== command.pushToken) return [];
      return [{ type: 'push-removed', deviceId: command.deviceId }];
    }

    case 'catch-up':
      return sessionsBehind(meta, view.liveGateways).flatMap(({ connectionId, session, after }) =>
        sendPart(connectionId, session, view.entries, after, meta.nextSeq - 1),
      );

    case 'prune': {
      // Kept until every device that ever connected acked it, or until it is too old. Both
      // rules remove a prefix of the inbox: acks are cumulative, and expiry stops at the first
      // entry that is not too old (the entries in view are the slice right above the acked).
      // Nor an entry a device acked whose receipt is still owed: a continued ack will read it.
      const pending = receiptsPending(meta);
      const through = receiptedThrough(meta);
      const owedFrom = pending ? through + 1 : Infinity;
      const below = prunedBelow(meta, view.entries, command.now, command.retentionMs, owedFrom);
      const events: UserEvent[] = below > meta.firstKept ? [{ type: 'pruned', below }] : [];
      // Receipts still owed, and not moved on for a while: their chain was lost (a processor
      // of an earlier version dropped it), and starts again. Should it still be on its way,
      // that is harmless: what one owes, the other finds owed already.
      if (!pending) return events;
      const watch = meta.receiptsWatch;
      const moved = !watch || watch.through !== through || command.now < watch.at;
      if (moved || command.now - watch.at >= RECEIPTS_RESTART_MS) {
        if (!moved) events.push({ type: 'receipts-continued', ...pending, at: command.now });
        events.push({ type: 'receipts-watched', through, at: command.now });
      }
      return events;
    }
  }
}

export function evolve(meta: UserMeta, event: UserEvent): UserMeta {
  switch (event.type) {
    case 'session-opened': {
      const { [event.connectionId]: _pending, ...pendingSyncs } = meta.pendingSyncs;
      return {
        ...meta,
        devices: withDeviceSeen(meta, event.deviceId, event.connectedAt),
        pendingSyncs,
        ...withoutDroppedSync(meta, event.connectionId),
        sessions: {
          ...meta.sessions,
          [event.connectionId]: {
            deviceId: event.deviceId,
            gatewayId: event.gatewayId,
            live: event.live,
            connectedAt: event.connectedAt,
          },
        },
      };
    }
    case 'session-live': {
      const session = own(meta.sessions, event.connectionId);
      if (!session) return meta;
      const { resumeAfter: _served, ...rest } = session;
      const sentUpTo = Math.max(session.sentUpTo ?? 0, event.sentUpTo);
      return {
        ...meta,
        sessions: { ...meta.sessions, [event.connectionId]: { ...rest, live: true, sentUpTo } },
      };
    }
    case 'session-paced': {
      const session = own(meta.sessions, event.connectionId);
      if (!session) return meta;
      const paced = { ...session, live: false, resumeAfter: event.resumeAfter };
      return { ...meta, sessions: { ...meta.sessions, [event.connectionId]: paced } };
    }
    case 'delivered': {
      // Entries go out in seq order: the last one sent is how far the session has them.
      const upTo = event.entries[event.entries.length - 1]?.seq;
      if (upTo === undefined) return meta;
      let sessions = meta.sessions;
      for (const { connectionId } of event.targets) {
        const session = own(sessions, connectionId);
        if (session?.live && (session.sentUpTo ?? 0) < upTo)
          sessions = { ...sessions, [connectionId]: { ...session, sentUpTo: upTo } };
      }
      return sessions === meta.sessions ? meta : { ...meta, sessions };
    }
    case 'session-closed': {
      const { [event.connectionId]: _session, ...sessions } = meta.sessions;
      const { [event.connectionId]: _pending, ...pendingSyncs } = meta.pendingSyncs;
      const closed = (meta.recentlyClosed ?? []).filter((c) => c !== event.connectionId);
      closed.push(event.connectionId);
      // Seen until it disconnected: a device connected for days is not the least recently seen.
      const deviceId = own(meta.sessions, event.connectionId)?.deviceId;
      const device = deviceId === undefined ? undefined : own(meta.devices, deviceId);
      const devices =
        device && event.at !== undefined
          ? { ...meta.devices, [deviceId!]: { ...device, seenAt: seenAt(device, event.at) } }
          : meta.devices;
      return {
        ...meta,
        sessions,
        pendingSyncs,
        ...withoutDroppedSync(meta, event.connectionId),
        devices,
        recentlyClosed: closed.slice(-RECENTLY_CLOSED),
      };
    }
    case 'sync-pending': {
      const { after, fromAck, deviceId, at } = event;
      const pending = { after, ...(fromAck ? { fromAck } : {}), deviceId };
      const pendingSyncs = withNewest(
        meta.pendingSyncs,
        event.connectionId,
        pending,
        MAX_PENDING_SYNCS,
      );
      const dropped = Object.keys(meta.pendingSyncs).filter((c) => !own(pendingSyncs, c));
      return {
        ...meta,
        // Known, as its CONNECTED would make it: its ack holds back pruning from here on.
        devices: withDeviceSeen(meta, deviceId, at),
        pendingSyncs,
        ...(dropped.length > 0
          ? { droppedSyncs: [...(meta.droppedSyncs ?? []), ...dropped].slice(-DROPPED_SYNCS) }
          : {}),
      };
    }
    case 'devices-evicted': {
      // The highest ack stays, whichever device it was.
      const highestAck = highestAckOf(meta);
      const devices = { ...meta.devices };
      let placeholder = devices[EVICTED];
      for (const deviceId of event.deviceIds) {
        const device = own(devices, deviceId);
        if (!device) continue;
        placeholder = {
          ack: Math.min(placeholder?.ack ?? Infinity, device.ack),
          seenAt: Math.max(placeholder?.seenAt ?? 0, device.seenAt ?? event.at),
        };
        delete devices[deviceId];
      }
      return {
        ...meta,
        devices: placeholder ? { ...devices, [EVICTED]: placeholder } : devices,
        ...(highestAck ? { highestAck } : {}),
      };
    }
    case 'entry-appended':
      return { ...meta, nextSeq: event.entry.seq + 1 };
    case 'acked': {
      const device = {
        ack: event.upTo,
        seenAt: seenAt(own(meta.devices, event.deviceId), event.at),
      };
      const top = highestAckOf(meta);
      const highestAck =
        top && top.upTo >= event.upTo ? top : { deviceId: event.deviceId, upTo: event.upTo };
      return { ...meta, devices: { ...meta.devices, [event.deviceId]: device }, highestAck };
    }
    case 'receipted': {
      // Moved on: the walk watches afresh, if they are still owed at its next visit.
      const { receiptsWatch: _moved, ...rest } = meta;
      return { ...rest, receiptedUpTo: event.upTo };
    }
    case 'receipts-watched':
      return { ...meta, receiptsWatch: { through: event.through, at: event.at } };
    case 'push-registered': {
      const registration = { pushToken: event.pushToken, platform: event.platform };
      return {
        ...meta,
        push: withNewest(meta.push, event.deviceId, registration, MAX_DEVICES),
      };
    }
    case 'push-removed': {
      const { [event.deviceId]: _removed, ...push } = meta.push;
      return { ...meta, push };
    }
    case 'pruned':
      return { ...meta, firstKept: event.below };
    default:
      return meta; // facts about what was sent change nothing the actor knows
  }
}

/**
 * The users decider in the runtime's Decider shape (for replays of a user's history): the
 * command comes with the parts of the view that are not the meta.
 */
export const usersDecider: Decider<
  { command: UserCommand; view: Omit<UserView, 'meta'> },
  UserMeta,
  UserEvent
> = {
  initialState: newUserMeta,
  decide: ({ command, view }, meta) => decide(command, { ...view, meta }),
  evolve,
};

/**
 * `record` with `key` set as its newest entry and at most `limit` entries, the first in the
 * record's order dropped past it. That is the oldest, except that JS orders integer-like keys
 * ("42") first: a bound, not an LRU, for keys a client chooses (deviceIds).
 */
function withNewest<V>(
  record: Record<string, V>,
  key: string,
  value: V,
  limit: number,
): Record<string, V> {
  const { [key]: _before, ...others } = record;
  const entries = Object.entries(others);
  const kept = entries.slice(Math.max(0, entries.length - (limit - 1)));
  kept.push([key, value]);
  return Object.fromEntries(kept);
}

/** `droppedSyncs` without the connection, when it was there. */
function withoutDroppedSync(meta: UserMeta, connectionId: string): Partial<UserMeta> {
  return meta.droppedSyncs?.includes(connectionId)
    ? { droppedSyncs: meta.droppedSyncs.filter((c) => c !== connectionId) }
    : {};
}

/** `devices` with this one known (its ack kept, 0 when new) and seen at `at`. */
function withDeviceSeen(meta: UserMeta, deviceId: string, at: number): UserMeta['devices'] {
  const device = own(meta.devices, deviceId);
  return { ...meta.devices, [deviceId]: { ack: device?.ack ?? 0, seenAt: seenAt(device, at) } };
}

/** When a device was last seen, seen again at `at`. */
const seenAt = (device: Device | undefined, at: number) => Math.max(device?.seenAt ?? at, at);

/** A push notification's text: the body's text when it has one, else a generic line. */
function previewOf(body: string): string {
  try {
    const value = JSON.parse(body) as unknown;
    const text = typeof value === 'string' ? value : (value as { text?: unknown } | null)?.text;
    if (typeof text === 'string') return text.length > 120 ? `${text.slice(0, 117)}...` : text;
  } catch {
    // a body is JSON text by contract; a stored one that is not still gets a notification
  }
  return 'New message';
}
