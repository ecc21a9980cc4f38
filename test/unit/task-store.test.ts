import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { StateDb } from '../../state/state-db.ts';
import { TaskStore } from '../../state/task-store.ts';
import { StoreCache } from '../../state/store-cache.ts';
import { InMemoryKeyValueStore, jsonSerde, type ScanSlice } from '../../state/store.ts';

describe('task store', () => {
  let dir: string;
  let db: StateDb;
  beforeEach(async () => {
    dir = await mkdtemp(join(tmpdir(), 'kchat-task-store-'));
    db = await StateDb.open(dir);
  });
  afterEach(async () => {
    await db.close();
    await rm(dir, { recursive: true, force: true });
  });

  it('shows its own uncommitted writes, and forgets them on discard without caching them', async () => {
    const store = new TaskStore<number>('s', 0, db, jsonSerde());
    store.put('a', 1);
    assert.equal(await store.get('a'), 1);
    store.discard();
    assert.equal(await store.get('a'), undefined);
    assert.equal(await db.get('s', 0, 'a'), undefined);
  });

  it('leaves a value that does not decode out of a scan, and tells of it; a get of it still throws', async () => {
    // A changelog record another writer corrupted, restored into RocksDB as it was.
    await db.write('s', 0, [
      { key: 'a', value: Buffer.from('1') },
      { key: 'b', value: Buffer.from('not json') },
      { key: 'c', value: Buffer.from('3') },
    ]);
    const undecodable: string[] = [];
    const store = new TaskStore<number>('s', 0, db, jsonSerde(), {
      onUndecodable: (key) => void undecodable.push(key),
    });
    const first = await store.scan('', 2);
    assert.deepEqual(first.entries, [['a', 1]]);
    assert.ok(first.next !== undefined, 'the walk goes on past it');
    assert.deepEqual((await store.scan(first.next, 2)).entries, [['c', 3]]);
    assert.deepEqual(undecodable, ['b']);
    await assert.rejects(() => store.get('b'), SyntaxError);
    // Overwritten by the task, it reads again.
    store.put('b', 2);
    assert.deepEqual((await store.scan('', 10)).entries, [
      ['a', 1],
      ['b', 2],
      ['c', 3],
    ]);
  });

  it('serves committed values and deletions from its cache, consistent with RocksDB', async () => {
    const store = new TaskStore<number>('s', 0, db, jsonSerde(), { cache: new StoreCache(2) });
    store.put('a', 1);
    store.put('b', 2);
    await store.flush(store.writes());
    store.delete('a');
    await store.flush(store.writes());
    assert.equal(await store.get('a'), undefined);
    assert.equal(await store.get('b'), 2);
    // Written behind the store's back: a cached key keeps its committed value, an evicted one
    // is read again. (Only the task writes its share; this just shows where values come from.)
    await db.write('s', 0, [{ key: 'c', value: Buffer.from('3') }]);
    assert.equal(await store.get('c'), 3);
    assert.deepEqual(await store.all(), [
      ['b', 2],
      ['c', 3],
    ]);
  });

  it('keeps its cache within its byte limit as well as its entry limit', async () => {
    // Room for 100 entries but about two values of 1,000 bytes (keys, values and overhead).
    const store = new TaskStore<string>('s', 0, db, jsonSerde(), {
      cache: new StoreCache(100, 2_500),
    });
    for (const key of ['a', 'b', 'c']) store.put(key, key.repeat(1_000));
    await store.flush(store.writes());
    // Written behind the store's back: a key still cached keeps its committed value, an evicted
    // one is read again (as in the test above).
    await db.write('s', 0, [
      { key: 'a', value: Buffer.from('"evicted"') },
      { key: 'c', value: Buffer.from('"evicted"') },
    ]);
    assert.equal(await store.get('a'), 'evicted');
    assert.equal(await store.get('c'), 'c'.repeat(1_000));
    // A read brings a value into the cache under the same limit: a large one read from RocksDB
    // pushes out the least recently used, 'b'.
    await db.write('s', 0, [
      { key: 'd', value: Buffer.from(JSON.stringify('d'.repeat(1_000))) },
      { key: 'b', value: Buffer.from('"evicted"') },
    ]);
    assert.equal(await store.get('d'), 'd'.repeat(1_000));
    assert.equal(await store.get('b'), 'evicted');
  });

  it("shares the process's cache with every other store, under one bound", async () => {
    const cache = new StoreCache(3);
    const inbox = new TaskStore<number>('inbox', 0, db, jsonSerde(), { cache });
    const meta = new TaskStore<number>('meta', 1, db, jsonSerde(), { cache });
    inbox.put('a', 1);
    inbox.put('b', 1);
    await inbox.flush(inbox.writes());
    meta.put('a', 2);
    meta.put('b', 2);
    await meta.flush(meta.writes());
    assert.equal(cache.size, 3);
    // The least recently used of all, inbox's 'a', went: it is read from RocksDB again.
    await db.write('inbox', 0, [{ key: 'a', value: Buffer.from('9') }]);
    await db.write('inbox', 0, [{ key: 'b', value: Buffer.from('9') }]);
    assert.equal(await inbox.get('b'), 1, 'still cached');
    assert.equal(await inbox.get('a'), 9);
  });

  it('never serves a store opened again what the one before it cached', async () => {
    const before = new TaskStore<number>('s', 0, db, jsonSerde());
    before.put('k', 1);
    await before.flush(before.writes());
    // Restored from its changelog meanwhile (another value), and opened again.
    await db.write('s', 0, [{ key: 'k', value: Buffer.from('2') }]);
    const after = new TaskStore<number>('s', 0, db, jsonSerde());
    assert.equal(await after.get('k'), 2);
    assert.equal(await before.get('k'), 1, 'the old instance kept its own');
  });

  it('undoes a failed record’s writes back to the savepoint', async () => {
    const store = new TaskStore<number>('s', 0, db, jsonSerde());
    store.put('a', 1);
    store.savepoint();
    store.put('a', 2);
    store.delete('b');
    store.rollback();
    assert.equal(await store.get('a'), 1);
    assert.deepEqual(
      store.writes().map((w) => w.key),
      ['a'],
    );
  });

  it('scans in slices that together hold every entry once, committed or not, in key order', async () => {
    const store = new TaskStore<number>('s', 0, db, jsonSerde());
    const other = new TaskStore<number>('s', 1, db, jsonSerde());
    for (const key of ['a', 'b', 'c', 'd', 'e', 'é']) store.put(key, 1);
    other.put('f', 1);
    await store.flush(store.writes());
    await other.flush(other.writes());
    store.delete('b'); // uncommitted: a deletion inside the first slice
    store.put('bb', 2); // uncommitted: a key between committed ones
    store.put('z', 3); // uncommitted: past every committed key
    const seen: string[] = [];
    let slices = 0;
    for (let from: string | undefined = ''; from !== undefined; slices++) {
      const slice: ScanSlice<number> = await store.scan(from, 2);
      seen.push(...slice.entries.map(([k]) => k));
      from = slice.next;
    }
    assert.deepEqual(seen, ['a', 'bb', 'c', 'd', 'e', 'z', 'é']);
    assert.deepEqual(
      seen,
      (await store.all()).map(([k]) => k),
    );
    assert.ok(slices >= 3, `${slices} slices of at most 2 committed entries`);
  });

  it('refuses a scan of no entries with a clear error', async () => {
    const store = new TaskStore<number>('s', 3, db, jsonSerde());
    for (const limit of [0, -1, 1.5]) await assert.rejects(store.scan('', limit), RangeError);
    await assert.rejects(new InMemoryKeyValueStore<number>('s').scan('', 0), RangeError);
  });

  it('keeps its share apart from other partitions and stores in the shared database', async () => {
    const mine = new TaskStore<string>('s', 1, db, jsonSerde());
    const other = new TaskStore<string>('s', 2, db, jsonSerde());
    const otherStore = new TaskStore<string>('t', 1, db, jsonSerde());
    for (const [store, value] of [
      [mine, 'mine'],
      [other, 'other'],
      [otherStore, 'other store'],
    ] as const) {
      store.put('k', value);
      await store.flush(store.writes());
    }
    assert.deepEqual(await mine.all(), [['k', 'mine']]);
    await db.drop('s', 2);
    assert.equal(await new TaskStore<string>('s', 2, db, jsonSerde()).get('k'), undefined);
    assert.equal(await mine.get('k'), 'mine');
  });
});

describe('in-memory store', () => {
  it('scans in slices as a task store does', async () => {
    const store = new InMemoryKeyValueStore<number>('s');
    for (const key of ['c', 'a', 'b']) store.put(key, 1);
    const first = await store.scan('', 2);
    assert.deepEqual(
      first.entries.map(([k]) => k),
      ['a', 'b'],
    );
    const second = await store.scan(first.next!, 2);
    assert.deepEqual(second, { entries: [['c', 1]], next: undefined });
  });
});
