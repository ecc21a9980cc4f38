/**
 * One WebSocket connection of one device: its client frames, issued one after another (their
 * records reach the producer in frame order, so the log keeps the order of a device's frames
 * on each partition) and answered in the same order (`sent` answers come back in send order,
 * each once its records are durable), and the frames written to it, never more than the send
 * buffer limit.
 *
 * The connection is `opening` until the gateway has made its CONNECTED event durable and
 * calls `start`: then `ready` is written first, and the frames that arrived before it follow.
 */
import { setTimeout as sleep } from 'node:timers/promises';
import { WebSocket, type RawData } from 'ws';
import type { Producer, ProducerRecord } from '../log/port.ts';
import type { TopicCodec } from '../schemas/codec.ts';
import { topics } from '../schemas/topics.ts';
import {
  fullNames,
  type GroupMessage,
  type InboxCommand,
  type MessageCopy,
  type UserCommand,
} from '../schemas/types.generated.ts';
import type { Logger } from '../observability/logger.ts';
import {
  errorFrame,
  parseClientFrame,
  pongFrame,
  readyFrame,
  sentFrame,
  serialize,
  type AckFrame,
  type ClientFrame,
  type FrameError,
  type ParsedFrame,
  type SendFrame,
  type ServerFrame,
  type TypingFrameIn,
} from './frames.ts';
import {
  MAX_HELD_BEFORE_READY_BYTES,
  MAX_QUEUED_FRAMES,
  MAX_UNANSWERED_FRAMES,
  REPLAY_DRAIN_POLL_MAX_MS,
  REPLAY_DRAIN_POLL_MS,
  REPLAY_RESUME_BYTES,
  ANSWER_BACKLOG_BYTES,
  ANSWER_BACKLOG_MAX_MS,
  SLOW_CONSUMER_CLOSE_CODE,
  SYNC_RATE_PER_S,
  ACK_RATE_PER_S,
} from './limits.ts';
import { messageIdFor } from './message-id.ts';
import { rateLimitedTypes, TokenBucket } from './rate-limit.ts';
import type { Identity } from './authentication.ts';
import type { GatewayInstruments } from './metrics.ts';

/** What a connection produces to, and how it decides. Shared by every connection. */
export interface ConnectionContext {
  producer: Producer;
  codecs: {
    messages: TopicCodec<InboxCommand>;
    userCommands: TopicCodec<UserCommand>;
    groupMessages: TopicCodec<GroupMessage>;
  };
  userExists(userId: string): boolean | Promise<boolean>;
  /** Absent: every group is accepted (the groups actor rejects what it does not know). */
  groupExists?(groupId: string): boolean | Promise<boolean>;
  rateLimitPerSecond: number;
  sendBufferLimitBytes: number;
  sendBufferHardLimitBytes: number;
  slowConsumerGraceMs: number;
  closeTimeoutMs: number;
  /** ANSWER_DEADLINE_MS: see limits.ts. */
  answerDeadlineMs: number;
  /** READ_RATE_PER_S: see limits.ts. */
  readsPerS: number;
  /**
   * Why the log takes no records now (the gateway's heartbeat has gone unanswered), if it does
   * not: frames that would write to it are answered `internal` at once, without queueing more
   * records behind the ones that wait.
   */
  logUnavailableBecause(): string | undefined;
  now(): number;
  logger: Logger;
  instruments: GatewayInstruments;
}

export interface ConnectionIdentity extends Identity {
  connectionId: string;
}

type State = 'opening' | 'ready' | 'closed';

/**
 * A frame whose checks have run and whose records, if any, were handed to the producer: once
 * they are durable (and every earlier frame is answered), `answer` writes its answer, if any.
 */
interface Issued {
  frame?: ClientFrame;
  durable?: Promise<unknown>;
  answer?: () => void;
}

/** A frame refused, or given up on, because the log does not take records now. */
class LogUnavailableError extends Error {}

const utf8 = new TextDecoder('utf-8', { fatal: true });

