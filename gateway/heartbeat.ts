/**
 * The gateway's heartbeat: a GatewayHeartbeat keyed by gatewayId on the compacted
 * `chat.gateways`, every HEARTBEAT_INTERVAL_MS. The users actor reads it as a global table:
 * the sessions of a gateway silent for 15 s count as offline. On a clean stop the gateway
 * deletes its key (a tombstone): it is gone, not silent. Each heartbeat says when this run
 * started: a gateway that crashed and came back under the same id has none of the connections
 * the users actor still holds for it from before, and the actor closes those sessions.
 */
import type { Producer } from '../log/port.ts';
import type { TopicCodec } from '../schemas/codec.ts';
import { topics } from '../schemas/topics.ts';
import type { GatewayHeartbeat } from '../schemas/types.generated.ts';
import type { Logger } from '../observability/logger.ts';
import type { GatewayInstruments } from './metrics.ts';

export class Heartbeat {
  private timer: NodeJS.Timeout | undefined;
  private inFlight: Promise<void> | undefined;
  private readonly key: Buffer;
  /** Before any connection of this run: the users actor drops sessions older than this. */
  private readonly startedAt: number;

  constructor(
    private readonly gatewayId: string,
    private readonly producer: Producer,
    private readonly codec: TopicCodec<GatewayHeartbeat>,
    private readonly intervalMs: number,
    private readonly now: () => number,
    private readonly logger: Logger,
    private readonly instruments: GatewayInstruments,
  ) {
    this.key = Buffer.from(gatewayId, 'utf8');
    this.startedAt = now();
  }

  /** Writes the first heartbeat (awaited: a log that refuses it fails the start), then beats. */
  async start(): Promise<void> {
    await this.producer.send([this.record()]);
    this.timer = setInterval(() => this.beat(), this.intervalMs);
    this.timer.unref();
  }

  /** Stops beating and deletes the gateway's key. */
  async stop(): Promise<void> {
    clearInterval(this.timer);
    await this.inFlight;
    await this.producer
      .send([{ topic: topics.gateways, key: this.key, value: null }])
      .catch((err: unknown) => this.logger.warn({ err }, 'heartbeat tombstone failed'));
  }

  private beat(): void {
    if (this.inFlight) return; // the log is slow: one heartbeat at a time is enough
    this.inFlight = this.producer
      .send([this.record()])
      .then(
        () => undefined,
        (err: unknown) => {
          this.instruments.heartbeatFailed();
          this.logger.error({ err }, 'heartbeat failed');
        },
      )
      .finally(() => (this.inFlight = undefined));
  }

  private record() {
    const value: GatewayHeartbeat = {
      gatewayId: this.gatewayId,
      at: this.now(),
      startedAt: this.startedAt,
    };
    return { topic: topics.gateways, key: this.key, value: this.codec.encode(value) };
  }
}
