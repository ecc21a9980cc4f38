/**
 * Co-partitioned assignment: partition p of every subscribed topic goes to the same member, so
 * that one task can join partition p of several topics keyed alike. Both adapters use it: the
 * embedded log's group coordinator, and the kafkajs partition assigner.
 */
import type { TopicPartition } from './port.ts';

export interface SubscribedTopic {
  topic: string;
  partitions: number;
}

/**
 * Partition numbers are dealt to the members in turn (sorted by id, so every member computes
 * the same result): with 12 partitions and 5 members, members get 3, 3, 2, 2, 2 task numbers.
 */
export function assignCoPartitioned(
  memberIds: readonly string[],
  topics: readonly SubscribedTopic[],
): Map<string, TopicPartition[]> {
  const members = [...memberIds].sort();
  const assignment = new Map<string, TopicPartition[]>(members.map((id) => [id, []]));
  if (members.length === 0) return assignment;
  const partitionNumbers = Math.max(0, ...topics.map((t) => t.partitions));
  for (let p = 0; p < partitionNumbers; p++) {
    const owner = assignment.get(members[p % members.length]!)!;
    for (const t of topics) if (p < t.partitions) owner.push({ topic: t.topic, partition: p });
  }
  return assignment;
}
