/**
 * The WebSocket gateway of PROTOCOL.md: authenticates upgrades on `/v1/ws`, registers each
 * connection (CONNECTED, then `ready`; DISCONNECTED on close) on `chat.connections`, hands
 * client frames to their Connection, delivers what the users actor sends to
 * `chat.deliveries.<gatewayId>`, pings its peers and beats on `chat.gateways`.
 *
 *   const gateway = createGateway({ gatewayId, log, codecs, registry, verifyAccessToken, ... });
 *   await gateway.start();
 *   gateway.attach(httpServer);
 *   ...
 *   await gateway.close();   // 1001 to every client, DISCONNECTED for each
 */
import { randomUUID } from 'node:crypto';
import type { IncomingMessage, Server } from 'node:http';
import type { Duplex } from 'node:stream';
import { WebSocketServer, type WebSocket } from 'ws';
import type { Log, Producer, ProducerRecord } from '../log/port.ts';
import { avroTypeOptions, loadSchema } from '../schemas/avro.ts';
import { Codecs, type TopicCodec } from '../schemas/codec.ts';
import type { ChatCodecs } from '../app/bootstrap.ts';
import { answerAsPlainRequest, pathOf, wantsWebSocket } from '../app/http.ts';
import type { SchemaRegistry } from '../schemas/registry/port.ts';
import { deliveriesTopic, topics } from '../schemas/topics.ts';
import { FROM_ACK } from '../schemas/conventions.ts';
import type {
  ConnectionEvent,
  ConnectionState,
  Delivery,
  UserCommand,
} from '../schemas/types.generated.ts';
import { silentLogger, type Logger } from '../observability/logger.ts';
import type { Metrics } from '../observability/metrics.ts';
import {
  authenticate,
  HandshakeRefusal,
  malformedHandshake,
  refuseUpgrade,
  type Identity,
  type VerifyAccessToken,
} from './authentication.ts';
import { Connection, type ConnectionContext } from './connection.ts';
import { DeliveryConsumer } from './delivery.ts';
import { Heartbeat } from './heartbeat.ts';
import {
  MAX_CONNECTIONS_PER_USER,
  CONNECTS_PER_USER_BURST,
  ANSWER_DEADLINE_MS,
  READ_RATE_PER_S,
  CONNECTS_PER_USER_PER_S,
  CLOSE_TIMEOUT_MS,
  DEFAULT_RATE_LIMIT_PER_S,
  GOING_AWAY_CLOSE_CODE,
  HEARTBEAT_INTERVAL_MS,
  INTERNAL_ERROR_CLOSE_CODE,
  MAX_FRAME_BYTES,
  PER_MESSAGE_DEFLATE,
  PING_INTERVAL_MS,
  SEND_BUFFER_HARD_LIMIT_BYTES,
  SEND_BUFFER_LIMIT_BYTES,
  SLOW_CONSUMER_GRACE_MS,
} from './limits.ts';
import { gatewayInstruments, type GatewayInstruments } from './metrics.ts';
import { KeyedTokenBuckets } from './rate-limit.ts';

/** Where clients connect (PROTOCOL.md). */
export const WS_PATH = '/v1/ws';

/** The codecs of the topics the gateway writes. */
export type GatewayCodecs = Pick<
  ChatCodecs,
  | 'chat.messages'
  | 'chat.user-commands'
  | 'chat.group-messages'
  | 'chat.connections'
  | 'chat.gateways'
>;

/**
 * The longest wait between tries at producing a closed connection's DISCONNECTED (from 100 ms,
 * doubling): a log away for minutes is tried every 2 s, and a shutdown waits at most that long.
 */
const DISCONNECTED_RETRY_MAX_MS = 2_000;
/**
 * How long a shutting-down gateway goes on trying to produce the DISCONNECTED of its connections:
 * within the 10 s a process has to exit, with time left for the rest of the shutdown.
 */
const SHUTDOWN_DISCONNECTED_MS = 4_000;

/** The limits a deployment (or a test) may change; each defaults to its constant of limits.ts. */
export interface GatewayLimits {
  sendBufferLimitBytes?: number;
  sendBufferHardLimitBytes?: number;
  slowConsumerGraceMs?: number;
  pingIntervalMs?: number;
  heartbeatIntervalMs?: number;
  closeTimeoutMs?: number;
  /** The longest wait between tries at a DISCONNECTED (DISCONNECTED_RETRY_MAX_MS). */
  disconnectedRetryMaxMs?: number;
  /** New connections of one user a second, and at once (CONNECTS_PER_USER_PER_S, _BURST). */
  connectsPerUserPerS?: number;
  connectsPerUserBurst?: number;
  /** ANSWER_DEADLINE_MS. */
  answerDeadlineMs?: number;
  /** READ_RATE_PER_S. */
  readsPerS?: number;
}

