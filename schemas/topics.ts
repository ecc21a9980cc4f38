// The topics of DESIGN.md's table: each topic's value schema (schemas/avro/<value>.avsc) and
// what its key holds. The `<app>-<store>-changelog` topics belong to the runtime.
import type { SchemaName } from './avro.ts';

export interface TopicSpec {
  /** The value schema: schemas/avro/<value>.avsc, full name `chat.v1.<value>`. */
  readonly value: SchemaName;
  /** What the record key is. */
  readonly key: string;
  /** A compacted topic keeps the latest value per key (a table); the others delete by age. */
  readonly compacted: boolean;
}

export const topics = {
  connections: 'chat.connections',
  messages: 'chat.messages',
  userCommands: 'chat.user-commands',
  groupMessages: 'chat.group-messages',
  groupCommands: 'chat.group-commands',
  groupEvents: 'chat.group-events',
  replies: 'chat.replies',
  accounts: 'chat.accounts',
  gateways: 'chat.gateways',
  push: 'chat.push',
  inboxEntries: 'chat.inbox-entries',
} as const;

export type TopicName = (typeof topics)[keyof typeof topics];

/** Every gateway consumes its own deliveries topic, `chat.deliveries.<gatewayId>`. */
export const deliveriesTopicPrefix = 'chat.deliveries.';

export function deliveriesTopic(gatewayId: string): `chat.deliveries.${string}` {
  return `${deliveriesTopicPrefix}${gatewayId}`;
}

export const topicSpecs = {
  'chat.connections': { value: 'ConnectionEvent', key: 'userId', compacted: false },
  'chat.messages': { value: 'InboxCommand', key: 'userId of the inbox owner', compacted: false },
  'chat.user-commands': {
    value: 'UserCommand',
    key: 'userId (for Typing, the user to relay it to)',
    compacted: false,
  },
  'chat.group-messages': { value: 'GroupMessage', key: 'groupId', compacted: false },
  'chat.group-commands': { value: 'GroupCommand', key: 'groupId', compacted: false },
  // The group's history, kept forever (retention -1), not compacted.
  'chat.group-events': { value: 'GroupEvent', key: 'groupId', compacted: false },
  'chat.replies': {
    value: 'CommandReply',
    key: "the API instance id (the command's replyTo)",
    compacted: false,
  },
  'chat.accounts': { value: 'Account', key: 'userId', compacted: true },
  'chat.gateways': { value: 'GatewayHeartbeat', key: 'gatewayId', compacted: true },
  'chat.push': { value: 'PushRequest', key: 'userId', compacted: false },
  'chat.inbox-entries': { value: 'InboxEntry', key: 'userId of the inbox owner', compacted: false },
} as const satisfies Readonly<Record<TopicName, TopicSpec>>;

export const deliveriesTopicSpec: TopicSpec = {
  value: 'Delivery',
  key: 'userId',
  compacted: false,
};

/** The spec of any topic of the table, `chat.deliveries.<gatewayId>` included. */
export function topicSpec(topic: string): TopicSpec | undefined {
  if (topic.startsWith(deliveriesTopicPrefix) && topic.length > deliveriesTopicPrefix.length) {
    return deliveriesTopicSpec;
  }
  return (topicSpecs as Readonly<Record<string, TopicSpec>>)[topic];
}
