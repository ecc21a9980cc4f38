/**
 * A kafkajs partition assigner that keeps co-partitioning: the group leader runs
 * `assignCoPartitioned` over the members and the topics each subscribed to (all of them, not
 * only its own). Each member's subscription carries, in its user data, the task (partition)
 * numbers it owned last: kafkajs's rebalances are eager (every member gives up everything
 * before it joins), so "owned" is what it was last assigned, as the user data of Kafka's
 * StickyAssignor carries. The leader keeps those where it can, so that a process joining or
 * leaving moves only the tasks it must.
 */
import kafkajs, { type Assigner, type Cluster, type PartitionAssigner } from 'kafkajs';
import { assignCoPartitioned } from '../assignment.ts';

const { AssignerProtocol } = kafkajs; // CommonJS: not a named ESM export

export const CO_PARTITIONED = 'co-partitioned';

/** User data: `{"owned":[0,3,6]}`. Empty (or anything else) from a member that owns nothing. */
export function encodeOwned(owned: readonly number[]): Buffer {
  return Buffer.from(JSON.stringify({ owned }));
}

export function decodeOwned(userData: Buffer | undefined): number[] {
  if (!userData || userData.length === 0) return [];
  try {
    const { owned } = JSON.parse(userData.toString('utf8')) as { owned?: unknown };
    return Array.isArray(owned) ? owned.filter((p): p is number => Number.isInteger(p)) : [];
  } catch {
    return []; // another assigner's or a newer version's data: no stickiness, still balanced
  }
}

/** `owned`: the partition numbers this member was last assigned, asked at each join. */
export function coPartitionedAssigner(owned: () => readonly number[]): PartitionAssigner {
  return ({ cluster }: { cluster: Cluster }): Assigner => ({
    name: CO_PARTITIONED,
    version: 1,
    async assign({ members, topics }) {
      const subscriptions = new Map<string, string[]>();
      const claims = new Map<string, number[]>();
      for (const member of members) {
        const metadata = AssignerProtocol.MemberMetadata.decode(member.memberMetadata);
        subscriptions.set(member.memberId, metadata?.topics ?? topics);
        claims.set(member.memberId, decodeOwned(metadata?.userData));
      }
      // kafkajs hands the leader its own subscription as `topics`: in a rolling deploy that
      // adds a source topic, an older leader would assign the new topic to nobody. Every
      // member's topics are assigned (the leader needs their metadata: it asks for it).
      const all = [...new Set([...topics, ...[...subscriptions.values()].flat()])];
      const others = all.filter((topic) => !topics.includes(topic));
      if (others.length > 0) await cluster.addMultipleTargetTopics(others);
      const counts = all.map((topic) => ({
        topic,
        partitions: cluster.findTopicPartitionMetadata(topic).length,
      }));
      const assignment = assignCoPartitioned([...subscriptions.keys()], counts, claims);
      return [...assignment].map(([memberId, partitions]) => {
        const subscribed = subscriptions.get(memberId)!;
        const byTopic: Record<string, number[]> = {};
        for (const tp of partitions) {
          if (subscribed.includes(tp.topic)) (byTopic[tp.topic] ??= []).push(tp.partition);
        }
        return {
          memberId,
          memberAssignment: AssignerProtocol.MemberAssignment.encode({
            version: 1,
            assignment: byTopic,
            userData: Buffer.alloc(0),
          }),
        };
      });
    },
    protocol({ topics }) {
      return {
        name: CO_PARTITIONED,
        metadata: AssignerProtocol.MemberMetadata.encode({
          version: 1,
          topics,
          userData: encodeOwned(owned()),
        }),
      };
    },
  });
}