export interface GatewayDeps {
  /** Names this gateway's deliveries topic, consumer group and heartbeat. */
  gatewayId: string;
  log: Log;
  codecs: GatewayCodecs;
  /**
   * The codec of `chat.deliveries.<gatewayId>`; when absent it is built (and its schema
   * registered) from `registry`.
   */
  deliveryCodec?: TopicCodec<Delivery>;
  registry?: SchemaRegistry;
  /** Resolves to the token's userId; rejects when the token is invalid or expired. */
  verifyAccessToken: VerifyAccessToken;
  /** Whether an account exists (e.g. the `chat.accounts` global table). */
  userExists(userId: string): boolean | Promise<boolean>;
  /** Whether a group exists; absent, every group is accepted and the groups actor decides. */
  groupExists?(groupId: string): boolean | Promise<boolean>;
  /** RATE_LIMIT_PER_S (limits.ts `rateLimitPerSecond()` reads it); default 50. */
  rateLimitPerSecond?: number;
  /** Partitions of `chat.deliveries.<gatewayId>` when the gateway creates it (PARTITIONS). */
  partitions: number;
  logger?: Logger;
  metrics?: Metrics;
  now?: () => number;
  limits?: GatewayLimits;
}

export interface Gateway {
  readonly gatewayId: string;
  /** Open connections (registered or being registered). */
  readonly connectionCount: number;
  /** Why clients should not be sent here now (not running, its log unreachable), if so. */
  readonly notReadyBecause: string | undefined;
  /** Creates the deliveries topic, starts its consumer and the heartbeat; then accepts upgrades. */
  start(): Promise<void>;
  /**
   * Serves upgrades of `server` on WS_PATH; other paths answer 404. Returns the function that
   * detaches it.
   */
  attach(server: Server): () => void;
  /** Handles one upgrade request (for a caller that routes upgrades itself). */
  handleUpgrade(request: IncomingMessage, socket: Duplex, head: Buffer): void;
  /**
   * Closes every connection with 1001 (a peer that does not answer within CLOSE_TIMEOUT_MS is
   * cut off), produces their DISCONNECTED events, stops the consumer and the heartbeat.
   */
  close(): Promise<void>;
}

export function createGateway(deps: GatewayDeps): Gateway {
  return new WebSocketGateway(deps);
}

type Phase = 'created' | 'starting' | 'running' | 'closed';

class WebSocketGateway implements Gateway {
  readonly gatewayId: string;
  private phase: Phase = 'created';
  /** Once the gateway shuts down: when it stops trying to produce DISCONNECTEDs. */
  private disconnectedDeadline = 0;
  private readonly connections = new Map<string, Connection>();
  /** Open connections per userId (MAX_CONNECTIONS_PER_USER). */
  private readonly perUser = new Map<string, number>();
  /** Each user's new connections: a bucket per user that connected lately. */
  private readonly connects: KeyedTokenBuckets;
  /** Resolves when the socket closed and its DISCONNECTED was produced (or failed). */
  private readonly closings = new Set<Promise<void>>();
  private readonly wss: WebSocketServer;
  private readonly logger: Logger;
  private readonly instruments: GatewayInstruments;
  private readonly now: () => number;
  private readonly limits: Required<GatewayLimits>;
  private producer: Producer | undefined;
  private context: ConnectionContext | undefined;
  private deliveries: DeliveryConsumer | undefined;
  private heartbeat: Heartbeat | undefined;
  private pinger: NodeJS.Timeout | undefined;
  private starting: Promise<void> | undefined;
  private closing: Promise<void> | undefined;

