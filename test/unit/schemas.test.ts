import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import avro from 'avsc';
import type { Type } from 'avsc';
import {
  avroTypeOptions,
  branchOf,
  loadSchema,
  loadType,
  schemaNames,
  type SchemaName,
} from '../../schemas/avro.ts';
import {
  deliveriesTopic,
  deliveriesTopicSpec,
  topicSpec,
  topicSpecs,
} from '../../schemas/topics.ts';
import {
  fullNames,
  schemaFullNames,
  type InboxEntry,
  type MessageCopy,
  type SchemaValues,
  type Typing,
} from '../../schemas/types.generated.ts';
import { generateTypes, generatedTypesFile } from '../../scripts/gen-types.ts';

type Json = null | boolean | number | string | Json[] | { [key: string]: Json };

const t0 = Date.UTC(2025, 0, 1);

const messageCopy: MessageCopy = {
  messageId: 'm-1',
  from: 'alice',
  to: 'bob',
  group: null,
  body: JSON.stringify({ text: 'héllo', n: [1, 2] }),
  sentAt: t0,
};
const typing: Typing = { from: 'alice', to: null, group: 'g-1', state: 'start', at: t0 };
const inboxEntry: InboxEntry = {
  userId: 'bob',
  seq: 2 ** 40,
  at: t0 + 1,
  entry: { [fullNames.MessageCopy]: messageCopy },
};
const members = [
  { userId: 'alice', role: 'admin' as const },
  { userId: 'bob', role: 'member' as const },
];

/** At least one value per schema and together one per branch of every wrapped union. */
const samples: { [N in SchemaName]: SchemaValues[N][] } = {
  ConnectionEvent: [
    {
      userId: 'alice',
      deviceId: 'default',
      gatewayId: 'gw-1',
      connectionId: 'c-1',
      state: 'CONNECTED',
      at: t0,
    },
    {
      userId: 'alice',
      deviceId: 'phone',
      gatewayId: 'gw-1',
      connectionId: 'c-2',
      state: 'DISCONNECTED',
      at: t0,
    },
  ],
  InboxCommand: [
    { userId: 'bob', entry: { [fullNames.MessageCopy]: messageCopy } },
    {
      userId: 'alice',
      entry: {
        [fullNames.Receipt]: { messageId: 'm-1', by: 'bob', status: 'delivered', at: t0 },
      },
    },
    {
      userId: 'bob',
      entry: {
        [fullNames.GroupEvent]: {
          groupId: 'g-1',
          version: 1,
          by: 'alice',
          at: t0,
          change: { [fullNames.GroupCreated]: { name: 'Friends', members } },
        },
      },
    },
    {
      userId: 'carol',
      entry: {
        [fullNames.Rejection]: {
          messageId: 'm-2',
          id: 'c2',
          code: 'not_member',
          message: 'you are not a member of this group',
        },
      },
    },
  ],
  UserCommand: [
    {
      userId: 'bob',
      at: t0,
      command: { [fullNames.Ack]: { deviceId: 'default', upTo: 7, continued: false } },
    },
    {
      userId: 'bob',
      at: t0,
      command: {
        [fullNames.Read]: { deviceId: 'phone', messageId: 'm-1', connectionId: 'c-1', id: 'r1' },
      },
    },
    {
      userId: 'bob',
      at: t0,
      command: {
        [fullNames.DeviceRegistered]: { deviceId: 'phone', pushToken: 'tok', platform: 'android' },
      },
    },
    {
      userId: 'bob',
      at: t0,
      command: { [fullNames.DeviceRemoved]: { deviceId: 'phone', pushToken: null } },
    },
    { userId: 'bob', at: t0, command: { [fullNames.Typing]: typing } },
    {
      userId: 'bob',
      at: t0,
      command: {
        [fullNames.Sync]: { deviceId: 'default', connectionId: 'c-1', after: 0, continued: false },
      },
    },
    {
      userId: 'bob',
      at: t0,
      command: {
        [fullNames.Sync]: { deviceId: 'default', connectionId: 'c-1', after: 256, continued: true },
      },
    },
  ],
  GroupMessage: [
    {
      groupId: 'g-1',
      payload: {
        [fullNames.GroupSend]: {
          messageId: 'm-3',
          id: 'c3',
          from: 'alice',
          body: 'null',
          sentAt: t0,
        },
      },
    },
    { groupId: 'g-1', payload: { [fullNames.Typing]: typing } },
  ],
  GroupCommand: [
    {
      groupId: 'g-1',
      correlationId: 'r-1',
      replyTo: 'api-1',
      by: 'alice',
      at: t0,
      command: { [fullNames.CreateGroup]: { name: 'Friends', members: ['bob'] } },
    },
    {
      groupId: 'g-1',
      correlationId: 'r-2',
      replyTo: 'api-1',
      by: 'alice',
      at: t0,
      command: { [fullNames.RenameGroup]: { name: 'Best friends' } },
    },
    {
      groupId: 'g-1',
      correlationId: 'r-3',
      replyTo: 'api-2',
      by: 'alice',
      at: t0,
      command: { [fullNames.AddMembers]: { members: ['carol', 'dave'] } },
    },
    {
      groupId: 'g-1',
      correlationId: 'r-4',
      replyTo: 'api-2',
      by: 'bob',
      at: t0,
      command: { [fullNames.RemoveMember]: { userId: 'bob' } },
    },
    {
      groupId: 'g-1',
      correlationId: 'r-5',
      replyTo: 'api-2',
      by: 'alice',
      at: t0,
      command: { [fullNames.SetRole]: { userId: 'carol', role: 'admin' } },
    },
  ],
  GroupEvent: [
    {
      groupId: 'g-1',
      version: 2,
      by: 'alice',
      at: t0,
      change: { [fullNames.GroupRenamed]: { name: 'Best friends' } },
    },
    {
      groupId: 'g-1',
      version: 3,
      by: 'alice',
      at: t0,
      change: { [fullNames.MembersAdded]: { members: [{ userId: 'carol', role: 'member' }] } },
    },
    {
      groupId: 'g-1',
      version: 4,
      by: 'bob',
      at: t0,
      change: { [fullNames.MemberRemoved]: { userId: 'bob' } },
    },
    {
      groupId: 'g-1',
      version: 5,
      by: 'alice',
      at: t0,
      change: { [fullNames.RoleChanged]: { userId: 'carol', role: 'admin' } },
    },
  ],
  CommandReply: [
    {
      correlationId: 'r-1',
      at: t0,
      result: {
        [fullNames.Group]: { groupId: 'g-1', name: 'Friends', members, createdAt: t0, version: 1 },
      },
    },
    {
      correlationId: 'r-2',
      at: t0,
      result: {
        [fullNames.CommandError]: {
          code: 'bad_request',
          message: 'unknown users: zed',
          field: 'members',
        },
      },
    },
  ],
  Delivery: [
    {
      userId: 'bob',
      targets: [{ deviceId: 'default', connectionId: 'c-1' }],
      frame: { [fullNames.InboxEntry]: inboxEntry },
      more: false,
    },
    {
      userId: 'bob',
      targets: [{ deviceId: 'default', connectionId: 'c-1' }],
      frame: { [fullNames.InboxEntry]: inboxEntry },
      more: true,
    },
    {
      userId: 'bob',
      targets: [
        { deviceId: 'default', connectionId: 'c-1' },
        { deviceId: 'phone', connectionId: 'c-9' },
      ],
      frame: { [fullNames.Typing]: typing },
      more: false,
    },
    {
      userId: 'bob',
      targets: [{ deviceId: 'phone', connectionId: 'c-9' }],
      frame: {
        [fullNames.ErrorFrame]: { id: 'r1', code: 'unknown_message', message: 'no such message' },
      },
      more: false,
    },
  ],
  Account: [{ userId: 'alice', displayName: 'Alice', createdAt: t0 }],
  GatewayHeartbeat: [{ gatewayId: 'gw-1', at: t0, startedAt: t0 - 60_000 }],
  PushRequest: [
    {
      userId: 'bob',
      seq: 12,
      messageId: 'm-1',
      from: 'alice',
      group: null,
      devices: [{ deviceId: 'phone', pushToken: 'tok', platform: null }],
      notification: { title: 'Alice', body: 'héllo' },
      at: t0,
    },
  ],
  InboxEntry: [inboxEntry],
};

