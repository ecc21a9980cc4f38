import assert from 'node:assert/strict';
import type { IncomingMessage } from 'node:http';
import { Duplex } from 'node:stream';
import { loadType } from '../../schemas/avro.ts';
import {
  fullNames,
  type Delivery,
  type GroupEvent,
  type InboxEntry,
  type Typing,
} from '../../schemas/types.generated.ts';
import {
  deliveryFrame,
  errorFrame,
  inboxEntryFrame,
  parseClientFrame,
  pongFrame,
  readyFrame,
  sentFrame,
  serialize,
  typingFrame,
  type ClientFrame,
  type FrameError,
  type ServerFrame,
} from '../../gateway/frames.ts';
import { MAX_BODY_BYTES, rateLimitPerSecond } from '../../gateway/limits.ts';
import { messageIdFor } from '../../gateway/message-id.ts';
import { TokenBucket } from '../../gateway/rate-limit.ts';
import {
  accessTokenOf,
  authenticate,
  deviceIdOf,
  HandshakeRefusal,
  refuseUpgrade,
} from '../../gateway/authentication.ts';

const t0 = Date.UTC(2025, 0, 1);
const user = (userId: string) => ({ kind: 'user' as const, userId });
const group = (groupId: string) => ({ kind: 'group' as const, groupId });

/** A body whose JSON serialization is exactly `bytes` UTF-8 bytes: a string of x's. */
const bodyOf = (bytes: number) => 'x'.repeat(bytes - 2);

