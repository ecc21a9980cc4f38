import type { PerMessageDeflateOptions } from 'ws';

/**
 * Every bound of the gateway, named, in one place (as `maxPayload` is in ws). What the client
 * contract fixes (PROTOCOL.md) is marked so; the rest are this gateway's choices.
 */

/**
 * The largest frame a client may send (PROTOCOL.md), after any permessage-deflate
 * decompression: ws's `maxPayload`. ws itself closes the connection with 1009 when a frame, or
 * the inflated form of a compressed one, is larger.
 */
export const MAX_FRAME_BYTES = 65_536;

/**
 * permessage-deflate is offered to clients that ask for it, bounded: what a compressed frame
 * inflates to counts against MAX_FRAME_BYTES (ws stops inflating past it and closes with 1009);
 * no compression context is kept between messages in either direction, so a connection holds
 * no sliding window while idle; small frames are sent as they are; at most ten zlib jobs run at
 * once in the process (ws's queue).
 */
export const PER_MESSAGE_DEFLATE: PerMessageDeflateOptions = {
  threshold: 1024,
  serverNoContextTakeover: true,
  clientNoContextTakeover: true,
  concurrencyLimit: 10,
};

/** The largest `body` of a `send` frame, as UTF-8 bytes of its JSON serialization (PROTOCOL.md). */
export const MAX_BODY_BYTES = 16_384;

/**
 * How deep a `body` may nest arrays and objects (PROTOCOL.md is silent; docs/websocket.md says
 * it). 16 KiB of `[[[[...` is 8,000 levels, past what a recursive JSON.stringify survives; no
 * chat message needs a hundred.
 */
export const MAX_BODY_DEPTH = 100;

/** The longest client message id `id`: 1 to 64 printable ASCII characters (PROTOCOL.md). */
export const MAX_CLIENT_ID = 64;

/**
 * The longest server-chosen id a client may name (`messageId` of `read`, `group` of `send` and
 * `typing`). Server ids are opaque but short; a longer one cannot exist.
 */
export const MAX_SERVER_ID = 128;

/**
 * The bytes a connection may keep waiting to be written (ws.bufferedAmount: what the kernel has
 * not taken, and frames still in the permessage-deflate queue). A burst goes over it without
 * harm: one batch of deliveries can be a megabyte for one connection, and deflating it takes a
 * while. A connection that stays over it for SLOW_CONSUMER_GRACE_MS is a client that does not
 * read: it is closed with SLOW_CONSUMER_CLOSE_CODE, reconnects, and gets everything it has not
 * acknowledged again.
 */
export const SEND_BUFFER_LIMIT_BYTES = 1 << 20;

/** How long a connection may stay over SEND_BUFFER_LIMIT_BYTES (looked at every tenth of it). */
export const SLOW_CONSUMER_GRACE_MS = 10_000;

/**
 * What a connection may never have waiting, burst or not (ws.bufferedAmount plus the frame
 * about to be written): the bound of its memory. Over it, it is closed at once.
 */
export const SEND_BUFFER_HARD_LIMIT_BYTES = 4 * SEND_BUFFER_LIMIT_BYTES;

/**
 * 1013 "Try Again Later": the close code for a client over SEND_BUFFER_LIMIT_BYTES. Not 1008
 * (policy violation): the client did nothing wrong that a reconnect would not cure.
 */
export const SLOW_CONSUMER_CLOSE_CODE = 1013;

/**
 * A replay goes out in parts (processors/users/decider.ts, REPLAY_PART_BYTES): the gateway asks
 * for the next part once the connection's send buffer is down to this many bytes. Together with
 * the part this stays well under SEND_BUFFER_LIMIT_BYTES, so a client that reads is never closed
 * for the size of its inbox; one that does not read just gets no more parts.
 */
export const REPLAY_RESUME_BYTES = 256 * 1024;

/**
 * When the frames after a replay part's last one still hold the send buffer over
 * REPLAY_RESUME_BYTES, the connection looks at it again after this long, doubling up to
 * REPLAY_DRAIN_POLL_MAX_MS: a client that has stopped reading costs a few timers a second.
 */
export const REPLAY_DRAIN_POLL_MS = 10;
export const REPLAY_DRAIN_POLL_MAX_MS = 250;

/**
 * A client's frames are handled only while its send buffer holds at most this much: past it,
 * they wait in the connection's queue (and, the queue full, in TCP) until the client reads.
 * Otherwise a client that sends pings, or frames that each answer an error, and never reads,
 * made the gateway buffer an answer each: hundreds of thousands of small writes, whose
 * bookkeeping held the event loop for seconds (found by a review helper: 16 such connections
 * kept /healthz from answering for 30 s).
 */
export const ANSWER_BACKLOG_BYTES = REPLAY_RESUME_BYTES;

/** A client whose frames have waited this long for it to read is closed (1013). */
export const ANSWER_BACKLOG_MAX_MS = 60_000;

/**
 * How long `chat.deliveries.<gatewayId>` keeps its records. Its consumer starts at the end and
 * commits nothing (a delivery addresses connections of the gateway's current run): a record is
 * useless once written out, and the topic is most of what the log holds, at one record per
 * entry and connection. An hour covers a consumer that lags and leaves time to look at what
 * went out. On Kafka the segments roll every DELIVERIES_SEGMENT_MS, or retention, which
 * removes whole segments, would wait for the active one (seven days by default).
 */
export const DELIVERIES_RETENTION_MS = 3_600_000;
export const DELIVERIES_SEGMENT_MS = 600_000;

/**
 * How long a frame's answer waits for its records to be durable: past it the frame is answered
 * `internal` (send it again). The records may still land; a `send` retried with the same `id`
 * is then dropped by the inbox's dedup. kafkajs retries a produce for minutes while a broker is
 * paused, and a review's clients waited 43 to 110 s for any answer.
 */
