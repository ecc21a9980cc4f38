/**
 * Records whose bytes are not what their header says: a few bytes of garbage must be a
 * DecodeError (dead-lettered or skipped by the reader), never a process that runs out of memory
 * or spins forever, which on a topic means every owner of the partition in turn (README:
 * "A record with ... truncated Avro is a DecodeError, never a crash").
 *
 * Each case decodes in a child process with a small heap and a deadline, so that the bug shows
 * as a failed test rather than as a test runner killed by V8.
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { DecodeError, TopicCodec } from '../../schemas/codec.ts';
import { loadType } from '../../schemas/avro.ts';
import type { SchemaRegistry } from '../../schemas/registry/port.ts';

const codecUrl = new URL('../../schemas/codec.ts', import.meta.url).href;
const avroUrl = new URL('../../schemas/avro.ts', import.meta.url).href;
const root = fileURLToPath(new URL('../../', import.meta.url));

/** The Avro zig-zag varint of a (signed) long, as counts and sizes are written. */
function zigzag(n: number): number[] {
  let z = n >= 0 ? 2 * n : -2 * n - 1;
  const bytes: number[] = [];
  while (z >= 0x80) {
    bytes.push((z % 0x80) | 0x80);
    z = Math.floor(z / 0x80);
  }
  bytes.push(z);
  return bytes;
}

/** A valid Delivery's Avro bytes, to follow forged ones. */
async function validDelivery(): Promise<number[]> {
  const { loadType } = await import('../../schemas/avro.ts');
  return [
    ...loadType('Delivery').toBuffer({
      userId: 'bob',
      targets: [],
      frame: {
        'chat.v1.Typing': { from: 'alice', to: 'bob', group: null, state: 'start', at: 1 },
      },
      more: false,
    }),
  ];
}

/** A writer-only field of strings. */
const TAGS = { name: 'tags', type: { type: 'array', items: 'string' }, default: [] };

/** Delivery as a newer writer has it: a field of its own (skipped when resolving) first. */
async function writerWith(field: object): Promise<object> {
  const { loadSchema } = await import('../../schemas/avro.ts');
  const writer = JSON.parse(JSON.stringify(loadSchema('Delivery'))) as { fields: object[] };
  writer.fields = [field, ...writer.fields];
  return writer;
}

/**
 * Decodes `bytes` (or what `expression` builds, in the child: too long for its arguments) with
 * a TopicCodec of schema `Delivery` (own id 7) in a child process; `writer`, when given, is the
 * schema the registry answers for any other id. Answers what the child printed: the decoded
 * value's keys, or the error's name and message.
 */
function decodeInChild(
  bytes: number[] | { expression: string },
  writer?: object,
): Promise<{ out: string; code: number | null; killed: boolean }> {
  const script = `
    const { TopicCodec } = await import(${JSON.stringify(codecUrl)});
    const { loadType } = await import(${JSON.stringify(avroUrl)});
    const writer = ${JSON.stringify(writer ? JSON.stringify(writer) : null)};
    const registry = { schemaById: async () => writer, register: async () => 7,
      latest: async () => undefined, close: async () => {} };
    const codec = new TopicCodec('chat.deliveries.gw-1', 7, loadType('Delivery'), registry);
    try {
      const value = await codec.decode(${'expression' in bytes ? bytes.expression : `Buffer.from(${JSON.stringify(bytes)})`});
      console.log('decoded ' + Object.keys(value).join(','));
    } catch (error) {
      console.log(error.name + ': ' + error.message);
    }
  `;
  return new Promise((resolve) => {
    execFile(
      process.execPath,
      ['--import', 'tsx', '--max-old-space-size=96', '--input-type=module', '-e', script],
      { cwd: root, timeout: 15_000, killSignal: 'SIGKILL' },
      (error, stdout) =>
        resolve({
          out: stdout.trim(),
          code: error ? ((error as { code?: number }).code ?? null) : 0,
          killed: Boolean(error && (error as { killed?: boolean }).killed),
        }),
    );
  });
}