describe('gateway frames: parsing client frames', () => {
  const accepted: [string, unknown, ClientFrame][] = [
    ['ping', { type: 'ping' }, { type: 'ping' }],
    ['ping with an id', { type: 'ping', id: 'p1' }, { type: 'ping', id: 'p1' }],
    [
      'send to a user',
      { type: 'send', id: 'c1', to: 'bob', body: { text: 'hi' } },
      { type: 'send', id: 'c1', recipient: user('bob'), body: '{"text":"hi"}' },
    ],
    [
      'send: to is case-folded',
      { type: 'send', id: 'c1', to: 'Bob.Smith_1-x', body: 1 },
      { type: 'send', id: 'c1', recipient: user('bob.smith_1-x'), body: '1' },
    ],
    [
      'send: integers within ±(2^53 - 1), and floats past 10^21',
      { type: 'send', id: 'c1', to: 'bob', body: [9007199254740991, -9007199254740991, 1.5e300] },
      {
        type: 'send',
        id: 'c1',
        recipient: user('bob'),
        body: '[9007199254740991,-9007199254740991,1.5e+300]',
      },
    ],
    [
      'send: surrogate pairs (emoji), in strings and keys',
      { type: 'send', id: 'c1', to: 'bob', body: { '\ud83d\ude00': '\ud83d\udc4d \u00e9' } },
      { type: 'send', id: 'c1', recipient: user('bob'), body: '{"😀":"👍 é"}' },
    ],
    [
      'send to a group',
      { type: 'send', id: 'c2', group: 'g-1', body: 'hello' },
      { type: 'send', id: 'c2', recipient: group('g-1'), body: '"hello"' },
    ],
    [
      'send: a null to counts as absent',
      { type: 'send', id: 'c2', to: null, group: 'g-1', body: [] },
      { type: 'send', id: 'c2', recipient: group('g-1'), body: '[]' },
    ],
    [
      'send: a null body is a JSON value',
      { type: 'send', id: 'c3', to: 'bob', body: null },
      { type: 'send', id: 'c3', recipient: user('bob'), body: 'null' },
    ],
    [
      'send: from is ignored',
      { type: 'send', id: 'c4', to: 'bob', from: 'mallory', body: {} },
      { type: 'send', id: 'c4', recipient: user('bob'), body: '{}' },
    ],
    [
      'send: a body of exactly the limit',
      { type: 'send', id: 'c5', to: 'bob', body: bodyOf(MAX_BODY_BYTES) },
      {
        type: 'send',
        id: 'c5',
        recipient: user('bob'),
        body: JSON.stringify(bodyOf(MAX_BODY_BYTES)),
      },
    ],
    [
      'send: an id of 64 printable characters, space and tilde included',
      { type: 'send', id: ` ~${'a'.repeat(62)}`, to: 'bob', body: 0 },
      { type: 'send', id: ` ~${'a'.repeat(62)}`, recipient: user('bob'), body: '0' },
    ],
    ['ack', { type: 'ack', upTo: 7 }, { type: 'ack', upTo: 7 }],
    ['ack of 0', { type: 'ack', upTo: 0, id: 'a' }, { type: 'ack', upTo: 0, id: 'a' }],
    [
      'ack of 2^53 - 1, as the largest seq an event holds',
      { type: 'ack', upTo: Number.MAX_SAFE_INTEGER },
      { type: 'ack', upTo: Number.MAX_SAFE_INTEGER - 1 },
    ],
    [
      'sync after 2^53 - 1, as the largest seq an event holds',
      { type: 'sync', after: Number.MAX_SAFE_INTEGER },
      { type: 'sync', after: Number.MAX_SAFE_INTEGER - 1 },
    ],
    ['read', { type: 'read', messageId: 'm-1' }, { type: 'read', messageId: 'm-1' }],
    [
      'typing to a user',
      { type: 'typing', to: 'BOB', state: 'start' },
      { type: 'typing', recipient: user('bob'), state: 'start' },
    ],
    [
      'typing to a group',
      { type: 'typing', group: 'g-1', state: 'stop', id: 't' },
      { type: 'typing', recipient: group('g-1'), state: 'stop', id: 't' },
    ],
    ['sync', { type: 'sync', after: 0 }, { type: 'sync', after: 0 }],
    [
      'unknown fields are ignored',
      { type: 'sync', after: 3, extra: { deep: true } },
      { type: 'sync', after: 3 },
    ],
  ];
  for (const [name, input, expected] of accepted) {
    it(`accepts ${name}`, () => {
      assert.deepEqual(parseClientFrame(JSON.stringify(input)), { frame: expected });
    });
  }

  it('accepts only seqs that the UserCommand schema can carry', () => {
    const userCommand = loadType('UserCommand');
    for (const [type, field] of [
      ['ack', 'upTo'],
      ['sync', 'after'],
    ] as const) {
      const parsed = parseClientFrame(JSON.stringify({ type, [field]: Number.MAX_SAFE_INTEGER }));
      const seq = (parsed.frame as unknown as Record<string, number>)[field]!;
      const command =
        type === 'ack'
          ? { 'chat.v1.Ack': { deviceId: 'd', upTo: seq, continued: false } }
          : { 'chat.v1.Sync': { deviceId: 'd', connectionId: 'c', after: seq, continued: false } };
      assert.ok(userCommand.isValid({ userId: 'u', at: 0, command }), `${type} ${seq}`);
    }
  });

  const badId = 'id must be 1 to 64 printable ASCII characters';
  const refused: [string, string, FrameError][] = [
    [
      'text that is not JSON',
      'hello',
      { code: 'bad_frame', message: 'a frame must be a JSON object' },
    ],
    [
      'truncated JSON',
      '{"type":"ping"',
      { code: 'bad_frame', message: 'a frame must be a JSON object' },
    ],
    ['an array', '[1]', { code: 'bad_frame', message: 'a frame must be a JSON object' }],
    ['a string', '"ping"', { code: 'bad_frame', message: 'a frame must be a JSON object' }],
    ['null', 'null', { code: 'bad_frame', message: 'a frame must be a JSON object' }],
    ['a number', '42', { code: 'bad_frame', message: 'a frame must be a JSON object' }],
    ['no type', '{}', { code: 'bad_frame', message: 'type is missing' }],
    [
      'no type, with an id',
      '{"id":"c1"}',
      { code: 'bad_frame', message: 'type is missing', id: 'c1' },
    ],
    [
      'a numeric type',
      '{"type":5,"id":"c1"}',
      { code: 'bad_frame', message: 'type must be a string', id: 'c1' },
    ],
    [
      'an unknown type',
      '{"type":"shout","id":"c1"}',
      { code: 'bad_frame', message: 'unknown frame type "shout"', id: 'c1' },
    ],
    ['an empty id', '{"type":"ping","id":""}', { code: 'bad_frame', message: badId }],
    ['a numeric id', '{"type":"ping","id":7}', { code: 'bad_frame', message: badId }],
    [
      'an id of 65 characters',
      JSON.stringify({ type: 'ping', id: 'a'.repeat(65) }),
      { code: 'bad_frame', message: badId },
    ],
    [
      'an id with a newline',
      JSON.stringify({ type: 'ping', id: 'a\nb' }),
      { code: 'bad_frame', message: badId },
    ],
    [
      'an id that is not ASCII',
      JSON.stringify({ type: 'ping', id: 'é' }),
      { code: 'bad_frame', message: badId },
    ],
    [
      'a send without id',
      JSON.stringify({ type: 'send', to: 'bob', body: 1 }),
      { code: 'bad_frame', message: 'a send frame needs an id' },
    ],
    [
      'a send with to and group',
      JSON.stringify({ type: 'send', id: 'c1', to: 'bob', group: 'g', body: 1 }),
      { code: 'bad_frame', message: 'give either to or group, not both', id: 'c1' },
    ],
    [
      'a send with neither to nor group',
      JSON.stringify({ type: 'send', id: 'c1', body: 1 }),
      { code: 'bad_frame', message: 'to or group is missing', id: 'c1' },
    ],
    ...['bo', 'b'.repeat(33), 'bob!', 'bob smith', 'böb', '\u212aate'].map(
      (to): [string, string, FrameError] => [
        `a send to the invalid userId "${to}"`,
        JSON.stringify({ type: 'send', id: 'c1', to, body: 1 }),
        {
          code: 'bad_frame',
          message: 'to must be a userId: 3 to 32 characters of a-z, 0-9, "_", "." and "-"',
          id: 'c1',
        },
      ],
    ),
    ...['1e400', '-1e400', '9007199254740992', '[1, {"n": -9007199254740993}]'].map(
      (body): [string, string, FrameError] => [
        `a send whose body holds ${body}, past what a double holds exactly`,
        `{"type":"send","id":"c1","to":"bob","body":${body}}`,
        {
          code: 'bad_frame',
          message: `body holds a number past what a double holds exactly (${JSON.parse(body.replace(/.*?(-?[0-9e]{5,}).*/, '$1'))}): integers must be within ±(2^53 - 1), and no number may overflow (send larger ones as strings)`,
          id: 'c1',
        },
      ],
    ),
    ...[
      '"\\ud800"',
      '{"text":"\\udfff x"}',
      '{"\\udbff":1}',
      '["ok", ["\\ud83d"]]',
      '"\\ude00\\ud83d"',
    ].map((body): [string, string, FrameError] => [
      `a send whose body holds a lone surrogate: ${body}`,
      `{"type":"send","id":"c1","to":"bob","body":${body}}`,
      {
        code: 'bad_frame',
        message: 'body holds a lone UTF-16 surrogate (a \\uD800 to \\uDFFF escape not in a pair)',
        id: 'c1',
      },
    ]),
    [
      'a send to a number',
      JSON.stringify({ type: 'send', id: 'c1', to: 5, body: 1 }),
      { code: 'bad_frame', message: 'to must be a userId string', id: 'c1' },
    ],
    [
      'a send to an empty group',
      JSON.stringify({ type: 'send', id: 'c1', group: '', body: 1 }),
      { code: 'bad_frame', message: 'group must be a string of 1 to 128 characters', id: 'c1' },
    ],
    [
      'a send to a group id of 129 characters',
      JSON.stringify({ type: 'send', id: 'c1', group: 'g'.repeat(129), body: 1 }),
      { code: 'bad_frame', message: 'group must be a string of 1 to 128 characters', id: 'c1' },
    ],
    [
      'a send without body',
      JSON.stringify({ type: 'send', id: 'c1', to: 'bob' }),
      { code: 'bad_frame', message: 'body is missing', id: 'c1' },
    ],
    [
      'a send with a body one byte over the limit',
      JSON.stringify({ type: 'send', id: 'c1', to: 'bob', body: bodyOf(MAX_BODY_BYTES + 1) }),
      {
        code: 'too_large',
        message: 'body is 16385 bytes serialized; at most 16384 are allowed',
        id: 'c1',
      },
    ],
    [
      'a send whose body is over the limit in UTF-8 bytes, not characters',
      JSON.stringify({ type: 'send', id: 'c1', to: 'bob', body: 'é'.repeat(8192) }),
      {
        code: 'too_large',
        message: 'body is 16386 bytes serialized; at most 16384 are allowed',
        id: 'c1',
      },
    ],
    [
      'an ack without upTo',
      '{"type":"ack","id":"a1"}',
      { code: 'bad_frame', message: 'upTo is missing', id: 'a1' },
    ],
    ...[
      ['a string', '"5"'],
      ['negative', '-1'],
      ['a fraction', '1.5'],
      ['above 2^53', '9007199254740993'],
    ].map(([what, upTo]): [string, string, FrameError] => [
      `an ack with upTo ${what}`,
      `{"type":"ack","id":"a1","upTo":${upTo}}`,
      { code: 'bad_frame', message: 'upTo must be an integer seq, 0 or more', id: 'a1' },
    ]),
    [
      'a read without messageId',
      '{"type":"read","id":"r"}',
      { code: 'bad_frame', message: 'messageId is missing', id: 'r' },
    ],
    [
      'a read with an empty messageId',
      '{"type":"read","messageId":""}',
      { code: 'bad_frame', message: 'messageId must be a string of 1 to 128 characters' },
    ],
    [
      'a read with a numeric messageId',
      '{"type":"read","messageId":5,"id":"r"}',
      { code: 'bad_frame', message: 'messageId must be a string of 1 to 128 characters', id: 'r' },
    ],
    [
      'a typing without state',
      '{"type":"typing","to":"bob","id":"t"}',
      { code: 'bad_frame', message: 'state must be "start" or "stop"', id: 't' },
    ],
    [
      'a typing with an unknown state',
      '{"type":"typing","to":"bob","state":"typing"}',
      { code: 'bad_frame', message: 'state must be "start" or "stop"' },
    ],
    [
      'a typing to nobody',
      '{"type":"typing","state":"start","id":"t"}',
      { code: 'bad_frame', message: 'to or group is missing', id: 't' },
    ],
    [
      'a typing to a user and a group',
      '{"type":"typing","to":"bob","group":"g","state":"start","id":"t"}',
      { code: 'bad_frame', message: 'give either to or group, not both', id: 't' },
    ],
    ['a sync without after', '{"type":"sync"}', { code: 'bad_frame', message: 'after is missing' }],
    [
      'a sync with a negative after',
      '{"type":"sync","after":-3,"id":"s"}',
      { code: 'bad_frame', message: 'after must be an integer seq, 0 or more', id: 's' },
    ],
  ];
  for (const [name, text, expected] of refused) {
    it(`refuses ${name}`, () => {
      assert.deepEqual(parseClientFrame(text), { error: expected });
    });
  }
});

