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

const codecUrl = new URL('../../schemas/codec.ts', import.meta.url).href;
const avroUrl = new URL('../../schemas/avro.ts', import.meta.url).href;
const root = fileURLToPath(new URL('../../', import.meta.url));

/** The Avro zig-zag varint of a non-negative count, as a block count is written. */
function varint(n: number): number[] {
  let z = 2 * n;
  const bytes: number[] = [];
  while (z >= 0x80) {
    bytes.push((z % 0x80) | 0x80);
    z = Math.floor(z / 0x80);
  }
  bytes.push(z);
  return bytes;
}

/**
 * Decodes `bytes` with a TopicCodec of schema `Delivery` (own id 7) in a child process;
 * `writer`, when given, is the schema the registry answers for any other id. Answers what the
 * child printed: the decoded value's keys, or the error's name and message.
 */
function decodeInChild(
  bytes: number[],
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
      const value = await codec.decode(Buffer.from(${JSON.stringify(bytes)}));
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
    const bytes = [0, 0, 0, 0, 7, 0x00, ...varint(2 ** 29)];
    const { out, code, killed } = await decodeInChild(bytes);
    assert.ok(!killed, `the decode did not finish in 15 s: ${out}`);
    assert.equal(code, 0, `the process died (exit ${code}): ${out}`);
    assert.match(out, /^DecodeError: /);
  });

  it('refuses a huge block count in a field only the writer has, without spinning forever', async () => {
    // The writer's schema has a field of its own before the reader's (skipped when resolving):
    // its block count says 2^50 strings.
    const writer = {
      ...(JSON.parse(
        JSON.stringify((await import('../../schemas/avro.ts')).loadSchema('Delivery')),
      ) as { fields: object[] }),
    };
    writer.fields = [
      { name: 'tags', type: { type: 'array', items: 'string' }, default: [] },
      ...writer.fields,
    ];
    const bytes = [0, 0, 0, 0, 8, ...varint(2 ** 50)];
    const { out, code, killed } = await decodeInChild(bytes, writer);
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