export class Connection {
  /** Cleared when a ping is sent, set by its pong (or any frame): see `ping`. */
  private alive = true;
  private state: State = 'opening';
  private closing = false;
  private readonly queue: ParsedFrame[] = [];
  private draining = false;
  private handling: Promise<void> = Promise.resolve();
  /** Settles once every frame issued so far is answered; never rejects. */
  private answered: Promise<void> = Promise.resolve();
  /** One promise per frame issued and not answered yet, oldest first: each settles with it. */
  private readonly unanswered: Array<Promise<void>> = [];
  private paused = false;
  /** Deliveries that came before `ready` was written (in practice none: see `deliver`). */
  private held: Array<{ text: string | undefined; partEnd?: number }> = [];
  private heldBytes = 0;
  private readonly bucket: TokenBucket;
  /** `sync` frames have their own bucket: each may replay the whole inbox. */
  private readonly syncBucket: TokenBucket;
  /** `ack` frames are held past ACK_RATE_PER_S and merged: see `issueAck`. */
  private readonly ackBucket: TokenBucket;
  /** `read` frames wait for a token of their own: see READ_RATE_PER_S. */
  private readonly readBucket: TokenBucket;
  /** The ack held for want of a token, and the timer that applies it when one comes. */
  private heldAck: { frame: AckFrame; timer?: NodeJS.Timeout } | undefined;
  private closeTimer: NodeJS.Timeout | undefined;
  /** Set while the send buffer is over its limit: the time it went over, and its check. */
  private overLimit: { since: number; check: NodeJS.Timeout } | undefined;
  private readonly logger: Logger;

  constructor(
    readonly ws: WebSocket,
    readonly identity: ConnectionIdentity,
    private readonly context: ConnectionContext,
  ) {
    this.bucket = new TokenBucket(context.rateLimitPerSecond, context.now);
    this.syncBucket = new TokenBucket(SYNC_RATE_PER_S, context.now);
    this.ackBucket = new TokenBucket(ACK_RATE_PER_S, context.now);
    this.readBucket = new TokenBucket(context.readsPerS, context.now);
    this.logger = context.logger.child({
      connectionId: identity.connectionId,
      userId: identity.userId,
      deviceId: identity.deviceId,
    });
    ws.on('pong', () => (this.alive = true));
  }

  get connectionId(): string {
    return this.identity.connectionId;
  }

  get userId(): string {
    return this.identity.userId;
  }

  /** A WebSocket message arrived: parsed and charged to the rate limit now, handled in turn. */
  receive(data: RawData): void {
    if (this.state === 'closed' || this.closing) return;
    this.alive = true;
    let parsed: ParsedFrame;
    try {
      parsed = this.parse(data);
    } catch (error) {
      // A frame this code cannot read is that frame's problem, never the process's.
      this.logger.error({ err: error }, 'a frame could not be parsed');
      parsed = { error: { code: 'bad_frame', message: 'the frame could not be read' } };
    }
    this.context.instruments.frameReceived(parsed.frame?.type ?? 'invalid');
    const over =
      parsed.frame?.type === 'sync'
        ? !this.syncBucket.take() && `over ${SYNC_RATE_PER_S} sync frame per second`
        : parsed.frame &&
          rateLimitedTypes.has(parsed.frame.type) &&
          !this.bucket.take() &&
          `over ${this.context.rateLimitPerSecond} send and typing frames per second`;
    if (parsed.frame && over) {
      parsed = {
        error: {
          code: 'rate_limited',
          message: over,
          ...(parsed.frame.id === undefined ? {} : { id: parsed.frame.id }),
        },
      };
    }
    this.queue.push(parsed);
    if (this.queue.length >= MAX_QUEUED_FRAMES && !this.paused) {
      this.paused = true;
      this.ws.pause();
    }
    this.drain();
  }

  /** The gateway made CONNECTED durable: `ready` first, then what arrived meanwhile. */
  start(): void {
    if (this.state !== 'opening') return;
    this.state = 'ready';
    this.write(readyFrame(this.identity.userId, this.identity.deviceId));
    const held = this.held;
    this.held = [];
    this.heldBytes = 0;
    for (const { text, partEnd } of held) this.deliver(text, partEnd);
    this.drain();
  }

