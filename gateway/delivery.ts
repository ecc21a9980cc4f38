/**
 * The delivery consumer: reads `chat.deliveries.<gatewayId>`, where the users actor puts what
 * the connections of this gateway must get (inbox entries, typing), and writes each frame to
 * the connections it targets.
 *
 * It starts at the end of the topic and commits nothing: a delivery is for a connection of
 * this run, and connections do not survive a restart (their devices get the entries again
 * after `ready`, from the inbox). Within a run it skips nothing: through a rebalance (a broker
 * restart makes one) the log port keeps its place.
 */
import type { Batch, Consumer, Log, LogRecord } from '../log/port.ts';
import { DecodeError, type TopicCodec } from '../schemas/codec.ts';
import { deliveriesTopic } from '../schemas/topics.ts';
import type { Delivery } from '../schemas/types.generated.ts';
import type { Logger } from '../observability/logger.ts';
import { deliveryFrame, serialize } from './frames.ts';
import type { Connection } from './connection.ts';
import type { GatewayInstruments } from './metrics.ts';
import { DELIVERIES_RETENTION_MS, DELIVERIES_SEGMENT_MS } from './limits.ts';

export interface DeliveryConsumerOptions {
  log: Log;
  gatewayId: string;
  /** The partition count of the topic when this gateway creates it. */
  partitions: number;
  codec: TopicCodec<Delivery>;
  /** The open connection with this id, if this gateway holds it. */
  connection(connectionId: string): Connection | undefined;
  logger: Logger;
  instruments: GatewayInstruments;
}

export class DeliveryConsumer {
  readonly topic: string;
  readonly groupId: string;
  private consumer: Consumer | undefined;

  constructor(private readonly options: DeliveryConsumerOptions) {
    this.topic = deliveriesTopic(options.gatewayId);
    this.groupId = `gateway-${options.gatewayId}`;
  }

  /** Resolves once the consumer holds its partitions: every later delivery reaches it. */
  async start(): Promise<void> {
    const { log, partitions } = this.options;
    const retention = {
      'retention.ms': String(DELIVERIES_RETENTION_MS),
      'segment.ms': String(DELIVERIES_SEGMENT_MS),
    };
    await log.admin.createTopics([{ topic: this.topic, partitions, config: retention }]);
    // A topic an earlier version created kept seven days.
    const described = await log.admin.describeTopic(this.topic);
    if (described && described.retentionMs !== DELIVERIES_RETENTION_MS)
      await log.admin.setRetention(this.topic, DELIVERIES_RETENTION_MS, DELIVERIES_SEGMENT_MS);
    const consumer = log.consumer({ groupId: this.groupId, startFrom: 'latest' });
    this.consumer = consumer;
    let assigned!: () => void;
    const firstAssignment = new Promise<void>((resolve) => (assigned = resolve));
    await consumer.subscribe([this.topic]);
    await consumer.run({
      onAssignment: () => assigned(),
      eachBatch: (batch) => this.deliver(batch),
    });
    await firstAssignment;
  }

  async close(): Promise<void> {
    await this.consumer?.close();
  }

  /**
   * Writes each record's frame to its targets. A record that does not decode is skipped; any
   * other failure (the registry unreachable) throws, and the batch is handed again. Every record
   * of the batch is decoded before any is written: a failure midway then writes nothing, and
   * the batch handed again writes each entry once (decoding and writing record by record wrote
   * the entries before the failure again, and a connection saw seqs go back: 1, 2, 1, 2, 3).
   */
  private async deliver(batch: Batch): Promise<void> {
    const ready: Ready[] = [];
    for (const record of batch.records) {
      const decoded = await this.prepare(record, batch.partition);
      if (decoded !== undefined) ready.push(decoded);
    }
    for (const each of ready) this.write(each);
  }

  /** A record's delivery and frame text, or undefined when it is skipped. */
  private async prepare(record: LogRecord, partition: number): Promise<Ready | undefined> {
    const { codec, instruments, logger } = this.options;
    if (record.value === null) return undefined;
    let delivery: Delivery;
    try {
      delivery = await codec.decode(record.value);
    } catch (error) {
      if (!(error instanceof DecodeError)) throw error;
      logger.error(
        { err: error, partition, offset: record.offset },
        'delivery does not decode; skipped',
      );
      instruments.deliverySkipped('undecodable');
      return undefined;
    }
    // The end of a replay part: the connection asks for the next once it has taken this one.
    const partEnd =
      delivery.more && 'chat.v1.InboxEntry' in delivery.frame
        ? delivery.frame['chat.v1.InboxEntry'].seq
        : undefined;
    let text: string | undefined;
    try {
      text = serialize(deliveryFrame(delivery.frame));
    } catch (error) {
      // Skipped like an undecodable record: handing the batch again would fail the same way.
      logger.error(
        { err: error, partition, offset: record.offset },
        'delivery cannot be written as a frame; skipped',
      );
      instruments.deliverySkipped('unwritable');
      // But a replay goes on past it: else its session would wait for the next part for good.
      if (partEnd === undefined) return undefined;
    }
    return { delivery, text, partEnd, timestamp: record.timestamp };
  }

  private write({ delivery, text, partEnd, timestamp }: Ready): void {
    const { instruments, logger } = this.options;
    instruments.deliveryLatency(Math.max(0, Date.now() - timestamp) / 1000);
    for (const target of delivery.targets) {
      const connection = this.options.connection(target.connectionId);
      if (connection === undefined) {
        instruments.deliverySkipped('unknown_connection');
        continue;
      }
      if (connection.userId !== delivery.userId) {
        logger.warn(
          { connectionId: target.connectionId, userId: delivery.userId },
          'delivery targets a connection of another user; skipped',
        );
        instruments.deliverySkipped('other_user');
        continue;
      }
      connection.deliver(text, partEnd);
      if (text !== undefined) instruments.delivered();
    }
  }
}

/** A decoded delivery, ready to be written. */
interface Ready {
  delivery: Delivery;
  /** Undefined for a replay part's end that cannot be written (the part still ends there). */
  text: string | undefined;
  partEnd: number | undefined;
  timestamp: number;
}