  constructor(private readonly deps: GatewayDeps) {
    this.gatewayId = deps.gatewayId;
    this.logger = (deps.logger ?? silentLogger).child({
      component: 'gateway',
      gatewayId: deps.gatewayId,
    });
    this.instruments = gatewayInstruments(deps.metrics, () => this.connections.size);
    this.now = deps.now ?? Date.now;
    this.limits = {
      sendBufferLimitBytes: deps.limits?.sendBufferLimitBytes ?? SEND_BUFFER_LIMIT_BYTES,
      sendBufferHardLimitBytes:
        deps.limits?.sendBufferHardLimitBytes ?? SEND_BUFFER_HARD_LIMIT_BYTES,
      slowConsumerGraceMs: deps.limits?.slowConsumerGraceMs ?? SLOW_CONSUMER_GRACE_MS,
      pingIntervalMs: deps.limits?.pingIntervalMs ?? PING_INTERVAL_MS,
      heartbeatIntervalMs: deps.limits?.heartbeatIntervalMs ?? HEARTBEAT_INTERVAL_MS,
      closeTimeoutMs: deps.limits?.closeTimeoutMs ?? CLOSE_TIMEOUT_MS,
      disconnectedRetryMaxMs: deps.limits?.disconnectedRetryMaxMs ?? DISCONNECTED_RETRY_MAX_MS,
      connectsPerUserPerS: deps.limits?.connectsPerUserPerS ?? CONNECTS_PER_USER_PER_S,
      connectsPerUserBurst: deps.limits?.connectsPerUserBurst ?? CONNECTS_PER_USER_BURST,
      answerDeadlineMs: deps.limits?.answerDeadlineMs ?? ANSWER_DEADLINE_MS,
      readsPerS: deps.limits?.readsPerS ?? READ_RATE_PER_S,
    };
    this.connects = new KeyedTokenBuckets(
      this.limits.connectsPerUserPerS,
      this.limits.connectsPerUserBurst,
      this.now,
    );
    this.wss = new WebSocketServer({
      noServer: true,
      clientTracking: false,
      maxPayload: MAX_FRAME_BYTES,
      perMessageDeflate: PER_MESSAGE_DEFLATE,
      // Connection.parse decodes every frame strictly, and answers bad_frame for bad UTF-8.
      skipUTF8Validation: true,
    });
    this.wss.on('wsClientError', (error: Error, socket: Duplex, request: IncomingMessage) =>
      refuseUpgrade(socket, malformedHandshake(request, error)),
    );
  }

  /** For /readyz: why clients should not be sent here now (its log unreachable), if so. */
  get notReadyBecause(): string | undefined {
    if (this.phase !== 'running') return `the gateway is ${this.phase}`;
    return this.heartbeat?.silentBecause;
  }

  get connectionCount(): number {
    return this.connections.size;
  }

  async start(): Promise<void> {
    if (this.phase !== 'created') throw new Error(`the gateway cannot start: it is ${this.phase}`);
    this.phase = 'starting';
    this.starting = this.run();
    await this.starting;
  }

  private async run(): Promise<void> {
    const { deps } = this;
    const producer = await deps.log.producer();
    this.producer = producer;
    this.context = {
      producer,
      codecs: {
        messages: deps.codecs['chat.messages'],
        userCommands: deps.codecs['chat.user-commands'],
        groupMessages: deps.codecs['chat.group-messages'],
      },
      userExists: deps.userExists,
      groupExists: deps.groupExists,
      rateLimitPerSecond: deps.rateLimitPerSecond ?? DEFAULT_RATE_LIMIT_PER_S,
      sendBufferLimitBytes: this.limits.sendBufferLimitBytes,
      sendBufferHardLimitBytes: this.limits.sendBufferHardLimitBytes,
      slowConsumerGraceMs: this.limits.slowConsumerGraceMs,
      closeTimeoutMs: this.limits.closeTimeoutMs,
      answerDeadlineMs: this.limits.answerDeadlineMs,
      readsPerS: this.limits.readsPerS,
      logUnavailableBecause: () => this.heartbeat?.silentBecause,
      now: this.now,
      logger: this.logger,
      instruments: this.instruments,
    };
    this.deliveries = new DeliveryConsumer({
      log: deps.log,
      gatewayId: this.gatewayId,
      partitions: deps.partitions,
      codec: await this.deliveryCodec(),
      connection: (connectionId) => this.connections.get(connectionId),
      logger: this.logger,
      instruments: this.instruments,
    });
    await this.deliveries.start();
    this.heartbeat = new Heartbeat(
      this.gatewayId,
      producer,
      deps.codecs['chat.gateways'],
      this.limits.heartbeatIntervalMs,
      this.now,
      this.logger,
      this.instruments,
    );
    await this.heartbeat.start();
    this.pinger = setInterval(() => {
      for (const connection of this.connections.values()) connection.ping();
      this.connects.forgetFull();
    }, this.limits.pingIntervalMs);
    this.pinger.unref();
    this.phase = 'running';
    this.logger.info({ deliveries: this.deliveries.topic }, 'gateway started');
  }

