/**
 * The gateway's Prometheus instruments: open connections, client frames by type, error frames
 * by code, send buffers over their limit and slow consumers closed, deliveries written and
 * skipped and how long after the users actor wrote them they went out, replay parts asked
 * for, acks held over their rate. Without a Metrics registry (tests, tools) they count nothing.
 */
import { LATENCY_BUCKETS, type Metrics } from '../observability/metrics.ts';
import type { ErrorCode } from './frames.ts';

export interface GatewayInstruments {
  /** A client frame arrived: its type, or `invalid` when it has none we know. */
  frameReceived(type: string): void;
  errorSent(code: ErrorCode): void;
  /** A connection's send buffer went over its limit: a burst, or a client that does not read. */
  sendBufferOverLimit(): void;
  slowConsumerClosed(): void;
  /** A Delivery frame was written to one connection. */
  delivered(): void;
  /** A delivery record is being written out, this long after the users actor wrote it. */
  deliveryLatency(seconds: number): void;
  /** A Delivery target this gateway does not hold (closed meanwhile, or never here). */
  deliverySkipped(reason: 'unknown_connection' | 'other_user' | 'undecodable' | 'unwritable'): void;
  heartbeatFailed(): void;
  /** A connection asked for the next part of its replay. */
  replayPartAsked(): void;
  /** An ack over ACK_RATE_PER_S was held, to be merged with the acks after it. */
  ackHeld(): void;
}

export const noInstruments: GatewayInstruments = {
  frameReceived() {},
  errorSent() {},
  sendBufferOverLimit() {},
  slowConsumerClosed() {},
  delivered() {},
  deliveryLatency() {},
  deliverySkipped() {},
  heartbeatFailed() {},
  replayPartAsked() {},
  ackHeld() {},
};

export function gatewayInstruments(
  metrics: Metrics | undefined,
  connectionCount: () => number,
): GatewayInstruments {
  if (!metrics) return noInstruments;
  metrics.gauge('kchat_gateway_connections', 'Open WebSocket connections', (g) =>
    g.set(connectionCount()),
  );
  const frames = metrics.counter('kchat_gateway_frames_total', 'Client frames received', ['type']);
  const errors = metrics.counter('kchat_gateway_errors_total', 'Error frames sent', ['code']);
  const over = metrics.counter(
    'kchat_gateway_send_buffer_over_limit_total',
    "Times a connection's send buffer went over its limit (a burst, or a client that does not read)",
  );
  const slow = metrics.counter(
    'kchat_gateway_slow_consumers_total',
    'Connections closed because the client did not read its frames',
  );
  const delivered = metrics.counter(
    'kchat_gateway_deliveries_total',
    'Delivery frames written to a connection',
  );
  const latency = metrics.histogram(
    'kchat_gateway_delivery_latency_seconds',
    "From a delivery's timestamp (the users actor stamps it as it writes it) to its frame being written to its connections",
    LATENCY_BUCKETS,
  );
  const skipped = metrics.counter(
    'kchat_gateway_deliveries_skipped_total',
    'Delivery targets not written: unknown connection, another user, undecodable record',
    ['reason'],
  );
  const heartbeats = metrics.counter(
    'kchat_gateway_heartbeat_failures_total',
    'GatewayHeartbeat records the log refused',
  );
  const parts = metrics.counter(
    'kchat_gateway_replay_parts_asked_total',
    'Continued Syncs: connections that took a replay part and asked for the next',
  );
  const acksHeld = metrics.counter(
    'kchat_gateway_acks_held_total',
    'Acks over the per-connection ack rate, held and merged with the acks after them',
  );
  return {
    frameReceived: (type) => frames.inc({ type }),
    errorSent: (code) => errors.inc({ code }),
    sendBufferOverLimit: () => over.inc(),
    slowConsumerClosed: () => slow.inc(),
    delivered: () => delivered.inc(),
    deliveryLatency: (seconds) => latency.observe(seconds),
    deliverySkipped: (reason) => skipped.inc({ reason }),
    heartbeatFailed: () => heartbeats.inc(),
    replayPartAsked: () => parts.inc(),
    ackHeld: () => acksHeld.inc(),
  };
}