describe('codec: forged records', function () {
  this.timeout(40_000);

  it('refuses an array block count larger than the record as a DecodeError, without running out of memory', async () => {
    // Header (schema id 7, the codec's own), userId "", then `targets` claiming 2^29 items:
    // ten bytes in all.
    const bytes = [0, 0, 0, 0, 7, 0x00, ...zigzag(2 ** 29)];
    const { out, code, killed } = await decodeInChild(bytes);
    assert.ok(!killed, `the decode did not finish in 15 s: ${out}`);
    assert.equal(code, 0, `the process died (exit ${code}): ${out}`);
    assert.match(out, /^DecodeError: /);
  });

  it('refuses a huge block count in a field only the writer has, without spinning forever', async () => {
    // The writer's schema has a field of its own before the reader's (skipped when resolving):
    // its block count says 2^50 strings.
    const bytes = [0, 0, 0, 0, 8, ...zigzag(2 ** 50)];
    const { out, code, killed } = await decodeInChild(bytes, await writerWith(TAGS));
    assert.ok(!killed, `the decode did not finish in 15 s: ${out}`);
    assert.equal(code, 0, `the process died (exit ${code}): ${out}`);
    assert.match(out, /^DecodeError: /);
  });

  it('still decodes a record with many items', async () => {
    const { TopicCodec } = await import('../../schemas/codec.ts');
    const { loadType } = await import('../../schemas/avro.ts');
    const registry = {
      schemaById: () => Promise.reject(new Error('not asked')),
      register: async () => 7,
      latest: async () => undefined,
      close: async () => {},
    };
    const codec = new TopicCodec<Record<string, unknown>>(
      'chat.deliveries.gw-1',
      7,
      loadType('Delivery'),
      registry,
    );
    const targets = Array.from({ length: 5000 }, (_, i) => ({
      deviceId: `d${i}`,
      connectionId: `c${i}`,
    }));
    const value = {
      userId: 'bob',
      targets,
      frame: {
        'chat.v1.Typing': { from: 'alice', to: 'bob', group: null, state: 'start', at: 1 },
      },
      more: false,
    };
    const decoded = await codec.decode(codec.encode(value));
    assert.equal((decoded.targets as unknown[]).length, 5000);
  });
});

/**
 * avsc skips a writer-only array or map block written with a negative count by its block size
 * (`tap.pos += size`), without reading its items: the check must hold a block to its size, or
 * it checks another parse than the one avsc makes. A size landing inside the block lets avsc
 * read forged bytes, which the walk took for a string's content, as the reader's fields.
 */
describe('codec: a forged block size in a writer-only field', function () {
  this.timeout(40_000);

  it('refuses a negative-count block whose size is not its items, without running out of memory', async () => {
    const valid = await validDelivery();
    // What avsc reads once its skip has jumped into the string: the end of `tags`, an empty
    // userId, then `targets` claiming 2^29 items.
    const forged = [0x00, 0x00, ...zigzag(2 ** 29)];
    const item = [...zigzag(forged.length), ...forged]; // one string, as the walk reads it
    const bytes = [
      ...[0, 0, 0, 0, 8],
      ...zigzag(-1), // a block of one item, with its size in bytes next
      ...zigzag(zigzag(forged.length).length), // the size: only the string's length varint
      ...item,
      0x00, // the end of `tags`, as the walk reads it
      ...valid,
    ];
    const { out, code, killed } = await decodeInChild(bytes, await writerWith(TAGS));
    assert.ok(!killed, `the decode did not finish in 15 s: ${out}`);
    assert.equal(code, 0, `the process died (exit ${code}): ${out}`);
    assert.match(out, /^DecodeError: /);
  });

  it('still decodes a negative-count block whose size is right', async () => {
    const writer = await writerWith(TAGS);
    const valid = await validDelivery();
    const strings = [
      [...zigzag(2), 0x61, 0x62],
      [...zigzag(1), 0x63],
    ];
    const block = strings.flat();
    const bytes = [
      ...[0, 0, 0, 0, 8],
      ...zigzag(-2),
      ...zigzag(block.length),
      ...block,
      0x00,
      ...valid,
    ];
    const { out } = await decodeInChild(bytes, writer);
    assert.equal(out, 'decoded userId,targets,frame,more');
  });

  it('refuses a writer-only array of empty items counted past any bound, block after block, without spinning', async () => {
    // Each block holds at most the capped count of items of no bytes, but blocks cost three
    // bytes each: 300 KB of them are 6.5e9 items, walked one by one (then skipped one by one).
    const writer = await writerWith({
      name: 'junk',
      type: { type: 'array', items: 'null' },
      default: [],
    });
    const valid = await validDelivery();
    // 100,000 blocks of 2^16 nulls (300 KB): built in the child, too long for its arguments.
    const block = zigzag(2 ** 16);
    const expression = `Buffer.from([0, 0, 0, 0, 8, ...Array.from({ length: 100000 }, () => ${JSON.stringify(block)}).flat(), 0, ...${JSON.stringify(valid)}])`;
    const { out, code, killed } = await decodeInChild({ expression }, writer);
    assert.ok(!killed, `the decode did not finish in 15 s: ${out}`);
    assert.equal(code, 0, `the process died (exit ${code}): ${out}`);
    assert.match(out, /^DecodeError: /);
  });
});