export const ANSWER_DEADLINE_MS = 10_000;

/** 1001 "Going Away": the gateway is shutting down. */
export const GOING_AWAY_CLOSE_CODE = 1001;

/** 1011 "Internal Error": the connection could not be registered (the log refused CONNECTED). */
export const INTERNAL_ERROR_CLOSE_CODE = 1011;

/**
 * How long a closing handshake may take before the socket is destroyed: a client that does not
 * read never answers the close frame, and its buffered bytes must not outlive it.
 */
export const CLOSE_TIMEOUT_MS = 2_000;

/** How often each connection is pinged; a peer that has not answered the previous ping is cut. */
export const PING_INTERVAL_MS = 15_000;

/** How often the gateway writes its GatewayHeartbeat to `chat.gateways`. */
export const HEARTBEAT_INTERVAL_MS = 5_000;

/**
 * Client frames received and not yet handled, per connection. At this many the gateway stops
 * reading the socket (ws.pause) until the queue is half empty: TCP then pushes back on the
 * client. The frames of one socket read already in hand are still queued, so the bound is this
 * plus one read (at most 64 KiB of frames).
 */
export const MAX_QUEUED_FRAMES = 64;

/**
 * Frames of one connection whose records are on their way to the log and whose answers wait for
 * them: at this many the connection issues no more until they are answered. Frames are issued
 * without waiting for the records before them to be durable (a burst of sends costs about one
 * write, not one each), and this bounds what one connection holds in the producer.
 */
export const MAX_UNANSWERED_FRAMES = 32;

/**
 * Entries delivered before `ready` has been written are held until it has, up to this many
 * bytes, as much as a burst may put in the send buffer; beyond it the connection is closed as a
 * slow consumer. Once written, they are a burst like any other (SLOW_CONSUMER_GRACE_MS).
 */
export const MAX_HELD_BEFORE_READY_BYTES = SEND_BUFFER_HARD_LIMIT_BYTES;

/** `send` and `typing` frames per second a connection may make (PROTOCOL.md: RATE_LIMIT_PER_S). */
export const DEFAULT_RATE_LIMIT_PER_S = 50;

/**
 * `sync` frames per second a connection may make, in a bucket of their own (PROTOCOL is silent):
 * one frame replays what the inbox keeps, possibly thousands of entries, so syncs in a loop
 * would cost the server a thousand times what they cost the client. Four at once, then one a
 * second; a client syncs when it finds a gap, not in a loop.
 */
export const SYNC_RATE_PER_S = 1;

/**
 * `ack` frames per second a connection has applied one by one, in a bucket of their own (four
 * seconds' worth at once). Each costs a record and a turn of the users actor, and PROTOCOL
 * limits only `send` and `typing`: past this rate an ack is not refused but held, and the acks
 * that follow are merged into it (acks are cumulative: the highest covers the rest). A held ack
 * is applied when the bucket has a token again, before the connection's next frame that goes
 * to the log (not a ping), or when the connection closes, whichever comes first. A client acking every 32 entries or every
 * 50 ms never reaches it.
 */
export const ACK_RATE_PER_S = 20;

/**
 * `read` frames per second a connection has handled, four seconds' worth at once. Each costs a
 * record and a turn of the users actor, and reads of different messages cannot be merged as
 * acks are; PROTOCOL limits only `send` and `typing`. Past this rate a read is not refused but
 * waits its turn: the connection's next frames wait behind it (TCP then pushes back on the
 * client), and every read is handled. A client marking a long conversation read at once
 * sends a few hundred; one in a loop sent tens of thousands a second.
 */
export const READ_RATE_PER_S = 50;

/** The token bucket holds this many seconds' worth of frames (PROTOCOL.md: four times the rate). */
export const RATE_LIMIT_BURST_FACTOR = 4;

/** `deviceId`: 1 to 64 characters of [A-Za-z0-9_-] (PROTOCOL.md). */
export const MAX_DEVICE_ID = 64;

/**
 * The rate limit of the process interface: RATE_LIMIT_PER_S, a positive number of frames per
 * second, DEFAULT_RATE_LIMIT_PER_S when unset.
 */
export function rateLimitPerSecond(env: NodeJS.ProcessEnv = process.env): number {
  const raw = env.RATE_LIMIT_PER_S;
  if (raw === undefined || raw.trim() === '') return DEFAULT_RATE_LIMIT_PER_S;
  const value = Number(raw);
  if (!Number.isFinite(value) || value <= 0) {
    throw new RangeError(`RATE_LIMIT_PER_S must be a positive number, not "${raw}"`);
  }
  return value;
}

/**
 * Open connections of one user on one gateway. Past it, an upgrade answers 429 `rate_limited`:
 * the rate limit is per connection, and every connection of a user gets each of its inbox
 * entries, so without it one account multiplied both without bound (300 connections made 10
 * messages 3,000 frames). A user's devices and browser tabs fit well within it; a connection
 * whose peer died counts until the pings find it (PING_INTERVAL_MS).
 */
export const MAX_CONNECTIONS_PER_USER = 16;

/**
 * New connections of one user a second on one gateway, in a bucket of CONNECTS_PER_USER_BURST.
 * Each connection replays the first part of what the user's device has not acked, so a client
 * opening and closing connections in a loop (never reaching MAX_CONNECTIONS_PER_USER) made the
 * server replay hundreds of parts a second, where a connection's syncs get one a second. Past
 * it an upgrade answers 429 `rate_limited` with `Retry-After`. The burst lets every device of a
 * user reconnect at once after a restart.
 */
export const CONNECTS_PER_USER_PER_S = 1;
export const CONNECTS_PER_USER_BURST = 20;