  /**
   * Writes a delivered frame. Before `ready` it is held: the users actor cannot address this
   * connection before its CONNECTED is durable, and `start` follows that at once, but the
   * order of `ready` first must not rest on timing.
   *
   * `partEnd`: the frame is the entry that ends a replay part, and more wait. Once the send
   * buffer is down to REPLAY_RESUME_BYTES (at once, or when the frame has left the process:
   * ws.send's callback), the connection asks the users actor for the next part with a
   * continued Sync. `text` undefined: that entry could not be written as a frame; the next part
   * is asked for all the same, once the send buffer alone allows.
   */
  deliver(text: string | undefined, partEnd?: number): void {
    if (this.state === 'closed' || this.closing) return;
    if (this.state === 'opening') {
      this.heldBytes += text === undefined ? 0 : Buffer.byteLength(text);
      if (this.heldBytes > MAX_HELD_BEFORE_READY_BYTES) {
        this.closeSlowConsumer();
        return;
      }
      this.held.push(partEnd === undefined ? { text } : { text, partEnd });
      return;
    }
    if (partEnd === undefined) {
      if (text !== undefined) this.write(text);
      return;
    }
    // At once if the part is already on its way (the kernel took it), so that the next part
    // comes while this one drains; else once its last frame has left the process.
    let asked = false;
    const ask = () => {
      if (asked) return;
      asked = true;
      this.askForNextPart(partEnd);
    };
    if (text !== undefined) this.write(text, ask);
    if (text === undefined || this.ws.bufferedAmount <= REPLAY_RESUME_BYTES) ask();
  }

  /**
   * Asks for the replay part after `after`. Tried again after a failure for as long as the
   * connection is open: without it the replay would stop until the client syncs.
   */
  private askForNextPart(after: number): void {
    void this.nextPart(after).catch((err: unknown) => {
      this.logger.error({ err, after }, 'the next replay part was not asked for');
    });
  }

  private async nextPart(after: number): Promise<void> {
    const { userId, deviceId, connectionId } = this.identity;
    const open = () => this.state !== 'closed' && !this.closing;
    for (let attempt = 0; open();) {
      // Frames written after the part's last may still be waiting.
      if (!(await this.sendBufferDownTo(REPLAY_RESUME_BYTES))) return;
      const command: UserCommand = {
        userId,
        at: this.context.now(),
        command: { [fullNames.Sync]: { deviceId, connectionId, after, continued: true } },
      };
      try {
        await this.context.producer.send([
          record(topics.userCommands, userId, this.context.codecs.userCommands.encode(command)),
        ]);
        this.context.instruments.replayPartAsked();
        return;
      } catch (err) {
        attempt++;
        this.logger[attempt < 5 ? 'warn' : 'debug'](
          { err, after, attempt },
          'asking for the next replay part failed; trying again',
        );
        await sleep(Math.min(2_000, 100 * 2 ** (attempt - 1)), undefined, { ref: false });
      }
    }
  }

  /**
   * The liveness check, every PING_INTERVAL_MS: a peer that has not answered the previous ping
   * (nor sent anything since) is terminated. Returns false when it was.
   */
  ping(): boolean {
    if (this.state === 'closed') return false;
    // While its socket is paused (its frames wait for the log) its pong cannot be read either.
    if (!this.alive && !this.paused) {
      this.logger.info('no pong to the previous ping; terminating');
      this.ws.terminate();
      return false;
    }
    this.alive = false;
    if (this.ws.readyState === WebSocket.OPEN) this.ws.ping();
    return true;
  }

  /** Starts the closing handshake; a peer that does not finish it in time is cut off. */
  close(code: number, reason: string): void {
    if (this.state === 'closed' || this.closing) return;
    this.closing = true;
    this.foldQueuedAcks();
    this.queue.length = 0;
    // A socket paused for a full queue would not read the peer's answer to the close (frames
    // that come before it are dropped by receive): the close would wait out closeTimeoutMs.
    if (this.paused) {
      this.paused = false;
      this.ws.resume();
    }
    this.ws.close(code, reason);
    this.closeTimer = setTimeout(() => this.ws.terminate(), this.context.closeTimeoutMs);
    this.closeTimer.unref();
  }