describe('Avro bounds check', () => {
  it('accepts every value avsc writes, of every schema of the project, and ends where it ends', async () => {
    const { checkAvroBinary } = await import('../../schemas/avro-bounds.ts');
    const { loadType, schemaNames } = await import('../../schemas/avro.ts');
    for (const name of schemaNames) {
      const type = loadType(name);
      for (let i = 0; i < 300; i++) {
        const bytes = type.toBuffer(type.random());
        assert.equal(checkAvroBinary(type, bytes, 0), bytes.length, `${name}, value ${i}`);
      }
    }
  });

  it('refuses each truncation of a valid record', async () => {
    const { checkAvroBinary } = await import('../../schemas/avro-bounds.ts');
    const { loadType, schemaNames } = await import('../../schemas/avro.ts');
    for (const name of schemaNames) {
      const type = loadType(name);
      const bytes = type.toBuffer(type.random());
      for (let end = 0; end < bytes.length; end++) {
        // A prefix may still be a whole value of the type (a trailing empty array or null
        // branch): then it must end exactly where the prefix does.
        let answer: number | RangeError;
        try {
          answer = checkAvroBinary(type, bytes.subarray(0, end), 0);
        } catch (error) {
          assert.ok(error instanceof RangeError, String(error));
          continue;
        }
        assert.equal(answer, end, `${name}: a prefix of ${end} bytes read as a longer value`);
      }
    }
  });
});

describe('codec: values that are not values of their schema (from a review, session 18)', () => {
  const registry: SchemaRegistry = {
    schemaById: () => Promise.reject(new Error('not asked')),
    register: async () => 7,
    latest: async () => undefined,
    close: async () => {},
  };
  const str = (bytes: number[]) => [...zigzag(bytes.length), ...bytes];

  it('refuses a string that is not UTF-8 (Avro strings are UTF-8) as a DecodeError', async () => {
    const codec = new TopicCodec<{ userId: string }>(
      'chat.accounts',
      7,
      loadType('Account'),
      registry,
    );
    // userId = bytes FF FE (never valid UTF-8), displayName "A", createdAt 1
    const bytes = Buffer.from([0, 0, 0, 0, 7, ...str([0xff, 0xfe]), ...str([0x41]), ...zigzag(1)]);
    let decoded: { userId: string } | undefined;
    try {
      decoded = await codec.decode(bytes);
    } catch (error) {
      assert.ok(error instanceof DecodeError, String(error));
      return;
    }
    // Two different forged byte strings decode to the same userId:
    const other = await codec.decode(
      Buffer.from([0, 0, 0, 0, 7, ...str([0xc3, 0x28]), ...str([0x41]), ...zigzag(1)]),
    );
    assert.fail(
      `decoded as userId ${JSON.stringify(decoded.userId)}; bytes C3 28 as ${JSON.stringify(other.userId)}`,
    );
  });

  it('refuses a boolean byte other than 0 or 1 as a DecodeError', async () => {
    const type = loadType('Delivery');
    const codec = new TopicCodec<{ more: boolean }>('chat.deliveries.gw', 7, type, registry);
    const valid = type.toBuffer({
      userId: 'bob',
      targets: [],
      frame: { 'chat.v1.Typing': { from: 'a', to: 'b', group: null, state: 'start', at: 1 } },
      more: false,
    });
    const forged = Buffer.concat([Buffer.from([0, 0, 0, 0, 7]), valid]);
    forged[forged.length - 1] = 0x7f; // `more`, the last field
    await assert.rejects(() => codec.decode(forged), DecodeError);
  });

  it('decodes strings of any script, emoji included', async () => {
    const codec = new TopicCodec<{ userId: string; displayName: string }>(
      'chat.accounts',
      7,
      loadType('Account'),
      registry,
    );
    const account = { userId: 'zoe', displayName: 'Zoé 😀 日本 ﷽', createdAt: 1 };
    const decoded = await codec.decode(
      Buffer.concat([Buffer.from([0, 0, 0, 0, 7]), loadType('Account').toBuffer(account)]),
    );
    assert.equal(decoded.displayName, account.displayName);
  });
});
