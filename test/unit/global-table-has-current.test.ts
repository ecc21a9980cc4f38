/**
 * GlobalTable.hasCurrent promises an answer within its wait ("waits (at most 3 s)"): a gateway
 * awaits it before it answers a connection's send, and the connection's next frames (acks
 * among them) wait behind it. The watermarks question it asks the log is part of that wait: a
 * log whose admin is slow to answer (Kafka retrying a leader it cannot reach) must not hold
 * the answer past it.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';
import type { Log } from '../../log/port.ts';
import { GlobalTable } from '../../processors/runtime/global-table.ts';

describe('GlobalTable.hasCurrent', function () {
  this.timeout(20_000);

  it('answers within its wait even when the watermarks question hangs', async () => {
    const dir = await mkdtemp(join(tmpdir(), 'kchat-global-table-'));
    const log = await EmbeddedLog.open({ dataDir: dir, cleanerIntervalMs: 0 });
    let hang = false;
    const hangs: Array<() => void> = [];
    const admin = new Proxy(log.admin, {
      get(target, property, receiver) {
        if (property !== 'watermarks') return Reflect.get(target, property, receiver) as unknown;
        return (topic: string) =>
          hang
            ? new Promise((resolve) => hangs.push(() => resolve(target.watermarks(topic))))
            : target.watermarks(topic);
      },
    });
    const slowLog = new Proxy(log, {
      get(target, property, receiver) {
        if (property === 'admin') return admin;
        return Reflect.get(target, property, receiver) as unknown;
      },
    }) as Log;
    await log.admin.createTopics([{ topic: 't', partitions: 2 }]);
    const table = new GlobalTable<string>(slowLog, 't', { decode: (v) => v.toString() });
    try {
      await table.start();
      hang = true;
      const started = Date.now();
      const answer = await Promise.race([
        table.hasCurrent('nobody', 300),
        new Promise<'no answer'>((resolve) => setTimeout(() => resolve('no answer'), 5_000)),
      ]);
      assert.equal(answer, false, `answered ${String(answer)} after ${Date.now() - started} ms`);
      assert.ok(Date.now() - started < 1_500, `answered after ${Date.now() - started} ms`);
    } finally {
      for (const release of hangs) release();
      await table.close();
      await log.close();
      await rm(dir, { recursive: true, force: true });
    }
  });
});