describe('gateway frames: server frames', () => {
  const entry = (e: InboxEntry['entry'], seq = 5): InboxEntry => ({
    userId: 'bob',
    seq,
    at: t0 + 10,
    entry: e,
  });
  const groupEvent = (change: GroupEvent['change']): InboxEntry['entry'] => ({
    [fullNames.GroupEvent]: { groupId: 'g-1', version: 3, by: 'alice', at: t0 + 5, change },
  });
  const members = [
    { userId: 'alice', role: 'admin' as const },
    { userId: 'bob', role: 'member' as const },
  ];

  const fromEntries: [string, InboxEntry, ServerFrame][] = [
    [
      'a one-to-one message copy',
      entry({
        [fullNames.MessageCopy]: {
          messageId: 'm-1',
          from: 'alice',
          to: 'bob',
          group: null,
          body: '{"text":"héllo","n":[1,2]}',
          sentAt: t0,
        },
      }),
      {
        type: 'message',
        seq: 5,
        messageId: 'm-1',
        from: 'alice',
        to: 'bob',
        body: { text: 'héllo', n: [1, 2] },
        sentAt: t0,
      },
    ],
    [
      'a group message copy',
      entry({
        [fullNames.MessageCopy]: {
          messageId: 'm-2',
          from: 'alice',
          to: null,
          group: 'g-1',
          body: '"hi"',
          sentAt: t0,
        },
      }),
      {
        type: 'message',
        seq: 5,
        messageId: 'm-2',
        from: 'alice',
        group: 'g-1',
        body: 'hi',
        sentAt: t0,
      },
    ],
    [
      'a delivered receipt',
      entry({
        [fullNames.Receipt]: { messageId: 'm-1', by: 'bob', status: 'delivered', at: t0 + 1 },
      }),
      { type: 'receipt', seq: 5, messageId: 'm-1', by: 'bob', status: 'delivered', at: t0 + 1 },
    ],
    [
      'a read receipt',
      entry({ [fullNames.Receipt]: { messageId: 'm-1', by: 'bob', status: 'read', at: t0 + 2 } }),
      { type: 'receipt', seq: 5, messageId: 'm-1', by: 'bob', status: 'read', at: t0 + 2 },
    ],
    [
      'a rejection',
      entry({
        [fullNames.Rejection]: {
          messageId: 'm-3',
          id: 'c7',
          code: 'not_member',
          message: 'not a member',
        },
      }),
      {
        type: 'rejected',
        seq: 5,
        messageId: 'm-3',
        id: 'c7',
        code: 'not_member',
        message: 'not a member',
      },
    ],
    [
      'a group created',
      entry(groupEvent({ [fullNames.GroupCreated]: { name: 'friends', members } })),
      {
        type: 'group',
        seq: 5,
        groupId: 'g-1',
        by: 'alice',
        version: 3,
        at: t0 + 5,
        event: 'created',
        name: 'friends',
        members,
      },
    ],
    [
      'a group renamed',
      entry(groupEvent({ [fullNames.GroupRenamed]: { name: 'family' } })),
      {
        type: 'group',
        seq: 5,
        groupId: 'g-1',
        by: 'alice',
        version: 3,
        at: t0 + 5,
        event: 'renamed',
        name: 'family',
      },
    ],
    [
      'members added',
      entry(groupEvent({ [fullNames.MembersAdded]: { members: [members[1]!] } })),
      {
        type: 'group',
        seq: 5,
        groupId: 'g-1',
        by: 'alice',
        version: 3,
        at: t0 + 5,
        event: 'member_added',
        members: [{ userId: 'bob', role: 'member' }],
      },
    ],
    [
      'a member removed',
      entry(groupEvent({ [fullNames.MemberRemoved]: { userId: 'bob' } })),
      {
        type: 'group',
        seq: 5,
        groupId: 'g-1',
        by: 'alice',
        version: 3,
        at: t0 + 5,
        event: 'member_removed',
        userId: 'bob',
      },
    ],
    [
      'a role changed',
      entry(groupEvent({ [fullNames.RoleChanged]: { userId: 'bob', role: 'admin' } })),
      {
        type: 'group',
        seq: 5,
        groupId: 'g-1',
        by: 'alice',
        version: 3,
        at: t0 + 5,
        event: 'role_changed',
        userId: 'bob',
        role: 'admin',
      },
    ],
  ];
  const inboxEntryType = loadType('InboxEntry');
  for (const [name, value, expected] of fromEntries) {
    it(`turns ${name} into its ${expected.type} frame`, () => {
      assert.deepStrictEqual(inboxEntryFrame(value), expected);
    });
    it(`turns ${name}, as avsc decodes it, into the same wire text`, () => {
      const decoded = inboxEntryType.fromBuffer(inboxEntryType.toBuffer(value)) as InboxEntry;
      assert.equal(serialize(inboxEntryFrame(decoded)), JSON.stringify(expected));
    });
  }

  it('writes the fields of a message frame in PROTOCOL order', () => {
    assert.equal(
      serialize(fromEntries[0]![2]),
      '{"type":"message","seq":5,"messageId":"m-1","from":"alice","to":"bob",' +
        '"body":{"text":"héllo","n":[1,2]},"sentAt":1735689600000}',
    );
  });

  it('builds ready, sent, error and pong frames', () => {
    assert.equal(
      serialize(readyFrame('alice', 'phone')),
      '{"type":"ready","userId":"alice","deviceId":"phone"}',
    );
    assert.equal(
      serialize(sentFrame('c1', 'm-1', t0)),
      '{"type":"sent","id":"c1","messageId":"m-1","at":1735689600000}',
    );
    assert.equal(
      serialize(errorFrame({ code: 'unknown_recipient', message: 'no user "zed"', id: 'c1' })),
      '{"type":"error","id":"c1","code":"unknown_recipient","message":"no user \\"zed\\""}',
    );
    assert.deepStrictEqual(errorFrame({ code: 'bad_frame', message: 'm' }), {
      type: 'error',
      code: 'bad_frame',
      message: 'm',
    });
    assert.equal(serialize(pongFrame()), '{"type":"pong"}');
    assert.equal(serialize(pongFrame('p1')), '{"type":"pong","id":"p1"}');
  });

  it('builds typing frames, with to or group', () => {
    const oneToOne: Typing = { from: 'alice', to: 'bob', group: null, state: 'start', at: t0 };
    const inGroup: Typing = { from: 'alice', to: null, group: 'g-1', state: 'stop', at: t0 };
    assert.deepStrictEqual(typingFrame(oneToOne), {
      type: 'typing',
      from: 'alice',
      to: 'bob',
      state: 'start',
    });
    assert.deepStrictEqual(typingFrame(inGroup), {
      type: 'typing',
      from: 'alice',
      group: 'g-1',
      state: 'stop',
    });
  });

  it('builds the frame of each Delivery branch', () => {
    const typing: Typing = { from: 'alice', to: 'bob', group: null, state: 'start', at: t0 };
    const frames: Delivery['frame'][] = [
      { [fullNames.InboxEntry]: fromEntries[2]![1] },
      { [fullNames.Typing]: typing },
    ];
    assert.deepStrictEqual(
      frames.map((f) => deliveryFrame(f).type),
      ['receipt', 'typing'],
    );
  });

  it('sends a body that is not JSON text as the text itself', () => {
    const frame = inboxEntryFrame(
      entry({
        [fullNames.MessageCopy]: {
          messageId: 'm',
          from: 'a',
          to: 'b',
          group: null,
          body: 'not json',
          sentAt: t0,
        },
      }),
    );
    assert.equal((frame as { body: unknown }).body, 'not json');
  });
});

