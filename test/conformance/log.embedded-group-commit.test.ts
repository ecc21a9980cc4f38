/**
 * The embedded log's group-commit writer under faults, close with pending writes, and the order
 * of one producer's sends (a large send's encoding yields to the event loop: a smaller send made
 * after it was appended first). From a review (session 18).
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import { text } from '../support/log-helpers.ts';

describe('embedded log: group commit and send order', function () {
  this.timeout(60_000);

  it('a failed write group: every waiting producer rejects, nothing of the group is visible, before or after a reopen', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-gc-'));
    try {
      let log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
      await log.admin.createTopics([{ topic: 't', partitions: 2 }]);
      const producer = await log.producer();
      await producer.send([{ topic: 't', key: null, value: Buffer.from('before'), partition: 0 }]);
      // The next write batch fails (disk full).
      const db = (
        log.store as unknown as { db: { batch: () => { write: (o: unknown) => Promise<void> } } }
      ).db;
      const batch = db.batch.bind(db);
      let fail = true;
      db.batch = () => {
        const b = batch();
        const write = b.write.bind(b);
        b.write = async (o: unknown) => {
          if (fail) {
            fail = false;
            throw new Error('injected: no space left on device');
          }
          return write(o);
        };
        return b;
      };
      const outcomes = await Promise.allSettled(
        Array.from({ length: 20 }, (_, i) =>
          producer.send([
            { topic: 't', key: null, value: Buffer.from(`a${i}`), partition: 0 },
            { topic: 't', key: null, value: Buffer.from(`b${i}`), partition: 1 },
          ]),
        ),
      );
      assert.ok(
        outcomes.every((o) => o.status === 'rejected'),
        'every producer of the group told',
      );
      assert.deepEqual(
        (await log.admin.watermarks('t')).map((w) => w.high),
        [1, 0],
      );
      await assert.rejects(
        producer.send([{ topic: 't', key: null, value: Buffer.from('x'), partition: 0 }]),
      );
      await log.close();
      log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
      assert.deepEqual(
        (await log.admin.watermarks('t')).map((w) => w.high),
        [1, 0],
      );
      const p = await log.producer();
      const [m] = await p.send([
        { topic: 't', key: null, value: Buffer.from('after'), partition: 0 },
      ]);
      assert.equal(m!.offset, 1);
      await log.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('close() while appends are pending: each pending append either resolves durably or rejects', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-close-'));
    try {
      let log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
      await log.admin.createTopics([{ topic: 't', partitions: 1 }]);
      const producer = await log.producer();
      const sends = Array.from({ length: 50 }, (_, i) =>
        producer.send(
          Array.from({ length: 300 }, (_, j) => ({
            topic: 't',
            key: null,
            value: Buffer.from(`${i}/${j}`),
            partition: 0,
          })),
        ),
      );
      const closing = log.close();
      const outcomes = await Promise.allSettled(sends);
      await closing;
      const acked = outcomes.filter((o) => o.status === 'fulfilled').length * 300;
      log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
      const [w] = await log.admin.watermarks('t');
      assert.ok(w!.high >= acked, `acked ${acked}, high ${w!.high}`);
      await log.close();
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('keeps the order of two sends of one producer to one key (a large send, then a small one)', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-order-'));
    const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    try {
      await log.admin.createTopics([
        { topic: 't', partitions: 1, config: { 'cleanup.policy': 'compact' } },
      ]);
      const producer = await log.producer();
      const first = producer.send(
        Array.from({ length: 1500 }, (_, i) => ({
          topic: 't',
          key: Buffer.from('k'),
          value: Buffer.from(`old-${i}`),
        })),
      );
      const second = producer.send([
        { topic: 't', key: Buffer.from('k'), value: Buffer.from('newest') },
      ]);
      await Promise.all([first, second]);
      await log.clean();
      const left = await log.store.read('t', 0, 0, 10);
      assert.deepEqual(
        left.map((r) => text(r.value)),
        ['newest'],
        'the value sent last is the latest',
      );
    } finally {
      await log.close();
      await rm(dir, { recursive: true, force: true });
    }
  });

  it('keeps the order of two sends into one transaction, the first not awaited', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-order-tx-'));
    const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    try {
      await log.admin.createTopics([{ topic: 't', partitions: 1 }]);
      const producer = await log.producer({ transactionalId: 'tx' });
      const transaction = await producer.transaction();
      const big = Array.from({ length: 1500 }, (_, i) => ({
        topic: 't',
        key: Buffer.from('k'),
        value: Buffer.from(`old-${i}`),
      }));
      void transaction.send(big);
      await transaction.send([{ topic: 't', key: Buffer.from('k'), value: Buffer.from('newest') }]);
      await transaction.commit();
      const all = await log.store.read('t', 0, 0, 2000);
      assert.equal(all.length, 1501, 'the send not awaited is part of the transaction');
      assert.equal(text(all[1500]!.value), 'newest');
      await producer.close();
    } finally {
      await log.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