  /** The socket closed (ws 'close'): nothing more is handled or written. */
  closed(): void {
    this.state = 'closed';
    clearTimeout(this.closeTimer);
    clearTimeout(this.overLimit?.check);
    this.overLimit = undefined;
    this.foldQueuedAcks();
    this.queue.length = 0;
    this.held = [];
    // An ack the client sent is applied even so (before DISCONNECTED: `settled` waits for it).
    const ack = this.takeHeldAck();
    if (ack)
      this.handling = this.handling.then(async () => this.answerInTurn(await this.issue(ack)));
  }

  // ---- handling: frames issued one after another, answered in the same order ----

  /** Resolves once every frame taken so far is answered (and its records are durable). */
  async settled(): Promise<void> {
    await this.handling;
    await this.answered;
  }

  private drain(): void {
    if (this.draining || this.state !== 'ready') return;
    this.draining = true;
    this.handling = this.handleQueued();
  }

  /**
   * Issues each queued frame in turn: its checks run and its records go to the producer, in
   * frame order, without waiting for the records before to be durable. Its answer waits for its
   * records and for every earlier frame's answer, so answers still come in frame order.
   */
  private async handleQueued(): Promise<void> {
    try {
      while (this.queue.length > 0 && this.state === 'ready' && !this.closing) {
        if (this.unanswered.length >= MAX_UNANSWERED_FRAMES) {
          // A window: the next frame goes as soon as the oldest is answered.
          await this.unanswered[0];
          continue; // the connection may have closed meanwhile (and its queue been emptied)
        }
        if (this.ws.bufferedAmount > ANSWER_BACKLOG_BYTES) {
          // The client does not read what it was sent: its next frames wait until it does.
          await this.backlogRead();
          continue;
        }
        if (this.queue[0]!.frame?.type === 'read' && !this.readBucket.take()) {
          // Over the read rate: this read, and the frames behind it, wait for a token.
          await sleep(Math.ceil(this.readBucket.secondsToNext * 1000) + 1, undefined, {
            ref: false,
          });
          continue; // the connection may have closed meanwhile
        }
        const next = this.queue.shift()!;
        if (next.frame?.type === 'ack') {
          await this.issueAck(next.frame);
        } else {
          // A held ack is applied before the connection's next frame that goes to the log
          // (PROTOCOL: "applied before the next frame is handled"; a ping or a refused frame
          // cannot tell, and flushing before each let `ack, ping, ack, ping...` past the rate).
          const ack = next.frame && next.frame.type !== 'ping' ? this.takeHeldAck() : undefined;
          if (ack) this.answerInTurn(await this.issue(ack));
          this.answerInTurn(await this.issue(next));
        }
        if (this.paused && this.queue.length <= MAX_QUEUED_FRAMES / 2) {
          this.paused = false;
          this.alive = true; // the pong, if any, is still unread: a whole interval to read it
          this.ws.resume();
        }
      }
    } finally {
      this.draining = false;
    }
  }

  /**
   * Applies an ack, merged with the one held, if any: at once while the ack bucket has a token,
   * else held until it has one (ACK_RATE_PER_S), merging the acks that come meanwhile. Acks are
   * cumulative, so the merged ack covers what each would have; it carries the latest frame's
   * `id`, for an `internal` error should it fail.
   */
  private async issueAck(frame: AckFrame): Promise<void> {
    const held = this.takeHeldAck();
    const ack = held && held.frame.upTo > frame.upTo ? { ...frame, upTo: held.frame.upTo } : frame;
    if (this.ackBucket.take()) {
      this.answerInTurn(await this.issue({ frame: ack }));
      return;
    }
    this.context.instruments.ackHeld();
    const timer = setTimeout(
      () => {
        // Closing: `closed` applies it. Else the bucket has a token again: the held ack goes
        // first, ahead of anything queued after.
        if (this.state !== 'ready' || this.closing) return;
        const due = this.takeHeldAck();
        if (!due) return;
        this.queue.unshift(due);
        this.drain();
      },
      Math.ceil(this.ackBucket.secondsToNext * 1000) + 1,
    );
    timer.unref();
    this.heldAck = { frame: ack, timer };
  }

