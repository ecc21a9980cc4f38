/**
 * The frames of PROTOCOL.md's WebSocket section: client frames parsed and validated into typed
 * values (or a precise refusal), server frames built from the events they carry. Pure: no
 * socket, no log, no clock.
 */
import { branchOf } from '../schemas/avro.ts';
import {
  fullNames,
  type Delivery,
  type GroupMember,
  type GroupRole,
  type InboxEntry,
  type ReceiptStatus,
  type RejectionCode,
  type Typing,
  type TypingState,
} from '../schemas/types.generated.ts';
import { MAX_BODY_BYTES, MAX_BODY_DEPTH, MAX_CLIENT_ID, MAX_SERVER_ID } from './limits.ts';
import { LONE_SURROGATE } from '../schemas/conventions.ts';

// ---- errors ----

/** The `code` of an `error` frame (PROTOCOL.md). */
export type ErrorCode =
  'bad_frame' | 'too_large' | 'unknown_recipient' | 'unknown_message' | 'rate_limited' | 'internal';

/** Why a frame was refused: what its `error` frame says. */
export interface FrameError {
  code: ErrorCode;
  message: string;
  /** The refused frame's `id`, when it had a valid one. */
  id?: string;
}

// ---- client frames ----

/** Who a `send` or `typing` frame is for: one user (`to`) or a group (`group`). */
export type Recipient = { kind: 'user'; userId: string } | { kind: 'group'; groupId: string };

export interface SendFrame {
  type: 'send';
  id: string;
  recipient: Recipient;
  /** The body's JSON serialization, at most MAX_BODY_BYTES UTF-8 bytes. */
  body: string;
}

export interface AckFrame {
  type: 'ack';
  id?: string;
  upTo: number;
}

export interface ReadFrame {
  type: 'read';
  id?: string;
  messageId: string;
}

export interface TypingFrameIn {
  type: 'typing';
  id?: string;
  recipient: Recipient;
  state: TypingState;
}

export interface SyncFrame {
  type: 'sync';
  id?: string;
  after: number;
}

export interface PingFrame {
  type: 'ping';
  id?: string;
}

export type ClientFrame = SendFrame | AckFrame | ReadFrame | TypingFrameIn | SyncFrame | PingFrame;

export type ClientFrameType = ClientFrame['type'];

export type ParsedFrame =
  { frame: ClientFrame; error?: never } | { error: FrameError; frame?: never };

/** PROTOCOL.md's userId before it is case-folded: 3 to 32 characters of [A-Za-z0-9_.-]. */
const USER_ID_ANY_CASE = /^[A-Za-z0-9_.-]{3,32}$/;
/** Printable ASCII, space included. */
const CLIENT_ID = new RegExp(`^[\\x20-\\x7e]{1,${MAX_CLIENT_ID}}$`);
const TYPING_STATES: readonly TypingState[] = ['start', 'stop'];

/** A refusal while parsing; caught in parseClientFrame and turned into its FrameError. */
class Refusal {
  constructor(
    readonly code: ErrorCode,
    readonly message: string,
  ) {}
}

const badFrame = (message: string) => new Refusal('bad_frame', message);

/**
 * Parses one client frame (the text of a WebSocket message). Unknown fields, `from` among
 * them, are ignored; `null` counts as absent for optional fields.
 */
export function parseClientFrame(text: string): ParsedFrame {
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return { error: { code: 'bad_frame', message: 'a frame must be a JSON object' } };
  }
  if (typeof value !== 'object' || value === null || Array.isArray(value)) {
    return { error: { code: 'bad_frame', message: 'a frame must be a JSON object' } };
  }
  const fields = value as Record<string, unknown>;
  // The id first: every later refusal carries it.
  const rawId = fields.id;
  let id: string | undefined;
  if (rawId !== undefined && rawId !== null) {
    if (typeof rawId !== 'string' || !CLIENT_ID.test(rawId)) {
      return {
        error: {
          code: 'bad_frame',
          message: `id must be 1 to ${MAX_CLIENT_ID} printable ASCII characters`,
        },
      };
    }
    id = rawId;
  }
  try {
    return { frame: parseFields(fields, id) };
  } catch (error) {
    if (!(error instanceof Refusal)) throw error;
    return { error: withId({ code: error.code, message: error.message }, id) };
  }
}