  attach(server: Server): () => void {
    const listener = (request: IncomingMessage, socket: Duplex, head: Buffer) => {
      if (!wantsWebSocket(request)) return answerAsPlainRequest(server, request, socket);
      const path = pathOf(request);
      if (path === undefined) {
        refuseUpgrade(
          socket,
          new HandshakeRefusal(400, 'bad_request', 'the request target is not a valid URL'),
        );
        return;
      }
      if (path !== WS_PATH) {
        refuseUpgrade(socket, new HandshakeRefusal(404, 'not_found', `no WebSocket at ${path}`));
        return;
      }
      this.handleUpgrade(request, socket, head);
    };
    server.on('upgrade', listener);
    return () => server.off('upgrade', listener);
  }

  handleUpgrade(request: IncomingMessage, socket: Duplex, head: Buffer): void {
    // Until ws owns the socket, a reset during authentication must not be an unhandled error.
    const onError = (err: Error) => this.logger.debug({ err }, 'socket error before upgrade');
    socket.on('error', onError);
    this.upgrade(request, socket, head)
      .catch((error: unknown) => {
        if (error instanceof HandshakeRefusal) return refuseUpgrade(socket, error);
        this.logger.error({ err: error }, 'upgrade failed');
        refuseUpgrade(socket, new HandshakeRefusal(500, 'internal', 'the upgrade failed'));
      })
      .finally(() => socket.off('error', onError));
  }

  async close(): Promise<void> {
    this.closing ??= this.shutDown();
    return this.closing;
  }

  private async shutDown(): Promise<void> {
    await this.starting?.catch(() => undefined); // what a half-done start opened is closed below
    this.phase = 'closed'; // upgrades from now on answer 503
    this.disconnectedDeadline = Date.now() + SHUTDOWN_DISCONNECTED_MS;
    clearInterval(this.pinger);
    const closing = this.connections.size;
    for (const connection of this.connections.values()) {
      connection.close(GOING_AWAY_CLOSE_CODE, 'the server is shutting down');
    }
    await Promise.all([
      Promise.all(this.closings),
      this.deliveries?.close().catch((err: unknown) => {
        this.logger.error({ err }, 'the delivery consumer did not close cleanly');
      }),
    ]);
    await this.heartbeat?.stop();
    await this.producer?.close();
    this.wss.close();
    this.logger.info({ connections: closing }, 'gateway closed');
  }

  private async upgrade(request: IncomingMessage, socket: Duplex, head: Buffer): Promise<void> {
    this.mustAccept();
    const identity = await authenticate(request, this.deps.verifyAccessToken);
    this.mustAccept(); // it may have closed during the verification
    if (socket.destroyed) return;
    // Counted from here to the upgrade's end, which ws completes in this same turn (no
    // verifyClient): concurrent upgrades of one user cannot all pass the check.
    if ((this.perUser.get(identity.userId) ?? 0) >= MAX_CONNECTIONS_PER_USER) {
      throw new HandshakeRefusal(
        429,
        'rate_limited',
        `at most ${MAX_CONNECTIONS_PER_USER} connections of one user on this server; close one first`,
      );
    }
    if (!this.connects.take(identity.userId)) {
      const retryAfterS = Math.max(1, Math.ceil(this.connects.secondsToNext(identity.userId)));
      throw new HandshakeRefusal(
        429,
        'rate_limited',
        `too many new connections of one user on this server; try again in ${retryAfterS} s`,
        undefined,
        { 'Retry-After': String(retryAfterS) },
      );
    }
    this.wss.handleUpgrade(request, socket, head, (ws) => this.connected(ws, identity));
  }

  private mustAccept(): void {
    if (this.phase !== 'running') {
      throw new HandshakeRefusal(
        503,
        'unavailable',
        this.phase === 'closed' ? 'the server is shutting down' : 'the server is starting',
      );
    }
  }