  /**
   * The connection closes and its queue is dropped: the acks in it (a held ack its timer put
   * back in the queue among them) are folded into the held one, which `closed` applies.
   */
  private foldQueuedAcks(): void {
    let ack = this.takeHeldAck()?.frame;
    for (const { frame } of this.queue)
      if (frame?.type === 'ack' && (ack === undefined || frame.upTo > ack.upTo)) ack = frame;
    if (ack) this.heldAck = { frame: ack };
  }

  /** The held ack, if any, as a frame to issue; it is no longer held. */
  private takeHeldAck(): { frame: AckFrame } | undefined {
    const held = this.heldAck;
    if (!held) return undefined;
    clearTimeout(held.timer);
    this.heldAck = undefined;
    return { frame: held.frame };
  }

  /**
   * Waits until the send buffer is down to ANSWER_BACKLOG_BYTES, looking less and less often;
   * closes the connection (1013) when the client has not read that far in ANSWER_BACKLOG_MAX_MS.
   */
  private async backlogRead(): Promise<void> {
    const read = await this.sendBufferDownTo(ANSWER_BACKLOG_BYTES, ANSWER_BACKLOG_MAX_MS);
    if (!read && this.state !== 'closed' && !this.closing) this.closeSlowConsumer();
  }

  /**
   * Waits until the send buffer holds at most `bytes`, looking again after REPLAY_DRAIN_POLL_MS,
   * doubling up to REPLAY_DRAIN_POLL_MAX_MS; false once the connection closes or `maxMs` passed.
   */
  private async sendBufferDownTo(bytes: number, maxMs = Infinity): Promise<boolean> {
    const since = performance.now();
    let wait = REPLAY_DRAIN_POLL_MS;
    while (this.state !== 'closed' && !this.closing) {
      if (this.ws.bufferedAmount <= bytes) return true;
      if (performance.now() - since >= maxMs) return false;
      await sleep(wait, undefined, { ref: false });
      wait = Math.min(REPLAY_DRAIN_POLL_MAX_MS, wait * 2);
    }
    return false;
  }

  private answerInTurn(issued: Issued): void {
    const before = this.answered;
    this.answered = (async () => {
      let failure: { error: unknown } | undefined;
      let deadline: NodeJS.Timeout | undefined;
      try {
        if (issued.durable)
          await Promise.race([
            issued.durable,
            new Promise((_resolve, reject) => {
              const ms = this.context.answerDeadlineMs;
              deadline = setTimeout(
                () => reject(new LogUnavailableError(`the log took no records for ${ms} ms`)),
                ms,
              );
              deadline.unref();
            }),
          ]);
      } catch (error) {
        failure = { error };
      } finally {
        clearTimeout(deadline);
      }
      await before;
      this.unanswered.shift(); // this frame's: answers come in the order frames were issued
      try {
        if (failure) this.failed(issued.frame!, failure.error);
        else issued.answer?.();
      } catch (error) {
        // `answered` never rejects: the answers after this one still go out.
        this.logger.error({ err: error }, 'answering a frame failed');
      }
    })();
    this.unanswered.push(this.answered);
  }

  /** Runs a frame's checks and hands its records to the producer; never throws. */
  private async issue(parsed: ParsedFrame): Promise<Issued> {
    if (parsed.error) {
      const error = parsed.error;
      return { answer: () => this.refuse(error) };
    }
    const frame = parsed.frame;
    const unavailable = frame.type === 'ping' ? undefined : this.context.logUnavailableBecause();
    if (unavailable)
      return { frame, durable: Promise.reject(new LogUnavailableError(unavailable)) };
    try {
      return { frame, ...(await this.issueFrame(frame)) };
    } catch (error) {
      return { frame, durable: Promise.reject(error) };
    }
  }

  private failed(frame: ClientFrame, error: unknown): void {
    // The log's outage is logged by the heartbeat; a line per frame would flood the log.
    if (error instanceof LogUnavailableError)
      this.logger.debug({ reason: error.message, frame: frame.type }, 'frame failed');
    else this.logger.error({ err: error, frame: frame.type }, 'frame failed');
    this.refuse({
      code: 'internal',
      message:
        frame.type === 'send'
          ? 'the message could not be stored; send it again with the same id'
          : `the ${frame.type} frame could not be handled; send it again`,
      ...(frame.id === undefined ? {} : { id: frame.id }),
    });
  }

