/**
 * Two task-store contracts the task-store test leaves open.
 *
 * A savepoint undoes every write since it, back to the values before it, also when one key was
 * written more than once after it (a users-actor tick writes a user's meta and sessions index
 * once per command it runs for that user; should the tick fail, all of it must go).
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StateDb } from '../../state/state-db.ts';
import { TaskStore } from '../../state/task-store.ts';
import { jsonSerde, type ScanSlice } from '../../state/store.ts';

describe('task store: rollback and scans', () => {
  let dir: string;
  let db: StateDb;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'kchat-task-store-rollback-'));
    db = await StateDb.open(dir);
  });
  afterEach(async () => {
    await db.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('undoes a key written several times since the savepoint to its value before it', async () => {
    const store = new TaskStore<number>('s', 0, db, jsonSerde());
    store.put('a', 1); // an earlier record's write, not committed yet
    store.savepoint();
    store.put('a', 2);
    store.put('a', 3);
    store.delete('a');
    store.put('b', 1);
    store.put('b', 2);
    store.rollback();
    assert.equal(await store.get('a'), 1);
    assert.equal(await store.get('b'), undefined);
    assert.deepEqual(
      store.writes().map((w) => [w.key, w.value?.toString('utf8')]),
      [['a', '1']],
    );
  });

  // The walks of the users actor (prune, dedup, gateway watch) scan a slice per tick between
  // commits: a key whose latest value is not committed yet must still be in the scan, also when
  // it is the last committed key of a slice.
  it('scans a key with an uncommitted value that ends a slice of committed keys', async () => {
    const store = new TaskStore<number>('s', 0, db, jsonSerde());
    for (const key of ['a', 'b', 'c', 'd']) store.put(key, 1);
    await store.flush(store.writes());
    store.put('b', 2); // written since the last commit
    store.put('d', 2);
    const seen: Array<[string, number]> = [];
    for (let from: string | undefined = ''; from !== undefined;) {
      const slice: ScanSlice<number> = await store.scan(from, 2);
      seen.push(...slice.entries);
      from = slice.next;
    }
    assert.deepEqual(seen, [
      ['a', 1],
      ['b', 2],
      ['c', 1],
      ['d', 2],
    ]);
  });
});
