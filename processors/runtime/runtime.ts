/**
 * The stream-processing runtime (Kafka Streams' `KafkaStreams`): runs a topology as one member
 * of the consumer group named by its application id, one task per partition number it is
 * assigned.
 *
 * Exactly-once (the default): each task has a transactional producer whose id is the task id;
 * every commit interval, the task's outputs, its changelog records and its input offsets commit
 * in one transaction (one atomic batch on the embedded log). When a task moves, its new owner
 * first creates that producer, which fences the old owner, and only then reads the committed
 * offsets: whatever the old owner commits after that fails, whatever it committed before is
 * seen. Store writes reach RocksDB only after their transaction commits.
 *
 * At-least-once (for comparison): one plain producer; outputs are sent, then offsets committed.
 */
import type { Batch, Log, Producer, TopicPartition } from '../../log/port.ts';
import { ProducerFencedError } from '../../log/errors.ts';
import { StateDb, type Checkpoint } from '../../state/state-db.ts';
import { TaskStore } from '../../state/task-store.ts';
import { jsonSerde } from '../../state/store.ts';
import { silentLogger, type Logger } from '../../observability/logger.ts';
import { LATENCY_BUCKETS, type Metrics } from '../../observability/metrics.ts';
import type { Topology } from './topology.ts';
import { StreamTask, type TaskStateStore } from './task.ts';
import { CoPartitioningError, RetriableError, StreamsError } from './errors.ts';

export type ProcessingGuarantee = 'exactly_once' | 'at_least_once';

export interface StreamsOptions {
  applicationId: string;
  log: Log;
  /** Shared by every runtime of the process: one RocksDB database, keys prefixed per store. */
  stateDb: StateDb;
  guarantee?: ProcessingGuarantee;
  /**
   * How often tasks commit; the latency of every output. Default 100 ms. 0: commit as soon as
   * the records at hand are processed (adaptive group commit): one commit at a time, and what
   * arrives while it runs goes into the next one. Latency is then about one commit's duration
   * when idle, and batches grow with the load.
   */
  commitIntervalMs?: number;
  /** A task commits early once it has processed this many records. Default 1000. */
  maxUncommittedRecords?: number;
  /**
   * How long after a task was fenced it is opened again if its partition is still this
   * instance's (see commit). Default FENCED_RECHECK_MS.
   */
  fencedRecheckMs?: number;
  /**
   * How long a local checkpoint is trusted when its changelog holds records after it; an older
   * one restores the store from the start (see recent). Default CHECKPOINT_TRUST_MS.
   */
  checkpointTrustMs?: number;
  logger?: Logger;
  metrics?: Metrics;
  /**
   * Called at each stage of a task's commit: crash tests kill the process at a chosen stage to
   * prove that no stage loses or repeats anything.
   */
  onCommitStage?: (stage: CommitStage, taskId: string) => void;
}

/**
 * - `sent`: outputs and changelog records are sent, offsets not yet committed
 * - `committed`: the transaction (or the offset commit) is done, RocksDB not yet written
 * - `flushed`: the store writes are in RocksDB
 */
export type CommitStage = 'sent' | 'committed' | 'flushed';

const PUNCTUATE_TICK_MS = 50;
/**
 * A fenced task is dropped and left to the instance that fenced it; if the group still gives
 * its partition to this instance this long after, that instance opened it in a generation this
 * one missed (evicted for a while, say) and has let it go since: it is opened here again, or
 * its records would wait for good. Long enough for a rebalance under way to reach this
 * instance (kafkajs heartbeats every second) and take the partition away instead.
 */
const FENCED_RECHECK_MS = 10_000;
/**
 * How long a checkpoint is trusted when the changelog holds records after it: half of Kafka's
 * default `delete.retention.ms` (the changelogs are made with the broker's default).
 */
const CHECKPOINT_TRUST_MS = 12 * 60 * 60 * 1000;
/**
 * How often a running task's checkpoints are said to be current again (touchCheckpoints); at
 * least four times within the trust.
 */