describe('gateway: message ids', () => {
  it('is deterministic: the same triple gives the same id', () => {
    assert.equal(messageIdFor('alice', 'phone', 'c1'), messageIdFor('alice', 'phone', 'c1'));
    assert.match(messageIdFor('alice', 'phone', 'c1'), /^[A-Za-z0-9_-]{43}$/);
  });

  it('differs for another sender, device or client id, even when the concatenation is equal', () => {
    const ids = new Set([
      messageIdFor('alice', 'phone', 'c1'),
      messageIdFor('bob', 'phone', 'c1'),
      messageIdFor('alice', 'laptop', 'c1'),
      messageIdFor('alice', 'phone', 'c2'),
      messageIdFor('alice', 'phonec', '1'),
      messageIdFor('alicep', 'hone', 'c1'),
    ]);
    assert.equal(ids.size, 6);
  });
});

describe('gateway: rate limit', () => {
  it('lets a burst of four times the rate through, then refills at the rate', () => {
    let now = 1000;
    const bucket = new TokenBucket(5, () => now);
    assert.equal(bucket.capacity, 20);
    const burst = Array.from({ length: 25 }, () => bucket.take());
    assert.equal(burst.filter(Boolean).length, 20);
    assert.deepEqual(burst.slice(20), [false, false, false, false, false]);
    now += 200; // one token at 5 per second
    assert.equal(bucket.take(), true);
    assert.equal(bucket.take(), false);
    now += 60_000; // never more than the capacity
    assert.equal(Array.from({ length: 30 }, () => bucket.take()).filter(Boolean).length, 20);
  });

  it('reads RATE_LIMIT_PER_S, 50 by default', () => {
    assert.equal(rateLimitPerSecond({}), 50);
    assert.equal(rateLimitPerSecond({ RATE_LIMIT_PER_S: '1000' }), 1000);
    assert.throws(() => rateLimitPerSecond({ RATE_LIMIT_PER_S: 'fast' }), RangeError);
    assert.throws(() => rateLimitPerSecond({ RATE_LIMIT_PER_S: '0' }), RangeError);
  });
});