  private async issueFrame(frame: ClientFrame): Promise<Issued> {
    const { userId, deviceId, connectionId } = this.identity;
    switch (frame.type) {
      case 'send':
        return this.send(frame);
      case 'ack':
        return this.command({ [fullNames.Ack]: { deviceId, upTo: frame.upTo, continued: false } });
      case 'read':
        // The users actor answers `unknown_message` on this connection, with the frame's id.
        return this.command({
          [fullNames.Read]: {
            deviceId,
            messageId: frame.messageId,
            connectionId,
            id: frame.id ?? null,
          },
        });
      case 'typing':
        return this.typing(frame);
      case 'sync':
        return this.command({
          [fullNames.Sync]: { deviceId, connectionId, after: frame.after, continued: false },
        });
      case 'ping':
        return { answer: () => this.write(pongFrame(frame.id)) };
      default:
        throw new TypeError(`unhandled frame of ${userId}: ${(frame as { type: string }).type}`);
    }
  }

  /**
   * 1:1: the recipient's copy and the sender's own, in one produce, keyed by each inbox owner.
   * Group: one GroupSend keyed by the group, for the groups actor to fan out. `sent` only once
   * the records are durable.
   */
  private async send(frame: SendFrame): Promise<Issued> {
    const { userId, deviceId } = this.identity;
    const messageId = messageIdFor(userId, deviceId, frame.id);
    const at = this.context.now();
    const { codecs } = this.context;
    let durable: Promise<unknown>;
    if (frame.recipient.kind === 'user') {
      const to = frame.recipient.userId;
      if (!(await this.context.userExists(to))) return this.unknownUser(to, frame.id);
      const copy: MessageCopy = {
        messageId,
        from: userId,
        to,
        group: null,
        body: frame.body,
        sentAt: at,
      };
      const entry = { [fullNames.MessageCopy]: copy };
      durable = this.context.producer.send([
        record(topics.messages, to, codecs.messages.encode({ userId: to, entry })),
        record(topics.messages, userId, codecs.messages.encode({ userId, entry })),
      ]);
    } else {
      const { groupId } = frame.recipient;
      if (!(await this.groupExists(groupId))) return this.unknownGroup(groupId, frame.id);
      const payload = {
        [fullNames.GroupSend]: {
          messageId,
          id: frame.id,
          from: userId,
          body: frame.body,
          sentAt: at,
        },
      };
      durable = this.context.producer.send([
        record(topics.groupMessages, groupId, codecs.groupMessages.encode({ groupId, payload })),
      ]);
    }
    return { durable, answer: () => this.write(sentFrame(frame.id, messageId, at)) };
  }

  /** 1:1 typing goes to the users actor keyed by the recipient; group typing to the group. */
  private async typing(frame: TypingFrameIn): Promise<Issued> {
    const from = this.identity.userId;
    const at = this.context.now();
    if (frame.recipient.kind === 'user') {
      const to = frame.recipient.userId;
      if (!(await this.context.userExists(to))) return this.unknownUser(to, frame.id);
      const typing = { from, to, group: null, state: frame.state, at };
      const command: UserCommand = { userId: to, at, command: { [fullNames.Typing]: typing } };
      return {
        durable: this.context.producer.send([
          record(topics.userCommands, to, this.context.codecs.userCommands.encode(command)),
        ]),
      };
    }
    const { groupId } = frame.recipient;
    if (!(await this.groupExists(groupId))) return this.unknownGroup(groupId, frame.id);
    const typing = { from, to: null, group: groupId, state: frame.state, at };
    const message: GroupMessage = { groupId, payload: { [fullNames.Typing]: typing } };
    return {
      durable: this.context.producer.send([
        record(topics.groupMessages, groupId, this.context.codecs.groupMessages.encode(message)),
      ]),
    };
  }