function rawSchema(name: SchemaName): Json {
  return loadSchema(name) as Json;
}

/** Calls `visit` on every record, enum and fixed definition and every field of a schema. */
function walkDefinitions(
  node: Json,
  visit: (what: string, node: { [key: string]: Json }, isField: boolean) => void,
): void {
  if (Array.isArray(node)) {
    node.forEach((n) => walkDefinitions(n, visit));
  } else if (node !== null && typeof node === 'object') {
    const kind = node['type'];
    if (kind === 'record' || kind === 'error' || kind === 'enum' || kind === 'fixed') {
      visit(String(node['name']), node, false);
    }
    const fields = node['fields'];
    if (Array.isArray(fields)) {
      for (const field of fields) {
        if (field === null || typeof field !== 'object' || Array.isArray(field)) continue;
        visit(`${String(node['name'])}.${String(field['name'])}`, field, true);
        walkDefinitions(field['type'] ?? null, visit);
      }
    }
    if (typeof kind === 'object') walkDefinitions(kind, visit);
    walkDefinitions(node['items'] ?? null, visit);
    walkDefinitions(node['values'] ?? null, visit);
  }
}

/** The branch names of every wrapped union within a type. */
function wrappedBranches(type: Type, seen = new Set<Type>(), out = new Set<string>()): Set<string> {
  if (seen.has(type)) return out;
  seen.add(type);
  if (type instanceof avro.types.WrappedUnionType) {
    type.types.forEach((t) => {
      if (t.branchName !== undefined && t.typeName !== 'null') out.add(t.branchName);
    });
  }
  const children: Type[] =
    type instanceof avro.types.RecordType
      ? type.fields.map((f) => f.type)
      : type instanceof avro.types.WrappedUnionType || type instanceof avro.types.UnwrappedUnionType
        ? type.types
        : type instanceof avro.types.ArrayType
          ? [type.itemsType]
          : type instanceof avro.types.MapType
            ? [type.valuesType as Type]
            : [];
  children.forEach((t) => wrappedBranches(t, seen, out));
  return out;
}