describe('gateway: authentication', () => {
  const request = (url: string, authorization?: string) =>
    ({ url, headers: authorization === undefined ? {} : { authorization } }) as IncomingMessage;
  const verify = async (token: string) => {
    if (token !== 'good') throw new Error('bad token');
    return 'alice';
  };
  const refusal = async (promise: Promise<unknown>) => {
    const error = await promise.then(
      () => assert.fail('accepted'),
      (e: unknown) => e,
    );
    assert.ok(error instanceof HandshakeRefusal);
    return { status: error.status, body: error.body() };
  };

  it('takes the bearer header first, then the access_token query parameter', () => {
    const url = new URL('http://h/v1/ws?access_token=q');
    assert.equal(accessTokenOf(request('/', 'Bearer h'), url), 'h');
    assert.equal(accessTokenOf(request('/', 'bearer  h '), url), 'h');
    assert.equal(accessTokenOf(request('/', 'Basic xyz'), url), 'q');
    assert.equal(accessTokenOf(request('/'), new URL('http://h/v1/ws?access_token=')), undefined);
  });

  it('defaults the deviceId and refuses a bad one with 400 naming the field', async () => {
    assert.equal(deviceIdOf(new URL('http://h/v1/ws')), 'default');
    assert.equal(
      deviceIdOf(new URL(`http://h/v1/ws?deviceId=${'A_-9'.repeat(16)}`)),
      'A_-9'.repeat(16),
    );
    for (const bad of ['', 'a.b', 'a b', 'x'.repeat(65), 'é']) {
      const url = `/v1/ws?deviceId=${encodeURIComponent(bad)}`;
      assert.deepEqual(await refusal(authenticate(request(url, 'Bearer good'), verify)), {
        status: 400,
        body: {
          error: {
            code: 'bad_request',
            message: 'deviceId must be 1 to 64 characters of A-Z, a-z, 0-9, "_" and "-"',
            field: 'deviceId',
          },
        },
      });
    }
  });

  it('refuses a missing or invalid token with 401', async () => {
    assert.equal((await refusal(authenticate(request('/v1/ws'), verify))).status, 401);
    assert.deepEqual(await refusal(authenticate(request('/v1/ws', 'Bearer bad'), verify)), {
      status: 401,
      body: { error: { code: 'unauthorized', message: 'the access token is invalid or expired' } },
    });
  });

  it('resolves to the user and device', async () => {
    assert.deepEqual(
      await authenticate(request('/v1/ws?deviceId=phone&access_token=good'), verify),
      {
        userId: 'alice',
        deviceId: 'phone',
      },
    );
  });
});

describe('gateway handshake: refusing an upgrade', () => {
  it('survives a peer that resets the socket while the refusal is written', async () => {
    const errors: unknown[] = [];
    const onUncaught = (error: unknown) => errors.push(error);
    process.prependListener('uncaughtException', onUncaught);
    try {
      // A socket whose write fails as a reset one does: the error is emitted a tick later.
      const socket = new Duplex({
        read() {},
        write(_chunk, _encoding, done) {
          done(Object.assign(new Error('write ECONNRESET'), { code: 'ECONNRESET' }));
        },
      });
      refuseUpgrade(socket, new HandshakeRefusal(404, 'not_found', 'no WebSocket at /nope'));
      await new Promise((resolve) => setTimeout(resolve, 50));
      assert.deepEqual(errors, []);
      assert.ok(socket.destroyed);
    } finally {
      process.off('uncaughtException', onUncaught);
    }
  });
});
