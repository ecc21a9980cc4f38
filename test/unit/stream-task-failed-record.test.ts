/**
 * A record whose processing fails after it has already written to a store and forwarded an
 * output must leave nothing behind (README, the runtime: "processes records one at a time, each
 * under a savepoint"): not its store writes, not its outputs. The runtime suite only
 * dead-letters a record that fails to *decode*, before any write or output, so it cannot tell.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import type { LogRecord } from '../../log/port.ts';
import { silentLogger } from '../../observability/logger.ts';
import { RetriableError } from '../../processors/runtime/errors.ts';
import { StreamTask, type TaskStateStore } from '../../processors/runtime/task.ts';
import {
  Topology,
  type Processor,
  type ProcessorContext,
  type Record as StreamRecord,
} from '../../processors/runtime/topology.ts';
import { StateDb } from '../../state/state-db.ts';
import { jsonSerde, type KeyValueStore } from '../../state/store.ts';
import { TaskStore } from '../../state/task-store.ts';

const INPUT = 'words';
const OUTPUT = 'counts';
const DEAD = 'count-dead-letters';

/** Counts per key; 'boom' fails after its write and its output, 'flaky' does so retriably once. */
class CountThenFail implements Processor<string, number> {
  private context!: ProcessorContext<number>;
  private counts!: KeyValueStore<number>;
  private flakyFailures = 0;
  init(context: ProcessorContext<number>): void {
    this.context = context;
    this.counts = context.getStateStore<number>('counts');
  }
  async process(record: StreamRecord<string>): Promise<void> {
    const count = ((await this.counts.get(record.key)) ?? 0) + 1;
    this.counts.put(record.key, count);
    await this.context.forward({ ...record, value: count });
    if (record.value === 'boom') throw new Error('cannot handle boom');
    if (record.value === 'flaky' && this.flakyFailures++ === 0)
      throw new RetriableError('briefly unavailable');
  }
}

describe('stream task: a record that fails after writing and forwarding', () => {
  let dir: string;
  let db: StateDb;
  let task: StreamTask;
  let store: TaskStore<number>;

  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'kchat-task-'));
    db = await StateDb.open(dir);
    store = new TaskStore<number>('count-counts-changelog', 0, db, jsonSerde());
    const topology = new Topology()
      .addSource('input', { topics: [INPUT], decode: (v) => v?.toString('utf8') ?? '' })
      .addProcessor('count', () => new CountThenFail(), 'input')
      .addStateStore({ name: 'counts' }, 'count')
      .addSink('output', { topic: OUTPUT, encode: (n: number) => Buffer.from(String(n)) }, 'count');
    task = new StreamTask({
      applicationId: 'count',
      partition: 0,
      topology,
      stores: new Map([['counts', store as unknown as TaskStateStore]]),
      deadLetterTopic: DEAD,
      logger: silentLogger,
    });
    await task.init();
  });
  afterEach(async () => {
    await task.close();
    await db.close();
    await rm(dir, { recursive: true, force: true });
  });

  const record = (offset: number, value: string): LogRecord => ({
    topic: INPUT,
    partition: 0,
    offset,
    key: Buffer.from('k'),
    value: Buffer.from(value),
    headers: {},
    timestamp: 0,
  });
  const outputs = () =>
    task.outputs.map((o) => `${o.topic}:${o.value?.toString('utf8') ?? 'null'}`);

  it('dead-letters it and keeps neither its output nor its store write', async () => {
    assert.equal(await task.process(record(0, 'a')), 'processed');
    assert.equal(await task.process(record(1, 'boom')), 'dead-lettered');
    assert.equal(await task.process(record(2, 'b')), 'processed');
    assert.deepEqual(outputs(), [`${OUTPUT}:1`, `${DEAD}:boom`, `${OUTPUT}:2`]);
    assert.equal(await store.get('k'), 2, 'the failed record counted nothing');
    assert.deepEqual(
      store.writes().map((w) => [w.key, w.value?.toString('utf8')]),
      [['k', '2']],
    );
  });

  it('retries a retriable failure with nothing of the failed try kept', async () => {
    assert.equal(await task.process(record(0, 'a')), 'processed');
    await assert.rejects(task.process(record(1, 'flaky')), RetriableError);
    assert.equal(await task.process(record(1, 'flaky')), 'processed');
    assert.deepEqual(outputs(), [`${OUTPUT}:1`, `${OUTPUT}:2`]);
    assert.equal(await store.get('k'), 2);
  });
});