/**
 * A number a body may not hold: one too large for a double (parsed as Infinity, it would go on
 * as null), or an integer from 2^53 to 10^21. A double rounds most of those (9007199254740993
 * becomes ...992), and once parsed the rounded ones cannot be told from the exact ones: the
 * whole range is refused, as I-JSON (RFC 7493 §2.2) says integers past ±(2^53 - 1) do not
 * interoperate (64-bit ids go as strings). Past 10^21 a parsed integer cannot be told from a
 * float written with an exponent (1.5e300), which is kept.
 */
const refusedNumber = (n: number) =>
  !Number.isFinite(n) || (!Number.isSafeInteger(n) && Number.isInteger(n) && Math.abs(n) < 1e21);

/**
 * Why a parsed `send` body may not be stored, or undefined; one walk over it (no recursion),
 * whose refusals come in this order:
 * - arrays and objects nested deeper than MAX_BODY_DEPTH (16 KiB of `[[[` could otherwise nest
 *   8,000 levels, deeper than a serializer's stack);
 * - a refused number (refusedNumber), the first the walk meets;
 * - a string or a key with a lone UTF-16 surrogate: JSON's `\uD800` escape parses to one, which
 *   is not Unicode. I-JSON (RFC 7493 §2.1) refuses it; a strict client's parser (Rust's
 *   serde_json, pydantic) refuses the whole frame that carries it, so such a body, stored, is
 *   an entry its recipient can neither read nor ack.
 */
export function bodyRefusal(body: unknown): string | undefined {
  let number: number | undefined;
  let surrogate = false;
  const stack: Array<[unknown, number]> = [[body, 0]];
  while (stack.length > 0) {
    const [node, depth] = stack.pop()!;
    if (typeof node === 'number') {
      if (number === undefined && refusedNumber(node)) number = node;
    } else if (typeof node === 'string') {
      surrogate ||= LONE_SURROGATE.test(node);
    } else if (typeof node === 'object' && node !== null) {
      if (depth + 1 > MAX_BODY_DEPTH)
        return `body nests arrays and objects deeper than ${MAX_BODY_DEPTH} levels`;
      if (Array.isArray(node)) for (const child of node) stack.push([child, depth + 1]);
      else
        for (const [key, child] of Object.entries(node)) {
          surrogate ||= LONE_SURROGATE.test(key);
          stack.push([child, depth + 1]);
        }
    }
  }
  if (number !== undefined)
    return (
      `body holds a number past what a double holds exactly (${number}): integers must ` +
      'be within ±(2^53 - 1), and no number may overflow (send larger ones as strings)'
    );
  if (surrogate)
    return 'body holds a lone UTF-16 surrogate (a \\uD800 to \\uDFFF escape not in a pair)';
  return undefined;
}

function parseFields(fields: Record<string, unknown>, id: string | undefined): ClientFrame {
  const type = fields.type;
  if (type === undefined || type === null) throw badFrame('type is missing');
  if (typeof type !== 'string') throw badFrame('type must be a string');
  switch (type) {
    case 'send': {
      if (id === undefined) throw badFrame('a send frame needs an id');
      const recipient = parseRecipient(fields);
      if (!('body' in fields)) throw badFrame('body is missing');
      const refusal = bodyRefusal(fields.body);
      if (refusal !== undefined) throw badFrame(refusal);
      const body = JSON.stringify(fields.body);
      const bytes = Buffer.byteLength(body, 'utf8');
      if (bytes > MAX_BODY_BYTES) {
        throw new Refusal(
          'too_large',
          `body is ${bytes} bytes serialized; at most ${MAX_BODY_BYTES} are allowed`,
        );
      }
      return { type, id, recipient, body };
    }
    case 'ack':
      return withId({ type, upTo: sequenceNumber(fields, 'upTo') }, id);
    case 'read':
      return withId({ type, messageId: serverId(fields.messageId, 'messageId') }, id);
    case 'typing': {
      const recipient = parseRecipient(fields);
      const state = fields.state;
      if (typeof state !== 'string' || !(TYPING_STATES as readonly string[]).includes(state)) {
        throw badFrame('state must be "start" or "stop"');
      }
      return withId({ type, recipient, state: state as TypingState }, id);
    }
    case 'sync':
      return withId({ type, after: sequenceNumber(fields, 'after') }, id);
    case 'ping':
      return withId({ type }, id);
    default:
      throw badFrame(`unknown frame type "${truncate(type)}"`);
  }
}

