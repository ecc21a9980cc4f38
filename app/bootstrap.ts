/**
 * What every role needs before it serves: the chat topics of DESIGN.md exist (co-partitioned
 * ones with the same partition count) and every event schema is registered, so that a schema
 * incompatible with what the topics already hold stops the process at start, not mid-stream.
 */
import type { Log, TopicSpec } from '../log/port.ts';
import type { SchemaRegistry } from '../schemas/registry/port.ts';
import { Codecs, type TopicCodec } from '../schemas/codec.ts';
import { avroTypeOptions, loadSchema } from '../schemas/avro.ts';
import { topics, topicSpecs, type TopicName } from '../schemas/topics.ts';
import type { Delivery, SchemaValues } from '../schemas/types.generated.ts';
import type { UsersCodecs } from '../processors/users/topology.ts';
import type { Logger } from '../observability/logger.ts';

export function chatTopicSpecs(partitions: number): TopicSpec[] {
  return Object.entries(topicSpecs).map(([topic, spec]) => ({
    topic,
    // chat.replies is keyed by API instance; chat.gateways is a small table: both still use
    // the common count, so that any instance id or gateway id hashes the same everywhere.
    partitions,
    config: spec.compacted
      ? { 'cleanup.policy': 'compact' }
      : topic === 'chat.group-events'
        ? { 'retention.ms': '-1' } // a group's history is kept forever
        : {},
  }));
}

/** Each chat topic's codec, typed by the event the topic table says it holds. */
export type ChatCodecs = {
  readonly [T in TopicName]: TopicCodec<SchemaValues[(typeof topicSpecs)[T]['value']]>;
};

/** The users actor's codecs, out of the chat topics' (deliveries: any gateway's topic's). */
export function usersCodecs(codecs: ChatCodecs, deliveries: TopicCodec<Delivery>): UsersCodecs {
  return {
    connections: codecs[topics.connections],
    messages: codecs[topics.messages],
    userCommands: codecs[topics.userCommands],
    deliveries,
    push: codecs[topics.push],
    inboxEntries: codecs[topics.inboxEntries],
  };
}

export async function bootstrap(
  log: Log,
  registry: SchemaRegistry,
  partitions: number,
  logger?: Logger,
): Promise<ChatCodecs> {
  await log.admin.createTopics(chatTopicSpecs(partitions));
  if (logger) await warnOfOtherPartitionCounts(log, partitions, logger);
  const codecs = new Codecs(registry);
  const entries = await Promise.all(
    Object.entries(topicSpecs).map(
      async ([topic, spec]) =>
        [topic, await codecs.forTopic(topic, loadSchema(spec.value), avroTypeOptions())] as const,
    ),
  );
  return Object.fromEntries(entries) as ChatCodecs;
}

/**
 * PARTITIONS only counts for the topics a process creates: one that already exists keeps its
 * count (the runtime refuses co-partitioned sources whose counts differ). A different count is
 * worth a warning, since the operator asked for something the process does not do.
 */
async function warnOfOtherPartitionCounts(
  log: Log,
  partitions: number,
  logger: Logger,
): Promise<void> {
  const descriptions = await Promise.all(
    Object.keys(topicSpecs).map((topic) => log.admin.describeTopic(topic)),
  );
  const other = descriptions.filter((d) => d && d.partitions !== partitions);
  if (other.length === 0) return;
  logger.warn(
    {
      partitions,
      topics: Object.fromEntries(other.map((d) => [d!.topic, d!.partitions])),
    },
    'PARTITIONS differs from the partition count of existing chat topics; the topics keep theirs',
  );
}
