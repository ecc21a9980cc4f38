/**
 * A kafkajs partition assigner that keeps co-partitioning: the group leader runs
 * `assignCoPartitioned` over the members and the topics each subscribed to.
 */
import kafkajs, { type Assigner, type Cluster, type PartitionAssigner } from 'kafkajs';
import { assignCoPartitioned } from '../assignment.ts';

const { AssignerProtocol } = kafkajs; // CommonJS: not a named ESM export

export const CO_PARTITIONED = 'co-partitioned';

export const coPartitionedAssigner: PartitionAssigner = ({
  cluster,
}: {
  cluster: Cluster;
}): Assigner => ({
  name: CO_PARTITIONED,
  version: 1,
  async assign({ members, topics }) {
    const subscriptions = new Map<string, string[]>();
    for (const member of members) {
      const metadata = AssignerProtocol.MemberMetadata.decode(member.memberMetadata);
      subscriptions.set(member.memberId, metadata?.topics ?? topics);
    }
    const counts = topics.map((topic) => ({
      topic,
      partitions: cluster.findTopicPartitionMetadata(topic).length,
    }));
    const assignment = assignCoPartitioned([...subscriptions.keys()], counts);
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
        userData: Buffer.alloc(0),
      }),
    };
  },
});