/** Exactly one of `to` (a userId, case-folded) and `group` (a groupId). */
function parseRecipient(fields: Record<string, unknown>): Recipient {
  const to = fields.to ?? undefined;
  const group = fields.group ?? undefined;
  if (to !== undefined && group !== undefined) throw badFrame('give either to or group, not both');
  if (to === undefined && group === undefined) throw badFrame('to or group is missing');
  if (to !== undefined) {
    if (typeof to !== 'string') throw badFrame('to must be a userId string');
    // Checked before it is lower-cased: toLowerCase maps some letters outside A-Z into a-z
    // (the Kelvin sign to "k"), which registration would never have taken.
    const userId = to.toLowerCase();
    if (!USER_ID_ANY_CASE.test(to)) {
      throw badFrame('to must be a userId: 3 to 32 characters of a-z, 0-9, "_", "." and "-"');
    }
    return { kind: 'user', userId };
  }
  return { kind: 'group', groupId: serverId(group, 'group') };
}

function serverId(value: unknown, field: string): string {
  if (value === undefined || value === null) throw badFrame(`${field} is missing`);
  if (typeof value !== 'string' || value.length === 0 || value.length > MAX_SERVER_ID) {
    throw badFrame(`${field} must be a string of 1 to ${MAX_SERVER_ID} characters`);
  }
  return value;
}

/**
 * The largest seq an event carries: Avro's long in avsc holds integers within ±(2^53 - 2). No
 * inbox gets near it; a client's 2^53 - 1 ("everything") means the same, and is taken as this.
 */
const MAX_SEQ = Number.MAX_SAFE_INTEGER - 1;

function sequenceNumber(fields: Record<string, unknown>, field: string): number {
  const value = fields[field];
  if (value === undefined || value === null) throw badFrame(`${field} is missing`);
  if (typeof value !== 'number' || !Number.isSafeInteger(value) || value < 0) {
    throw badFrame(`${field} must be an integer seq, 0 or more`);
  }
  return Math.min(value, MAX_SEQ);
}

function truncate(text: string): string {
  return text.length > 32 ? `${text.slice(0, 32)}...` : text;
}

function withId<T extends object>(value: T, id: string | undefined): T & { id?: string } {
  return id === undefined ? value : { ...value, id };
}

// ---- server frames ----

export interface ReadyFrame {
  type: 'ready';
  userId: string;
  deviceId: string;
}

export interface SentFrame {
  type: 'sent';
  id: string;
  messageId: string;
  at: number;
}

export interface MessageFrame {
  type: 'message';
  seq: number;
  messageId: string;
  from: string;
  to?: string;
  group?: string;
  body: unknown;
  sentAt: number;
}

export interface ReceiptFrame {
  type: 'receipt';
  seq: number;
  messageId: string;
  by: string;
  status: ReceiptStatus;
  at: number;
}

export interface RejectedFrame {
  type: 'rejected';
  seq: number;
  messageId: string;
  id: string;
  code: RejectionCode;
  message: string;
}

export type GroupEventName =
  'created' | 'renamed' | 'member_added' | 'member_removed' | 'role_changed';

export interface GroupFrame {
  type: 'group';
  seq: number;
  groupId: string;
  event: GroupEventName;
  by: string;
  /** The group's version after the change. */
  version: number;
  at: number;
  /** created, renamed */
  name?: string;
  /** created (every member), member_added (those added) */
  members?: { userId: string; role: GroupRole }[];
  /** member_removed, role_changed */
  userId?: string;
  /** role_changed */
  role?: GroupRole;
}

export interface TypingFrameOut {
  type: 'typing';
  from: string;
  to?: string;
  group?: string;
  state: TypingState;
}

export interface ErrorFrame {
  type: 'error';
  id?: string;
  code: ErrorCode;
  message: string;
}

export interface PongFrame {
  type: 'pong';
  id?: string;
}

export type InboxEntryFrame = MessageFrame | ReceiptFrame | RejectedFrame | GroupFrame;

export type ServerFrame =
  ReadyFrame | SentFrame | InboxEntryFrame | TypingFrameOut | ErrorFrame | PongFrame;

export const readyFrame = (userId: string, deviceId: string): ReadyFrame => ({
  type: 'ready',
  userId,
  deviceId,
});

