import { randomUUID } from 'node:crypto';
import type { Consumer, Log, LogRecord, TopicPartition } from '../../log/port.ts';

export const uniqueName = (prefix: string) => `${prefix}-${randomUUID().slice(0, 8)}`;

/** Polls `check` until it returns true, or fails after `timeoutMs`. */
export async function eventually(
  check: () => boolean | Promise<boolean>,
  timeoutMs: number,
  what: string,
): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await check())) {
    if (Date.now() > deadline)
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

export interface Collector {
  consumer: Consumer;
  records: LogRecord[];
  assignments: TopicPartition[][];
  stop(): Promise<void>;
}

/** A running group member that collects every record handed to it. */
export async function collect(
  log: Log,
  groupId: string,
  topics: string[],
  options: { commit?: boolean } = {},
): Promise<Collector> {
  const consumer = log.consumer({ groupId, startFrom: 'earliest' });
  const records: LogRecord[] = [];
  const assignments: TopicPartition[][] = [];
  await consumer.subscribe(topics);
  await consumer.run({
    onAssignment: (assignment) => {
      assignments.push(assignment);
    },
    eachBatch: async (batch) => {
      records.push(...batch.records);
      if (options.commit) {
        const last = batch.records[batch.records.length - 1]!;
        await consumer.commit([
          { topic: batch.topic, partition: batch.partition, offset: last.offset + 1 },
        ]);
      }
    },
  });
  return { consumer, records, assignments, stop: () => consumer.close() };
}

export const text = (b: Buffer | null) => (b === null ? null : b.toString('utf8'));