  /**
   * A new connection: CONNECTED is made durable before `ready` is written, so that the users
   * actor knows the session before the client does anything with it; frames that arrive
   * meanwhile wait in the connection's queue.
   */
  private connected(ws: WebSocket, identity: Identity): void {
    const connectionId = randomUUID();
    const connection = new Connection(ws, { ...identity, connectionId }, this.context!);
    this.connections.set(connectionId, connection);
    this.perUser.set(identity.userId, (this.perUser.get(identity.userId) ?? 0) + 1);
    ws.on('message', (data) => connection.receive(data));
    ws.on('error', (err) => this.logger.debug({ err, connectionId }, 'WebSocket error'));
    const registered = this.connectionEvent(connection, 'CONNECTED');
    registered.then(
      () => connection.start(),
      (err: unknown) => {
        this.logger.error({ err, connectionId }, 'CONNECTED was not produced; closing');
        connection.close(INTERNAL_ERROR_CLOSE_CODE, 'internal error; connect again');
      },
    );
    const closing = new Promise<void>((resolve) => {
      ws.once('close', (code) => {
        connection.closed();
        this.connections.delete(connectionId);
        const left = (this.perUser.get(identity.userId) ?? 1) - 1;
        if (left > 0) this.perUser.set(identity.userId, left);
        else this.perUser.delete(identity.userId);
        this.logger.debug({ connectionId, code }, 'connection closed');
        // After CONNECTED (same key, so the same partition): the users actor sees them in order.
        // After the frame in hand too: the producer stays open until its records are written.
        Promise.all([registered.catch(() => undefined), connection.settled()])
          .then(() => this.disconnected(connection))
          .catch((err: unknown) => {
            this.logger.error({ err, connectionId }, 'DISCONNECTED was not produced');
          })
          .finally(resolve);
      });
    });
    this.closings.add(closing);
    void closing.finally(() => this.closings.delete(closing));
    this.logger.debug({ connectionId, ...identity }, 'connection opened');
  }

  /**
   * Produces DISCONNECTED, again after each failure for as long as the gateway runs (backoff
   * from 100 ms to DISCONNECTED_RETRY_MAX_MS), and while it shuts down for SHUTDOWN_DISCONNECTED_MS:
   * without it the users actor would count the session as online, holding back push, until this
   * gateway restarts. A log away for longer than a few tries (a broker restart) must not leave
   * such sessions behind for good, nor a hiccup as the gateway stops (one try, before, did).
   */
  private async disconnected(connection: Connection): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.connectionEvent(connection, 'DISCONNECTED');
      } catch (err) {
        if (this.phase !== 'running' && Date.now() >= this.disconnectedDeadline) throw err;
        const log = attempt < 5 || attempt % 30 === 0 ? 'warn' : 'debug';
        this.logger[log](
          { err, connectionId: connection.connectionId, attempt },
          'DISCONNECTED was not produced; trying again',
        );
        const wait = Math.min(this.limits.disconnectedRetryMaxMs, 100 * 2 ** (attempt - 1));
        await new Promise((resolve) => setTimeout(resolve, wait));
      }
    }
  }

  private async connectionEvent(connection: Connection, state: ConnectionState): Promise<void> {
    const { userId, deviceId, connectionId } = connection.identity;
    const event: ConnectionEvent = {
      userId,
      deviceId,
      gatewayId: this.gatewayId,
      connectionId,
      state,
      at: this.now(),
    };
    const codec = this.deps.codecs['chat.connections'];
    const key = Buffer.from(userId, 'utf8');
    const records: ProducerRecord[] = [
      { topic: topics.connections, key, value: codec.encode(event) },
    ];
    if (state === 'CONNECTED') {
      // The replay a new connection gets is asked for on chat.user-commands, behind every ack
      // this device made before (acks travel there too): the users actor replays from the
      // device's last applied ack, whichever of CONNECTED and this it sees first.
      const sync: UserCommand = {
        userId,
        at: event.at,
        command: { 'chat.v1.Sync': { deviceId, connectionId, after: FROM_ACK, continued: false } },
      };
      const commands = this.deps.codecs['chat.user-commands'];
      records.push({ topic: topics.userCommands, key, value: commands.encode(sync) });
    }
    await this.producer!.send(records);
  }

  private async deliveryCodec(): Promise<TopicCodec<Delivery>> {
    if (this.deps.deliveryCodec) return this.deps.deliveryCodec;
    if (!this.deps.registry) {
      throw new Error('the gateway needs deliveryCodec or a registry to build it from');
    }
    return new Codecs(this.deps.registry).forTopic<Delivery>(
      deliveriesTopic(this.gatewayId),
      loadSchema('Delivery'),
      avroTypeOptions(),
    );
  }
}
