/**
 * Co-partitioned assignment: partition p of every subscribed topic goes to the same member, so
 * that one task can join partition p of several topics keyed alike. Both adapters use it: the
 * embedded log's group coordinator, and the kafkajs partition assigner.
 *
 * The assignment is sticky, as Kafka Streams' task assignor is: a member keeps the task numbers
 * it owned before the rebalance, as many as its fair share allows, and only the rest move. A
 * task that moves must restore its stores on its new owner (from its changelog, the whole of it
 * when that process never held the task); a task that stays needs no restore at all.
 */
import type { TopicPartition } from './port.ts';

export interface SubscribedTopic {
  topic: string;
  partitions: number;
}

/**
 * Each member gets ⌊N/M⌋ or ⌈N/M⌉ of the N task numbers: balance first, then stickiness. The
 * larger shares go to the members that owned the most (ties by id), each member keeps what it
 * owned up to its share (a number claimed by two members, after a member was evicted and its
 * tasks were handed on, goes to the first by id), and the numbers left are dealt in turn to the
 * members below their share. Without anything owned this is the plain deal: p to member
 * p mod M, members sorted by id (12 numbers over 5 members: 3, 3, 2, 2, 2). Every member
 * computes the same result from the same input.
 */
export function assignCoPartitioned(
  memberIds: readonly string[],
  topics: readonly SubscribedTopic[],
  owned: ReadonlyMap<string, readonly number[]> = new Map(),
): Map<string, TopicPartition[]> {
  const members = [...memberIds].sort();
  const assignment = new Map<string, TopicPartition[]>(members.map((id) => [id, []]));
  if (members.length === 0) return assignment;
  const partitionNumbers = Math.max(0, ...topics.map((t) => t.partitions));
  const owner = taskOwners(members, partitionNumbers, owned);
  for (let p = 0; p < partitionNumbers; p++) {
    const tasks = assignment.get(owner[p]!)!;
    for (const t of topics) if (p < t.partitions) tasks.push({ topic: t.topic, partition: p });
  }
  return assignment;
}

/** The member of each task number 0..n-1; `members` sorted. */
function taskOwners(
  members: readonly string[],
  n: number,
  owned: ReadonlyMap<string, readonly number[]>,
): string[] {
  const claims = members.map((id) => [...new Set(owned.get(id) ?? [])].filter((p) => valid(p, n)));
  const base = Math.floor(n / members.length);
  const larger = new Set(
    members
      .map((id, i) => ({ i, claimed: claims[i]!.length }))
      .sort((a, b) => b.claimed - a.claimed || a.i - b.i)
      .slice(0, n % members.length)
      .map(({ i }) => i),
  );
  const share = members.map((_, i) => base + (larger.has(i) ? 1 : 0));
  const counts = members.map(() => 0);
  const owner: (string | undefined)[] = new Array(n).fill(undefined);
  members.forEach((id, i) => {
    for (const p of [...claims[i]!].sort((a, b) => a - b)) {
      if (counts[i]! >= share[i]!) break;
      if (owner[p] !== undefined) continue;
      owner[p] = id;
      counts[i]!++;
    }
  });
  let next = 0;
  for (let p = 0; p < n; p++) {
    if (owner[p] !== undefined) continue;
    while (counts[next % members.length]! >= share[next % members.length]!) next++;
    const i = next % members.length;
    owner[p] = members[i];
    counts[i]!++;
    next++;
  }
  return owner as string[];
}

const valid = (p: number, n: number) => Number.isInteger(p) && p >= 0 && p < n;
