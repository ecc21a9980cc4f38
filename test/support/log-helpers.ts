import { randomUUID } from 'node:crypto';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import type {
  Consumer,
  Log,
  LogRecord,
  ProducerRecord,
  RecordMetadata,
  TopicPartition,
} from '../../log/port.ts';

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

/** The log, whose producers' sends go through `wrap` (to hold, fail or watch them). */
export function wrappingSends<L extends Log>(
  log: L,
  wrap: (
    records: ProducerRecord[],
    send: (records: ProducerRecord[]) => Promise<RecordMetadata[]>,
  ) => Promise<RecordMetadata[]>,
): L {
  return new Proxy(log, {
    get(target, property) {
      if (property !== 'producer') return Reflect.get(target, property, target) as unknown;
      return async (...args: Parameters<L['producer']>) => {
        const producer = await target.producer(...args);
        return new Proxy(producer, {
          get(inner, name) {
            if (name !== 'send') return Reflect.get(inner, name, inner) as unknown;
            return (records: ProducerRecord[]) => wrap(records, (r) => inner.send(r));
          },
        });
      };
    },
  });
}

/** Runs `run` on an embedded log of a fresh directory (no periodic cleaner), then removes both. */
export async function withEmbeddedLog<T>(
  run: (log: EmbeddedLog, dir: string) => Promise<T>,
): Promise<T> {
  const dir = await mkdtemp(join(tmpdir(), 'kchat-log-'));
  const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
  try {
    return await run(log, dir);
  } finally {
    await log.close();
    await rm(dir, { recursive: true, force: true });
  }
}