/** The keys of every object within a value (the branch names of its wrapped unions among them). */
function keysWithin(value: unknown, out = new Set<string>()): Set<string> {
  if (value !== null && typeof value === 'object') {
    for (const [key, inner] of Object.entries(value)) {
      out.add(key);
      keysWithin(inner, out);
    }
  }
  return out;
}

describe('Avro schemas', () => {
  it('has one .avsc per schema name, each a chat.v1 record named after its file', () => {
    for (const name of schemaNames) {
      const type = loadType(name);
      assert.equal(type.typeName, 'record');
      assert.equal(type.name, `chat.v1.${name}`);
      assert.equal(type.name, schemaFullNames[name]);
    }
  });

  it('parses every schema with fresh options each time (avsc keeps its registry in them)', () => {
    const options = avroTypeOptions();
    avro.Type.forSchema(loadSchema('InboxCommand'), options);
    assert.throws(
      () => avro.Type.forSchema(loadSchema('InboxEntry'), options),
      /duplicate type name/,
    );
    assert.notEqual(avroTypeOptions(), avroTypeOptions());
    for (const name of schemaNames) avro.Type.forSchema(loadSchema(name), avroTypeOptions());
  });

  for (const name of schemaNames) {
    it(`round-trips ${name} samples to the same value`, () => {
      const type = loadType(name);
      for (const sample of samples[name]) {
        assert.ok(type.isValid(sample, { noUndeclaredFields: true }), JSON.stringify(sample));
        const decoded: unknown = type.fromBuffer(type.toBuffer(sample));
        // Decoded records are instances of avsc classes: compare their plain copies.
        assert.deepStrictEqual(structuredClone(decoded), sample);
      }
    });
  }

  it('has samples covering every branch of every wrapped union', () => {
    const seen = keysWithin(samples);
    for (const name of schemaNames) {
      for (const branch of wrappedBranches(loadType(name))) {
        assert.ok(seen.has(branch), `no sample with the branch ${branch} (of ${name})`);
      }
    }
  });

  it('has a doc on every record, enum and field', () => {
    for (const name of schemaNames) {
      walkDefinitions(rawSchema(name), (what, node) => {
        const doc = node['doc'];
        assert.ok(typeof doc === 'string' && doc.trim() !== '', `${name}.avsc: ${what} has no doc`);
      });
    }
  });

  it('spells timestamps as timestamp-millis longs and optional fields as ["null", T] = null', () => {
    for (const name of schemaNames) {
      walkDefinitions(rawSchema(name), (what, field, isField) => {
        if (isField) {
          const fieldName = String(field['name']);
          if (fieldName === 'at' || fieldName.endsWith('At')) {
            assert.deepEqual(
              field['type'],
              { type: 'long', logicalType: 'timestamp-millis' },
              `${name}.avsc: ${what}`,
            );
          }
          const type = field['type'];
          if (Array.isArray(type) && type.includes('null')) {
            assert.equal(type[0], 'null', `${name}.avsc: ${what}: null comes first`);
            assert.equal(type.length, 2, `${name}.avsc: ${what}: one type besides null`);
            assert.equal(field['default'], null, `${name}.avsc: ${what}: default null`);
          }
        }
      });
    }
  });

  it('is what schemas/types.generated.ts was generated from (npx tsx scripts/gen-types.ts)', async () => {
    assert.equal(await generateTypes(), readFileSync(generatedTypesFile, 'utf8'));
  });

  it('unwraps a wrapped union with branchOf, narrowing on the branch name', () => {
    const decoded = loadType('InboxEntry').fromBuffer(
      loadType('InboxEntry').toBuffer(inboxEntry),
    ) as InboxEntry;
    const { name, value } = branchOf(decoded.entry);
    switch (name) {
      case fullNames.MessageCopy:
        assert.equal(value.body, messageCopy.body);
        break;
      default:
        assert.fail(`unexpected branch ${name}`);
    }
    assert.throws(() => branchOf({}), /not a wrapped union value/);
  });

  it('gives every schema a topic, chat.deliveries.<gatewayId> included', () => {
    const values = new Set([
      ...Object.values(topicSpecs).map((s) => s.value),
      deliveriesTopicSpec.value,
    ]);
    assert.deepEqual([...values].sort(), [...schemaNames].sort());
    assert.equal(topicSpec(deliveriesTopic('gw-1'))?.value, 'Delivery');
    assert.equal(topicSpec('chat.accounts')?.compacted, true);
    assert.equal(topicSpec('chat.deliveries.'), undefined);
  });
});
