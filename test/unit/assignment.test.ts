/**
 * The co-partitioned assignment both logs use: balanced, co-partitioned, and sticky (a member
 * keeps what it owned as far as its fair share allows), with the kafkajs assigner's user data.
 */
import assert from 'node:assert/strict';
import { assignCoPartitioned } from '../../log/assignment.ts';
import { decodeOwned, encodeOwned } from '../../log/kafka/assigner.ts';
import { seededRandom } from '../support/random.ts';

const topics = [
  { topic: 'a', partitions: 12 },
  { topic: 'b', partitions: 12 },
];

/** Task numbers per member, from an assignment, checking that both topics agree. */
function numbers(
  assignment: Map<string, { topic: string; partition: number }[]>,
): Map<string, number[]> {
  const out = new Map<string, number[]>();
  for (const [id, tps] of assignment) {
    const a = tps.filter((tp) => tp.topic === 'a').map((tp) => tp.partition);
    const b = tps.filter((tp) => tp.topic === 'b').map((tp) => tp.partition);
    assert.deepEqual(a, b, `${id}: partition p of both topics together`);
    out.set(id, a);
  }
  return out;
}

function assertBalancedAndComplete(tasks: Map<string, number[]>, n: number): void {
  const all = [...tasks.values()].flat().sort((x, y) => x - y);
  assert.deepEqual(
    all,
    Array.from({ length: n }, (_, i) => i),
    'every task number exactly once',
  );
  const sizes = [...tasks.values()].map((t) => t.length);
  assert.ok(Math.max(...sizes) - Math.min(...sizes) <= 1, `balanced: ${sizes.join(', ')}`);
}

describe('co-partitioned assignment', () => {
  it('with nothing owned, deals partition p to member p mod M, members sorted by id', () => {
    const tasks = numbers(assignCoPartitioned(['m3', 'm1', 'm5', 'm2', 'm4'], topics));
    assert.deepEqual(tasks.get('m1'), [0, 5, 10]);
    assert.deepEqual(tasks.get('m2'), [1, 6, 11]);
    assert.deepEqual(tasks.get('m3'), [2, 7]);
    assert.deepEqual(tasks.get('m5'), [4, 9]);
  });

  it('a member joining takes only its share; the others keep the rest of theirs', () => {
    const before = numbers(assignCoPartitioned(['b', 'c'], topics));
    // The newcomer sorts first: without stickiness it would take 0, 3, 6, 9 and shift the rest.
    const after = numbers(assignCoPartitioned(['a', 'b', 'c'], topics, before));
    assertBalancedAndComplete(after, 12);
    for (const id of ['b', 'c']) {
      assert.equal(after.get(id)!.length, 4);
      assert.ok(
        after.get(id)!.every((p) => before.get(id)!.includes(p)),
        `${id} kept only its own`,
      );
    }
    assert.equal(after.get('a')!.length, 4); // 4 moved of 12: the fewest possible
  });

  it('a member leaving: its tasks are shared out, nobody else loses one', () => {
    const before = numbers(assignCoPartitioned(['a', 'b', 'c'], topics));
    const owned = new Map([...before].filter(([id]) => id !== 'b'));
    const after = numbers(assignCoPartitioned(['a', 'c'], topics, owned));
    assertBalancedAndComplete(after, 12);
    for (const id of ['a', 'c'])
      for (const p of before.get(id)!) assert.ok(after.get(id)!.includes(p));
  });

  it('the same member back under a new id (an evicted kafkajs member) gets back what it claims', () => {
    const before = numbers(assignCoPartitioned(['x', 'y'], topics));
    // y comes back as a0, which sorts first, and claims y's tasks.
    const owned = new Map([
      ['x', before.get('x')!],
      ['a0', before.get('y')!],
    ]);
    const after = numbers(assignCoPartitioned(['a0', 'x'], topics, owned));
    assert.deepEqual(after.get('x'), before.get('x'));
    assert.deepEqual(after.get('a0'), before.get('y'));
  });

  it('larger shares go to the members that owned the most; a task claimed twice goes once', () => {
    const owned = new Map([
      ['a', [0, 1, 2, 3, 4]],
      ['b', [4, 5]],
      ['c', [6]],
    ]);
    const tasks = numbers(
      assignCoPartitioned(
        ['a', 'b', 'c'],
        [
          { topic: 'a', partitions: 10 },
          { topic: 'b', partitions: 10 },
        ],
        owned,
      ),
    );
    assertBalancedAndComplete(tasks, 10);
    assert.deepEqual(tasks.get('a'), [0, 1, 2, 3]); // its share is 4 (10 = 4 + 3 + 3)
    assert.ok(tasks.get('b')!.includes(4) && tasks.get('b')!.includes(5));
    assert.ok(tasks.get('c')!.includes(6));
  });

  it('ignores claims outside the partitions, repeated or not integers', () => {
    const owned = new Map([['a', [99, -1, 1.5, 3, 3, Number.NaN]]]);
    const tasks = numbers(assignCoPartitioned(['a', 'b'], topics, owned));
    assertBalancedAndComplete(tasks, 12);
    assert.ok(tasks.get('a')!.includes(3));
  });

  it('random claims: always complete, balanced, and keeping as much as balance allows', () => {
    for (let seed = 1; seed <= 500; seed++) {
      const rnd = seededRandom(seed);
      const n = 1 + Math.floor(rnd() * 24);
      const ids = Array.from({ length: 1 + Math.floor(rnd() * 6) }, (_, i) => `m${i}`);
      const owned = new Map<string, number[]>();
      for (let p = 0; p < n; p++) {
        if (rnd() < 0.2) continue; // owned by nobody (a member that left)
        const id = ids[Math.floor(rnd() * ids.length)]!;
        owned.set(id, [...(owned.get(id) ?? []), p]);
      }
      const t = [
        { topic: 'a', partitions: n },
        { topic: 'b', partitions: n },
      ];
      const tasks = numbers(assignCoPartitioned(ids, t, owned));
      assertBalancedAndComplete(tasks, n);
      const base = Math.floor(n / ids.length);
      for (const id of ids) {
        const claimed = new Set(owned.get(id) ?? []);
        const kept = tasks.get(id)!.filter((p) => claimed.has(p)).length;
        // Claims here never overlap: each member keeps its claims up to at least the smaller share.
        assert.ok(kept >= Math.min(claimed.size, base), `seed ${seed}: ${id} kept ${kept}`);
      }
      assert.deepEqual(
        assignCoPartitioned([...ids].reverse(), t, owned),
        assignCoPartitioned(ids, t, owned),
      );
    }
  });
});

describe('the kafkajs assigner user data', () => {
  it('carries the owned partition numbers, and reads anything else as owning nothing', () => {
    assert.deepEqual(decodeOwned(encodeOwned([0, 3, 6])), [0, 3, 6]);
    assert.deepEqual(decodeOwned(Buffer.alloc(0)), []);
    assert.deepEqual(decodeOwned(undefined), []);
    assert.deepEqual(decodeOwned(Buffer.from([0xff, 0x00, 0x01])), []);
    assert.deepEqual(decodeOwned(Buffer.from('{"owned":"all"}')), []);
    assert.deepEqual(decodeOwned(Buffer.from('{"owned":[1,"2",3.5,4]}')), [1, 4]);
  });
});
