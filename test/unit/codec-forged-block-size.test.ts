/**
 * The bounds check must walk the bytes as avsc will read them. avsc skips a writer-only array
 * or map block written with a negative count by its block size (`tap.pos += size`), without
 * reading its items; a walk that reads the items and ignores the size checks another parse
 * than the one avsc then makes. A block size that lands inside the block lets avsc read forged
 * bytes, which the walk took for a string's content, as the reader's fields: a huge array
 * count there exhausts the heap again.
 *
 * Each case decodes in a child process with a small heap and a deadline (as codec-forged).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { fileURLToPath } from 'node:url';

const codecUrl = new URL('../../schemas/codec.ts', import.meta.url).href;
const avroUrl = new URL('../../schemas/avro.ts', import.meta.url).href;
const root = fileURLToPath(new URL('../../', import.meta.url));

/** The Avro zig-zag varint of a (signed) long. */
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

function decodeInChild(
  bytes: number[] | { expression: string },
  writer: object,
): Promise<{ out: string; code: number | null; killed: boolean }> {
  const script = `
    const { TopicCodec } = await import(${JSON.stringify(codecUrl)});
    const { loadType } = await import(${JSON.stringify(avroUrl)});
    const writer = ${JSON.stringify(JSON.stringify(writer))};
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

async function writerWithTags(): Promise<object> {
  const { loadSchema, loadType } = await import('../../schemas/avro.ts');
  void loadType;
  const writer = JSON.parse(JSON.stringify(loadSchema('Delivery'))) as { fields: object[] };
  // A compatible evolution: a field of the writer's own before the reader's (skipped when
  // resolving).
  writer.fields = [
    { name: 'tags', type: { type: 'array', items: 'string' }, default: [] },
    ...writer.fields,
  ];
  return writer;
}

describe('codec: a forged block size in a writer-only field', function () {
  this.timeout(40_000);

  it('refuses a negative-count block whose size is not its items, without running out of memory', async () => {
    const { loadType } = await import('../../schemas/avro.ts');
    const delivery = loadType('Delivery');
    const valid = [
      ...delivery.toBuffer({
        userId: 'bob',
        targets: [],
        frame: {
          'chat.v1.Typing': { from: 'alice', to: 'bob', group: null, state: 'start', at: 1 },
        },
        more: false,
      }),
    ];
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
    const { out, code, killed } = await decodeInChild(bytes, await writerWithTags());
    assert.ok(!killed, `the decode did not finish in 15 s: ${out}`);
    assert.equal(code, 0, `the process died (exit ${code}): ${out}`);
    assert.match(out, /^DecodeError: /);
  });

  it('still decodes a negative-count block whose size is right', async () => {
    const writer = await writerWithTags();
    const { loadType } = await import('../../schemas/avro.ts');
    const delivery = loadType('Delivery');
    const valid = [
      ...delivery.toBuffer({
        userId: 'bob',
        targets: [],
        frame: {
          'chat.v1.Typing': { from: 'alice', to: 'bob', group: null, state: 'start', at: 1 },
        },
        more: false,
      }),
    ];
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
    const { loadSchema } = await import('../../schemas/avro.ts');
    const writer = JSON.parse(JSON.stringify(loadSchema('Delivery'))) as { fields: object[] };
    writer.fields = [
      { name: 'junk', type: { type: 'array', items: 'null' }, default: [] },
      ...writer.fields,
    ];
    const { loadType } = await import('../../schemas/avro.ts');
    const valid = [
      ...loadType('Delivery').toBuffer({
        userId: 'bob',
        targets: [],
        frame: {
          'chat.v1.Typing': { from: 'alice', to: 'bob', group: null, state: 'start', at: 1 },
        },
        more: false,
      }),
    ];
    // 100,000 blocks of 2^16 nulls (300 KB): built in the child, too long for its arguments.
    const block = zigzag(2 ** 16);
    const expression = `Buffer.from([0, 0, 0, 0, 8, ...Array.from({ length: 100000 }, () => ${JSON.stringify(block)}).flat(), 0, ...${JSON.stringify(valid)}])`;
    const { out, code, killed } = await decodeInChild({ expression }, writer);
    assert.ok(!killed, `the decode did not finish in 15 s: ${out}`);
    assert.equal(code, 0, `the process died (exit ${code}): ${out}`);
    assert.match(out, /^DecodeError: /);
  });
});