const CHECKPOINT_TOUCH_MS = 10 * 60 * 1000;
/**
 * A transactional commit that has not ended by then counts as failed, and the task is revived:
 * a client's transaction calls can wait forever on a broker that went away (KAFKA-7763 gave the
 * Java client its timeouts for this); the revived task's new producer ends the transaction.
 */
const COMMIT_TIMEOUT_MS = 20_000;

async function withinTime<T>(ms: number, what: string, work: () => Promise<T>): Promise<T> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} took more than ${ms} ms`)), ms);
  });
  try {
    return await Promise.race([work(), timeout]);
  } finally {
    clearTimeout(timer);
  }
}
const RESTORE_PROGRESS_MS = 1000;

export const changelogTopic = (applicationId: string, store: string) =>
  `${applicationId}-${store}-changelog`;
export const deadLetterTopic = (applicationId: string) => `${applicationId}-dead-letters`;

/**
 * How long a topic chosen per record and found missing counts as missing without asking again:
 * a burst of records for it costs one question, and a topic created meanwhile (a gateway
 * starting) is seen within this.
 */
const MISSING_TOPIC_RECHECK_MS = 2_000;

interface RunningTask {
  task: StreamTask;
  stores: Map<string, TaskStore<unknown>>;
  producer: Producer | undefined;
  /** When its stores' checkpoints were last said to be current (see touchCheckpoints). */
  checkpointsTouchedAt: number;
}

export class StreamsRuntime {
  private readonly tasks = new Map<number, RunningTask>();
  private closed: Promise<void> | undefined;
  private readonly guarantee: ProcessingGuarantee;
  private readonly logger: Logger;
  private consumer: ReturnType<Log['consumer']> | undefined;
  private sharedProducer: Producer | undefined;
  private timers: NodeJS.Timeout[] = [];
  /** Timers of tasks waiting to be opened again after a failed commit. */
  private readonly revivals = new Set<NodeJS.Timeout>();
  /** Per partition, how many times its task was revived: batches carry the count they met. */
  private readonly revisions = new Map<number, number>();
  private lock: Promise<unknown> = Promise.resolve();
  private closing = false;
  private commitQueued = false;
  private assigning = false;
  /** Tasks whose last commit failed, with why. */
  private readonly failingCommits = new Map<string, string>();
  private everAssigned = false;
  private partitions = 0;
  private readonly counters;
  /** Topics chosen per record that were found to exist (a topic is not deleted under a task). */
  private readonly existingTopics = new Set<string>();
  /** Topics chosen per record that were found missing, with when. */
  private readonly missingTopics = new Map<string, number>();

  constructor(
    private readonly topology: Topology,
    private readonly options: StreamsOptions,
  ) {
    this.guarantee = options.guarantee ?? 'exactly_once';
    this.logger = (options.logger ?? silentLogger).child({ application: options.applicationId });
    const m = options.metrics;
    const labels = ['application'];
    this.counters = m && {
      processed: m.counter(
        'kchat_streams_records_processed_total',
        'Records processed by stream tasks',
        labels,
      ),
      deadLettered: m.counter(
        'kchat_streams_dead_letters_total',
        'Records sent to the dead-letter topic',
        labels,
      ),
      commits: m.counter('kchat_streams_commits_total', 'Task commits', labels),
      undecodableState: m.counter(
        'kchat_streams_undecodable_state_total',
        'Stored values a scan could not decode and left out (a corrupt changelog record)',
        labels,
      ),
      restored: m.counter(
        'kchat_streams_records_restored_total',
        'Changelog records restored into stores',
        labels,
      ),
      commitSeconds: m.histogram(
        'kchat_streams_commit_seconds',
        'Time to commit a task',
        [0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1],
        labels,
      ),
      recordLatency: m.histogram(
        'kchat_streams_record_latency_seconds',
        "From a record's timestamp to its processing: a gateway's records are stamped as it writes them, a processor's outputs with its input's or, as the users actor does, as it writes them",
        LATENCY_BUCKETS,
        labels,
      ),
    };
  }

  get applicationId(): string {
    return this.options.applicationId;
  }

  /**
   * Why this instance is not processing yet (undefined once it is): it has not been given its
   * tasks yet, or it is opening them (restoring their stores). For readiness probes.
   */
  get notRunningBecause(): string | undefined {
    if (!this.everAssigned) return `${this.applicationId}: waiting for its tasks`;
    if (this.assigning) return `${this.applicationId}: restoring its tasks`;
    for (const [task, reason] of this.failingCommits)
      return `${this.applicationId}: task ${task} cannot commit: ${reason}`;
    // An idle task makes no request: without this, a processor cut off from Kafka stayed ready.
    const outOfGroup = this.consumer?.outOfGroupBecause();
    if (outOfGroup) return `${this.applicationId}: ${outOfGroup}`;
    return undefined;
  }

  /** Partition numbers of the tasks this instance runs now. */
  activeTasks(): number[] {
    return [...this.tasks.keys()].sort((a, b) => a - b);
  }

  async start(): Promise<void> {
    const { log, applicationId } = this.options;
    const sources = this.topology.sourceTopics();
    const counts = await Promise.all(
      sources.map(async (topic) => {
        const description = await log.admin.describeTopic(topic);
        if (!description)
          throw new StreamsError(`source topic "${topic}" of ${applicationId} does not exist`);
        return { topic, partitions: description.partitions };
      }),
    );
    if (new Set(counts.map((c) => c.partitions)).size > 1) throw new CoPartitioningError(counts);
    this.partitions = counts[0]!.partitions;
    await log.admin.createTopics([
      ...[...this.topology.stores.keys()].map((store) => ({
        topic: changelogTopic(applicationId, store),
        partitions: this.partitions,
        config: { 'cleanup.policy': 'compact' as const },
      })),
      {
        topic: deadLetterTopic(applicationId),
        partitions: this.partitions,
        config: { 'retention.ms': '-1' },
      },
    ]);
    if (this.guarantee === 'at_least_once') this.sharedProducer = await log.producer();
    const consumer = log.consumer({ groupId: applicationId });
    this.consumer = consumer;
    await consumer.subscribe(sources);
    await consumer.run({
      onAssignment: (assignment) => this.exclusive(() => this.assigned(assignment)),
      eachBatch: async (batch) => {
        const revision = this.revisions.get(batch.partition) ?? 0;
        await this.exclusive(() => this.handle(batch, revision));
        if (this.eager) this.commitSoon();
      },
    });
    // With eager commits too: what a failed commit left is committed on the next tick.
    const interval = this.options.commitIntervalMs || 100;
    this.timers.push(
      setInterval(
        () => void this.exclusive(() => this.commitAll()).catch(() => undefined),
        interval,
      ),
    );
    this.timers.push(
      setInterval(
        () => void this.exclusive(() => this.punctuateAll()).catch(() => undefined),
        PUNCTUATE_TICK_MS,
      ),
    );
    this.logger.info(
      { sources, partitions: this.partitions, guarantee: this.guarantee },
      'stream processing started',
    );
  }

  /**
   * Commits every task, writes checkpoints and leaves the group, so others take over at once. A
   * second call gets the first one's promise: whoever closes the log after it must not find
   * tasks still closing.
   */
  close(): Promise<void> {
    this.closed ??= this.closeTasks();
    return this.closed;
  }

  private async closeTasks(): Promise<void> {
    this.closing = true;
    for (const timer of this.timers) clearInterval(timer);
    for (const timer of this.revivals) clearTimeout(timer);
    await this.exclusive(async () => {
      for (const running of [...this.tasks.values()]) await this.closeTask(running);
    });
    await this.consumer?.close();
    await this.sharedProducer?.close();
    this.logger.info('stream processing stopped');
  }

  private get eager(): boolean {
    return this.options.commitIntervalMs === 0;
  }

  /**
   * With eager commits: one commit, queued behind the batches already waiting, so that it takes
   * them all. Batches arriving while it runs wait for it and go into the next one.
   */
  private commitSoon(): void {
    if (this.commitQueued) return;
    this.commitQueued = true;
    setImmediate(() => {
      void this.exclusive(() => {
        this.commitQueued = false;
        return this.commitAll();
      }).catch(() => undefined);
    });
  }

  /** Everything that touches tasks runs one at a time: batches, commits, punctuators, rebalances. */
  private exclusive<T>(work: () => Promise<T>): Promise<T> {
    const result = this.lock.then(work);
    this.lock = result.catch(() => undefined);
    return result;
  }

  private async assigned(assignment: TopicPartition[]): Promise<void> {
    if (this.closing) return;
    this.assigning = true;
    try {
      const wanted = new Set(assignment.map((tp) => tp.partition));
      for (const [partition, running] of [...this.tasks]) {
        if (wanted.has(partition)) continue;
        try {
          await this.closeTask(running);
        } catch (error) {
          // Closed without a checkpoint (its store restores from the one it had): the tasks of
          // this assignment must still be opened, or their partitions would wait for good.
          this.tasks.delete(partition);
          this.logger.error({ err: error, task: running.task.id }, 'task not closed cleanly');
          await running.producer?.close().catch(() => undefined);
        }
      }
      for (const partition of [...wanted].sort((a, b) => a - b)) {
        if (this.tasks.has(partition)) continue;
        // Given away by a rebalance since this assignment came (on Kafka the next one is already
        // queued): opening it now would fence the member that has it.
        if (!this.owns(partition)) continue;
        try {
          await this.openTask(partition);
        } catch (error) {
          // A restore cut short (the broker restarting): open it again as soon as the log lets,
          // from the committed offsets, or this partition's records would be passed over.
          const taskId = `${this.applicationId}_${partition}`;
          this.failingCommits.set(taskId, `not opened: ${(error as Error).message}`);
          this.logger.error({ err: error, task: taskId }, 'task not opened; trying again');
          this.revive(partition, taskId);
        }
      }
      this.everAssigned = true;
    } finally {
      this.assigning = false;
    }
    this.logger.info({ tasks: this.activeTasks() }, 'tasks assigned');
  }

  /** Opens the task of a partition; answers the committed offset of each source topic (-1: none). */
  private async openTask(partition: number): Promise<Map<string, number>> {
    const { log, applicationId, stateDb } = this.options;
    // Fence first: from here on, a previous owner of this task can commit nothing.
    const producer =
      this.guarantee === 'exactly_once'
        ? await log.producer({ transactionalId: `${applicationId}-${partition}` })
        : undefined;
    try {
      const stores = new Map<string, TaskStore<unknown>>();
      for (const [name, spec] of this.topology.stores) {
        const topic = changelogTopic(applicationId, name);
        const store = new TaskStore(topic, partition, stateDb, spec.serde ?? jsonSerde(), {
          onUndecodable: (key, error) => {
            this.counters?.undecodableState.inc({ application: applicationId });
            this.logger.error(
              { err: error, store: name, partition, key },
              'a stored value does not decode; left out of a scan (its changelog record was not written by this topology)',
            );
          },
        });
        stores.set(name, store);
      }
      // Side by side: each store's share of the database is its own, and on Kafka each read of
      // a changelog starts a consumer of its own (a second or so to join), which a task of four
      // stores paid four times in a row at every rebalance. All of them end before a failure
      // is thrown: a restore still running would race the next try's restore of the same store.
      const restored = await Promise.allSettled(
        [...stores.values()].map((store) => this.restore(store)),
      );
      for (const outcome of restored) if (outcome.status === 'rejected') throw outcome.reason;
      const task = new StreamTask({
        applicationId,
        partition,
        topology: this.topology,
        stores: stores as unknown as Map<string, TaskStateStore>,
        deadLetterTopic: deadLetterTopic(applicationId),
        logger: this.logger,
        topicExists: this.topicExists,
        onUnknownTopic: () => this.counters?.deadLettered.inc({ application: this.applicationId }),
        partitions: this.partitions,
      });
      // Then read the committed offsets, which no fenced owner can move any more. The consumer
      // may have read its start before the fence; the task skips whatever lies below these.
      const positions = new Map<string, number>();
      for (const topic of new Set(this.topology.sourceTopics())) {
        const committed =
          (await log.admin.committedOffsets(applicationId, topic))[partition]?.offset ?? -1;
        if (committed >= 0) task.setPosition(topic, committed);
        positions.set(topic, committed);
      }
      await task.init();
      this.tasks.set(partition, { task, stores, producer, checkpointsTouchedAt: Date.now() });
      // Open again, whichever way (a revival, a rebalance): whatever kept it from running is over.
      this.failingCommits.delete(task.id);
      return positions;
    } catch (error) {
      await producer?.close().catch(() => undefined);
      throw error;
    }
  }

  /**
   * Brings a store's share up to the end of its changelog partition: from the local checkpoint
   * when there is one, from the start when the local state was lost or does not belong to this
   * changelog. Nothing is processed before it is done.
   */
  private async restore(store: TaskStore<unknown>): Promise<void> {
    const { log, stateDb } = this.options;
    const topic = store.name;
    const partition = store.partition;
    const marks = (await log.admin.watermarks(topic))[partition]!;
    const checkpoint = await stateDb.checkpoint(topic, partition);
    let from = checkpoint?.offset ?? 0;
    const reason =
      checkpoint === undefined
        ? undefined
        : checkpoint.offset > marks.high
          ? 'checkpoint past the changelog end'
          : checkpoint.offset < marks.high && !this.recent(checkpoint)
            ? 'checkpoint older than the changelog keeps tombstones'
            : undefined;
    if (checkpoint === undefined || reason) {
      if (reason) this.logger.info({ store: topic, partition, reason }, 'local state dropped');
      await stateDb.drop(topic, partition);
      from = 0;
    }
    const total = marks.high - from;
    if (total > 0) {
      const started = Date.now();
      let restored = 0;
      let lastReport = started;
      for await (const batch of log.readPartitions(topic, [{ partition, from }])) {
        const last = batch.records[batch.records.length - 1]!;
        await stateDb.write(
          topic,
          partition,
          batch.records.map((r) => ({ key: r.key?.toString('utf8') ?? '', value: r.value })),
          last.offset + 1,
        );
        restored += batch.records.length;
        this.counters?.restored.inc({ application: this.applicationId }, batch.records.length);
        if (Date.now() - lastReport > RESTORE_PROGRESS_MS) {
          lastReport = Date.now();
          const seconds = (lastReport - started) / 1000;
          this.logger.info(
            {
              store: topic,
              partition,
              records: restored,
              recordsPerSecond: Math.round(restored / seconds),
              remaining: marks.high - last.offset - 1,
            },
            'restoring',
          );
        }
      }
      this.logger.info(
        { store: topic, partition, records: restored, ms: Date.now() - started },
        'restored',
      );
    }
    await stateDb.setCheckpoint(topic, partition, marks.high);
  }

  /**
   * Whether the changelog still holds every delete written since the checkpoint. A compacted
   * topic drops a tombstone once it is older than `delete.retention.ms` (a day by default):
   * local state checkpointed before that, while another instance owned the task and deleted
   * keys, would keep those keys for good if restored from the checkpoint. Kafka Streams guards
   * the same with `state.cleanup.delay.ms`. A checkpoint from before its time was kept counts as
   * old.
   */
  private recent(checkpoint: Checkpoint): boolean {
    return (
      checkpoint.writtenAt !== undefined &&
      Date.now() - checkpoint.writtenAt <= this.checkpointTrustMs
    );
  }

  private get checkpointTrustMs(): number {
    return this.options.checkpointTrustMs ?? CHECKPOINT_TRUST_MS;
  }

  /**
   * Whether a topic a sink chose exists: asked of the log, then remembered (a topic found
   * missing, for MISSING_TOPIC_RECHECK_MS). A failed question is retried with the record: it
   * says nothing about the record, which must not go to the dead-letter topic for it.
   */
  private readonly topicExists = (topic: string): boolean | Promise<boolean> => {
    if (this.existingTopics.has(topic)) return true;
    const missingSince = this.missingTopics.get(topic);
    if (missingSince !== undefined && Date.now() - missingSince < MISSING_TOPIC_RECHECK_MS)
      return false;
    return this.options.log.admin.describeTopic(topic).then(
      (found) => {
        if (found) this.existingTopics.add(topic);
        else this.missingTopics.set(topic, Date.now());
        if (this.missingTopics.size > 1000) this.missingTopics.clear();
        return found !== undefined;
      },
      (error: unknown) => {
        throw new RetriableError(`could not tell whether topic "${topic}" exists`, {
          cause: error,
        });
      },
    );
  };

  private async handle(batch: Batch, revision: number): Promise<void> {
    if (this.closing) return; // not committed: the next owner processes these records
    // Handed before its task was revived: read again from the committed offsets instead.
    if ((this.revisions.get(batch.partition) ?? 0) !== revision) return;
    const running = this.tasks.get(batch.partition);
    if (!running) return; // fenced and dropped; the coming rebalance moves the partition
    let processed = 0;
    const latency = this.counters?.recordLatency.labels({ application: this.applicationId });
    for (const record of batch.records) {
      latency?.observe(Math.max(0, Date.now() - record.timestamp) / 1000);
      const outcome = await running.task.process(record);
      if (outcome === 'skipped') continue;
      processed++;
      if (outcome === 'dead-lettered')
        this.counters?.deadLettered.inc({ application: this.applicationId });
    }
    this.counters?.processed.inc({ application: this.applicationId }, processed);
    if (running.task.uncommitted >= (this.options.maxUncommittedRecords ?? 1000))
      await this.commit(running);
  }

  /**
   * Tasks commit side by side: on Kafka each has its own transactional producer, so twelve
   * transactions cost about one's round trips; on the embedded log they share one write batch.
   */
  private async commitAll(): Promise<void> {
    await Promise.all([...this.tasks.values()].map((running) => this.commit(running)));
  }

  private async punctuateAll(): Promise<void> {
    if (this.closing) return;
    const now = Date.now();
    for (const running of this.tasks.values()) await running.task.punctuate(now);
  }

  /** Commits one task's work; false when the task was fenced and dropped. */
  private async commit(running: RunningTask): Promise<boolean> {
    const { task, stores } = running;
    const dirty = [...stores.values()].filter((s) => s.dirty);
    if (!task.hasWork && dirty.length === 0) return true;
    const started = performance.now();
    const writes = dirty.map((store) => ({ store, writes: store.writes() }));
    const records = [
      ...task.outputs,
      ...writes.flatMap(({ store, writes }) =>
        writes.map((w) => ({
          topic: store.name,
          partition: task.partition,
          key: Buffer.from(w.key),
          value: w.value,
        })),
      ),
    ];
    const offsets = task.committable();
    try {
      if (running.producer) {
        const producer = running.producer;
        await withinTime(COMMIT_TIMEOUT_MS, `the commit of ${task.id}`, async () => {
          const transaction = await producer.transaction();
          try {
            if (records.length > 0) await transaction.send(records);
            this.options.onCommitStage?.('sent', task.id);
            if (offsets.length > 0) await transaction.sendOffsets(this.applicationId, offsets);
            await transaction.commit();
          } catch (error) {
            await transaction.abort().catch(() => undefined);
            throw error;
          }
        });
      } else {
        if (records.length > 0) await this.sharedProducer!.send(records);
        this.options.onCommitStage?.('sent', task.id);
        if (offsets.length > 0) await this.consumer!.commit(offsets);
      }
    } catch (error) {
      if (error instanceof ProducerFencedError) {
        this.logger.warn(
          { task: task.id },
          "task fenced by a newer owner; dropping its uncommitted work (opened again later if its partition is still this instance's)",
        );
        for (const store of stores.values()) store.discard();
        task.committed();
        this.tasks.delete(task.partition);
        this.failingCommits.delete(task.id);
        await task.close();
        await running.producer?.close().catch(() => undefined);
        this.revive(task.partition, task.id, 0, this.options.fencedRecheckMs ?? FENCED_RECHECK_MS);
        return false;
      }
      this.failingCommits.set(task.id, (error as Error).message);
      if (running.producer) {
        // The transaction's outcome is unknown (a broker restart can fail a commit the
        // coordinator then completes), and the producer may refuse new transactions. As Kafka
        // Streams does with a corrupted task: drop the task's uncommitted work and producer and
        // open it again. The new producer fences the old one and ends the pending transaction;
        // the stores catch up from their changelogs and the input resumes from the committed
        // offsets, whichever way the failed commit went.
        this.logger.error({ err: error, task: task.id }, 'commit failed; reviving the task');
        await this.dropAndRevive(running);
        return false;
      }
      // At-least-once: nothing is lost by keeping the work and trying again at the next commit.
      this.logger.error({ err: error, task: task.id }, 'commit failed; will retry');
      return true;
    }
    this.failingCommits.delete(task.id);
    this.options.onCommitStage?.('committed', task.id);
    // The outputs and offsets are in the log: whatever comes next, they are never sent again.
    task.committed();
    try {
      for (const { store, writes: w } of writes) await store.flush(w);
      await this.touchCheckpoints(running);
    } catch (error) {
      // The changelogs hold the commit's writes and the local stores may not (a disk error):
      // as after a failed commit, the task is dropped and opened again, and its stores catch
      // up from their changelogs.
      this.logger.error({ err: error, task: task.id }, 'store flush failed; reviving the task');
      // Not ready until it runs again (a disk that keeps failing keeps it down).
      this.failingCommits.set(task.id, `store flush failed: ${(error as Error).message}`);
      await this.dropAndRevive(running);
      return false;
    }
    this.options.onCommitStage?.('flushed', task.id);
    this.counters?.commits.inc({ application: this.applicationId });
    this.counters?.commitSeconds.observe(
      { application: this.applicationId },
      (performance.now() - started) / 1000,
    );
    return true;
  }

  /**
   * Every CHECKPOINT_TOUCH_MS of a task's life, its stores' checkpoints are written again, at the
   * same offsets, with the time: what the changelog holds after them is this owner's own writes,
   * which its local stores hold too, so a restore after a crash can still start from them (see
   * recent). Else a task that ran longer than CHECKPOINT_TRUST_MS restored from the start. Only
   * exactly-once proves it: a transaction that just committed means no newer owner has opened
   * the task (it would have fenced this one), as in stillOwner.
   */
  private async touchCheckpoints(running: RunningTask): Promise<void> {
    if (!running.producer) return;
    const every = Math.min(CHECKPOINT_TOUCH_MS, this.checkpointTrustMs / 4);
    if (Date.now() - running.checkpointsTouchedAt < every) return;
    running.checkpointsTouchedAt = Date.now();
    const { stateDb } = this.options;
    for (const store of running.stores.values()) {
      const checkpoint = await stateDb.checkpoint(store.name, store.partition);
      if (checkpoint) await stateDb.setCheckpoint(store.name, store.partition, checkpoint.offset);
    }
  }

  /** Whether the consumer's group gives this instance the partition now. */
  private owns(partition: number): boolean {
    return this.consumer?.assignment().some((tp) => tp.partition === partition) ?? false;
  }

  /**
   * Drops a task whose stores or producer cannot be trusted (a failed commit or flush) with its
   * uncommitted work, and opens it again (revive): the new stores catch up from their changelogs.
   */
  private async dropAndRevive(running: RunningTask): Promise<void> {
    const { task } = running;
    this.tasks.delete(task.partition);
    await task.close().catch(() => undefined);
    await running.producer?.close().catch(() => undefined);
    this.revive(task.partition, task.id);
  }

  /**
   * Opens a task again after a failed commit, once the log lets it (backing off up to 5 s), if
   * the partition is still this instance's; then moves the consumer back to the committed
   * offsets, so that what the dropped work had read is read again.
   */
  private revive(partition: number, taskId: string, attempt = 0, delayMs?: number): void {
    // A task fenced or failed while closing (close cleared the timers already): nothing to
    // open again, and a timer would hold the event loop for FENCED_RECHECK_MS.
    if (this.closing) return;
    const timer = setTimeout(
      () => {
        this.revivals.delete(timer);
        void this.exclusive(async () => {
          if (this.closing || this.tasks.has(partition)) return;
          if (!this.owns(partition)) {
            this.failingCommits.delete(taskId); // moved to another instance meanwhile
            return;
          }
          const committed = await this.openTask(partition);
          for (const [topic, offset] of committed)
            this.consumer!.seek({ topic, partition, offset: Math.max(0, offset) });
          // Batches the consumer handed before the seeks are stale; those after follow them.
          this.revisions.set(partition, (this.revisions.get(partition) ?? 0) + 1);
          this.failingCommits.delete(taskId);
          this.logger.info({ task: taskId, attempt }, 'task revived');
        }).catch((error: unknown) => {
          this.logger.warn({ err: error, task: taskId, attempt }, 'task not revived yet');
          this.revive(partition, taskId, attempt + 1);
        });
      },
      delayMs ?? Math.min(100 * 2 ** attempt, 5000),
    );
    this.revivals.add(timer);
  }

  /**
   * Commits, checkpoints each store at its changelog's end when that end is provably its own
   * (see stillOwner), and closes the task. Without a checkpoint the store restores from the
   * one it had when opened: more to read again, nothing missed.
   */
  private async closeTask(running: RunningTask): Promise<void> {
    const { log, stateDb } = this.options;
    const kept = await this.commit(running);
    this.tasks.delete(running.task.partition);
    this.failingCommits.delete(running.task.id);
    if (kept) {
      const ends = new Map<TaskStore<unknown>, number>();
      for (const store of running.stores.values())
        ends.set(store, (await log.admin.watermarks(store.name))[store.partition]!.high);
      if (await this.stillOwner(running))
        for (const [store, end] of ends)
          await stateDb.setCheckpoint(store.name, store.partition, end);
      await running.task.close();
      await running.producer?.close();
    }
  }

  /**
   * Whether no newer owner of the task had opened it before now, so that the changelog ends
   * read just before hold only this owner's writes. A newer owner fences this one before it
   * writes anything: a transaction that commits the task's offsets again (unchanged) fails
   * once it has. A task revoked late (its instance busy, or Kafka handing the partition on
   * before kafkajs tells the old owner) would otherwise checkpoint past the new owner's writes,
   * and skip them when it came back. At-least-once has no fence to ask: no checkpoint.
   */
  private async stillOwner(running: RunningTask): Promise<boolean> {
    const offsets = running.task.currentOffsets();
    if (!running.producer || offsets.length === 0) return false;
    try {
      const transaction = await running.producer.transaction();
      try {
        await transaction.sendOffsets(this.applicationId, offsets);
        await transaction.commit();
      } catch (error) {
        await transaction.abort().catch(() => undefined);
        throw error;
      }
      return true;
    } catch (error) {
      const fenced = error instanceof ProducerFencedError;
      this.logger[fenced ? 'info' : 'warn'](
        { err: error, task: running.task.id },
        fenced
          ? 'task taken over meanwhile; no checkpoint'
          : 'ownership not confirmed; no checkpoint',
      );
      return false;
    }
  }
}