  /** A UserCommand about this user, keyed by it. */
  private command(command: UserCommand['command']): Issued {
    const { userId } = this.identity;
    const value: UserCommand = { userId, at: this.context.now(), command };
    return {
      durable: this.context.producer.send([
        record(topics.userCommands, userId, this.context.codecs.userCommands.encode(value)),
      ]),
    };
  }

  private async groupExists(groupId: string): Promise<boolean> {
    return this.context.groupExists ? await this.context.groupExists(groupId) : true;
  }

  private unknownUser(userId: string, id: string | undefined): Issued {
    const error = { code: 'unknown_recipient' as const, message: `no user "${userId}"` };
    return { answer: () => this.refuse({ ...error, ...idOf(id) }) };
  }

  private unknownGroup(groupId: string, id: string | undefined): Issued {
    const error = { code: 'unknown_recipient' as const, message: `no group "${groupId}"` };
    return { answer: () => this.refuse({ ...error, ...idOf(id) }) };
  }

  private refuse(error: FrameError): void {
    this.context.instruments.errorSent(error.code);
    this.write(errorFrame(error));
  }

  // ---- writing ----

  /**
   * Writes a frame unless that would take the send buffer over its limit: then it closes.
   * `written` is called once the frame has left the process (not if the socket fails first).
   */
  private write(frame: ServerFrame | string, written?: () => void): void {
    if (this.state === 'closed' || this.closing || this.ws.readyState !== WebSocket.OPEN) return;
    const text = typeof frame === 'string' ? frame : serialize(frame);
    if (this.ws.bufferedAmount + Buffer.byteLength(text) > this.context.sendBufferHardLimitBytes) {
      this.closeSlowConsumer();
      return;
    }
    this.ws.send(text, written && ((err) => err || written()));
    if (this.ws.bufferedAmount > this.context.sendBufferLimitBytes) this.watchSendBuffer();
  }

  /**
   * The send buffer is over its limit, as a burst takes it: looked at every tenth of the grace
   * until it is back under (a client that reads), or closed when it has stayed over all along
   * (one that does not).
   */
  private watchSendBuffer(): void {
    if (this.overLimit) return;
    const { slowConsumerGraceMs: grace, sendBufferLimitBytes: limit } = this.context;
    const look = () => {
      if (this.state === 'closed' || this.closing || !this.overLimit) return;
      if (this.ws.bufferedAmount <= limit) {
        this.overLimit = undefined;
      } else if (performance.now() - this.overLimit.since >= grace) {
        this.overLimit = undefined;
        this.closeSlowConsumer();
      } else {
        this.overLimit.check = setTimeout(look, grace / 10).unref();
      }
    };
    this.context.instruments.sendBufferOverLimit();
    this.overLimit = { since: performance.now(), check: setTimeout(look, grace / 10).unref() };
  }

  private closeSlowConsumer(): void {
    this.logger.warn(
      {
        bufferedAmount: this.ws.bufferedAmount,
        limit: this.context.sendBufferLimitBytes,
        hardLimit: this.context.sendBufferHardLimitBytes,
      },
      'the client does not read its frames; closing',
    );
    this.context.instruments.slowConsumerClosed();
    this.close(SLOW_CONSUMER_CLOSE_CODE, 'send buffer limit exceeded');
  }

  private parse(data: RawData): ParsedFrame {
    const bytes = Array.isArray(data)
      ? Buffer.concat(data)
      : data instanceof ArrayBuffer
        ? Buffer.from(data)
        : data;
    // Text frames too: ws leaves their UTF-8 to us (skipUTF8Validation), so that a frame that
    // is not UTF-8 answers bad_frame and keeps the connection, as PROTOCOL says, rather than
    // closing it with 1007 as RFC 6455 would.
    let text: string;
    try {
      text = utf8.decode(bytes);
    } catch {
      return { error: { code: 'bad_frame', message: 'a frame must be UTF-8 JSON text' } };
    }
    return parseClientFrame(text);
  }
}

function record(topic: string, key: string, value: Buffer): ProducerRecord {
  return { topic, key: Buffer.from(key, 'utf8'), value };
}

const idOf = (id: string | undefined) => (id === undefined ? {} : { id });