export const sentFrame = (id: string, messageId: string, at: number): SentFrame => ({
  type: 'sent',
  id,
  messageId,
  at,
});

export function errorFrame(error: FrameError): ErrorFrame {
  return error.id === undefined
    ? { type: 'error', code: error.code, message: error.message }
    : { type: 'error', id: error.id, code: error.code, message: error.message };
}

/** The answer to a ping; it carries the ping's id when it had one. */
export const pongFrame = (id?: string): PongFrame =>
  id === undefined ? { type: 'pong' } : { type: 'pong', id };

/** The `message`, `receipt`, `rejected` or `group` frame of an inbox entry. */
export function inboxEntryFrame(inboxEntry: InboxEntry): InboxEntryFrame {
  const { seq } = inboxEntry;
  const branch = branchOf(inboxEntry.entry);
  switch (branch.name) {
    case fullNames.MessageCopy: {
      const copy = branch.value;
      return {
        type: 'message',
        seq,
        messageId: copy.messageId,
        from: copy.from,
        ...(copy.to === null ? {} : { to: copy.to }),
        ...(copy.group === null ? {} : { group: copy.group }),
        body: parseBody(copy.body),
        sentAt: copy.sentAt,
      };
    }
    case fullNames.Receipt: {
      const receipt = branch.value;
      return {
        type: 'receipt',
        seq,
        messageId: receipt.messageId,
        by: receipt.by,
        status: receipt.status,
        at: receipt.at,
      };
    }
    case fullNames.Rejection: {
      const rejection = branch.value;
      return {
        type: 'rejected',
        seq,
        messageId: rejection.messageId,
        id: rejection.id,
        code: rejection.code,
        message: rejection.message,
      };
    }
    case fullNames.GroupEvent: {
      const event = branch.value;
      const head = {
        type: 'group' as const,
        seq,
        groupId: event.groupId,
        by: event.by,
        version: event.version,
        at: event.at,
      };
      const change = branchOf(event.change);
      switch (change.name) {
        case fullNames.GroupCreated:
          return {
            ...head,
            event: 'created',
            name: change.value.name,
            members: change.value.members.map(member),
          };
        case fullNames.GroupRenamed:
          return { ...head, event: 'renamed', name: change.value.name };
        case fullNames.MembersAdded:
          return { ...head, event: 'member_added', members: change.value.members.map(member) };
        case fullNames.MemberRemoved:
          return { ...head, event: 'member_removed', userId: change.value.userId };
        case fullNames.RoleChanged:
          return {
            ...head,
            event: 'role_changed',
            userId: change.value.userId,
            role: change.value.role,
          };
      }
    }
  }
  // Unreachable for decoded values: a branch the reader schema lacks fails to decode.
  throw new TypeError(`unknown inbox entry branch ${(branch as { name: string }).name}`);
}

/** The `typing` frame relayed to a recipient. */
export function typingFrame(typing: Typing): TypingFrameOut {
  return {
    type: 'typing',
    from: typing.from,
    ...(typing.to === null ? {} : { to: typing.to }),
    ...(typing.group === null ? {} : { group: typing.group }),
    state: typing.state,
  };
}

/** The frame a Delivery carries. */
export function deliveryFrame(
  frame: Delivery['frame'],
): InboxEntryFrame | TypingFrameOut | ErrorFrame {
  const branch = branchOf(frame);
  switch (branch.name) {
    case fullNames.InboxEntry:
      return inboxEntryFrame(branch.value);
    case fullNames.Typing:
      return typingFrame(branch.value);
    case fullNames.ErrorFrame: {
      // An actor's answer (e.g. unknown_message); the code is one of PROTOCOL's by contract.
      const { id, code, message } = branch.value;
      return errorFrame({ id: id ?? undefined, code: code as ErrorCode, message });
    }
  }
  throw new TypeError(`unknown delivery frame branch ${(branch as { name: string }).name}`);
}

/** The text of a server frame on the wire. */
export function serialize(frame: ServerFrame): string {
  return JSON.stringify(frame);
}

const member = (m: GroupMember) => ({ userId: m.userId, role: m.role });

/**
 * A body is stored as the JSON text the gateway serialized, so it parses; should a record hold
 * something else, the client gets the text as a string rather than nothing.
 */
function parseBody(text: string): unknown {
  try {
    return JSON.parse(text);
  } catch {
    return text;
  }
}
