/**
 * The gateway's heartbeat: a GatewayHeartbeat keyed by gatewayId on the compacted
 * `chat.gateways`, every HEARTBEAT_INTERVAL_MS. The users actor reads it as a global table:
 * the sessions of a gateway silent for 15 s count as offline. On a clean stop the gateway
 * deletes its key (a tombstone): it is gone, not silent. Each heartbeat says when this run
 * started: a gateway that crashed and came back under the same id has none of the connections
 * the users actor still holds for it from before, and the actor closes those sessions.
 *
 * A gateway that dies and never comes back under its id (a container restarted under a new
 * hostname) leaves its last heartbeat: the users processors delete the key once it has been
 * silent for FORGET_SILENT_GATEWAY_MS (`forgetSilentGateways`), or the table, which the users
 * actor reads on every record, would grow with every gateway that ever ran.
 */
import type { Producer } from '../log/port.ts';
import type { TopicCodec } from '../schemas/codec.ts';
import { topics } from '../schemas/topics.ts';
import type { GatewayHeartbeat } from '../schemas/types.generated.ts';
import type { Logger } from '../observability/logger.ts';
import type { GatewayInstruments } from './metrics.ts';

/** How long a gateway is silent before its heartbeat is deleted: a day. */
export const FORGET_SILENT_GATEWAY_MS = 86_400_000;

/**
 * Deletes (tombstones) the heartbeat of each gateway silent for more than `forgetAfterMs`, by
 * the clock and by the newest heartbeat in the table alike; answers their ids. The second
 * keeps a table whose reader has stalled (where every gateway looks silent) from deleting live
 * gateways' keys. A gateway that is only cut off from the log writes its key again with its
 * next heartbeat. Idempotent: several users processors may run it at once.
 */
export async function forgetSilentGateways(
  producer: Producer,
  heartbeats: Iterable<[string, GatewayHeartbeat]>,
  now: number,
  forgetAfterMs = FORGET_SILENT_GATEWAY_MS,
): Promise<string[]> {
  const all = [...heartbeats];
  const newest = Math.max(...all.map(([, h]) => h.at));
  const silent = all
    .filter(([, h]) => now - h.at > forgetAfterMs && newest - h.at > forgetAfterMs)
    .map(([id]) => id);
  if (silent.length > 0)
    await producer.send(
      silent.map((id) => ({ topic: topics.gateways, key: Buffer.from(id, 'utf8'), value: null })),
    );
  return silent;
}

export class Heartbeat {
  private timer: NodeJS.Timeout | undefined;
  private inFlight: Promise<void> | undefined;
  private readonly key: Buffer;
  /** Before any connection of this run: the users actor drops sessions older than this. */
  private readonly startedAt: number;
  /** When the log last took a heartbeat. */
  private writtenAt: number | undefined;

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
    this.writtenAt = this.now();
    this.timer = setInterval(() => this.beat(), this.intervalMs);
    this.timer.unref();
  }

  /**
   * Why the gateway should not be sent clients: the log has taken no heartbeat for two
   * intervals (it is unreachable, or too slow for sends to be answered), so the users actor
   * will soon count this gateway's sessions offline. Undefined while it beats.
   */
  get silentBecause(): string | undefined {
    if (this.writtenAt === undefined) return 'no heartbeat written yet';
    const silentMs = this.now() - this.writtenAt;
    return silentMs > 2 * this.intervalMs
      ? `the log has taken no heartbeat of this gateway for ${Math.round(silentMs / 1000)} s`
      : undefined;
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
        () => void (this.writtenAt = this.now()),
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
