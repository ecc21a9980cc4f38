/**
 * The event codec's cost per record: `npm run bench -- codec [--ops N]`.
 *
 * Encodes and decodes the two values every chat message turns into most often (a Delivery of
 * a message copy, and the InboxCommand the gateway produces), through TopicCodec: validation
 * against the schema, Avro binary, the Confluent wire-format header, a buffer of its own. The
 * baseline is avsc alone: `type.encode` into a buffer kept from call to call (no validation, no
 * header, no copy) and `type.fromBuffer`, the floor of this format in this library. Median of 5
 * rounds of N operations each (default 200,000).
 */
import { parseArgs } from 'node:util';
import { TopicCodec } from '../schemas/codec.ts';
import { loadType, type SchemaName } from '../schemas/avro.ts';
import type { SchemaRegistry } from '../schemas/registry/port.ts';
import {
  fullNames,
  type Delivery,
  type InboxCommand,
  type MessageCopy,
} from '../schemas/types.generated.ts';

const ROUNDS = 5;

/** Decoding with the codec's own schema id never asks the registry. */
const noRegistry = new Proxy({} as SchemaRegistry, {
  get: () => () => Promise.reject(new Error('the codec bench asks no registry')),
});

const copy: MessageCopy = {
  messageId: 'm-3f1c9a7be2d04c51a8e6b0d2c4f7a913',
  from: 'user-000123',
  to: 'user-000124',
  group: null,
  body: JSON.stringify({ text: 'x'.repeat(80) }),
  sentAt: 1_796_000_000_000,
};
const values = {
  Delivery: {
    userId: 'user-000124',
    targets: [{ connectionId: 'c-5b0e2f9d7a3c4e18', deviceId: 'default' }],
    frame: {
      [fullNames.InboxEntry]: {
        userId: 'user-000124',
        seq: 123_456,
        at: 1_796_000_000_000,
        entry: { [fullNames.MessageCopy]: copy },
      },
    },
  } as Delivery,
  InboxCommand: {
    userId: 'user-000124',
    entry: { [fullNames.MessageCopy]: copy },
  } as InboxCommand,
} satisfies Partial<Record<SchemaName, unknown>>;

/** Nanoseconds per call of `work`, the median of ROUNDS rounds of `ops` calls. */
async function nsPerOp(ops: number, work: () => unknown): Promise<number> {
  const rounds: number[] = [];
  for (let r = 0; r < ROUNDS; r++) {
    const started = process.hrtime.bigint();
    for (let i = 0; i < ops; i++) work();
    rounds.push(Number(process.hrtime.bigint() - started) / ops);
    await new Promise((resolve) => setImmediate(resolve)); // lets a slow round show progress
  }
  return rounds.sort((a, b) => a - b)[Math.floor(ROUNDS / 2)]!;
}

export async function run(args: string[]): Promise<void> {
  const { values: options } = parseArgs({
    args,
    options: { ops: { type: 'string', default: '200000' } },
  });
  const ops = Number(options.ops);
  console.log(`\n${ROUNDS} rounds of ${ops.toLocaleString('en-US')} operations, median\n`);
  console.log(
    '| value | bytes | avsc encode ns (baseline) | codec encode ns | vs baseline | avsc fromBuffer ns (baseline) | codec decode ns | vs baseline |',
  );
  console.log('| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |');
  for (const [name, value] of Object.entries(values) as Array<[SchemaName, unknown]>) {
    const type = loadType(name);
    const codec = new TopicCodec<unknown>(name, 1, type, noRegistry);
    const raw = type.toBuffer(value);
    const encoded = codec.encode(value);
    process.stderr.write(`${name}: encoding\n`);
    const into = Buffer.alloc(64 * 1024);
    const rawEncode = await nsPerOp(ops, () => type.encode(value, into));
    const encode = await nsPerOp(ops, () => codec.encode(value));
    process.stderr.write(`${name}: decoding\n`);
    const rawDecode = await nsPerOp(ops, () => type.fromBuffer(raw));
    // decode is async only to ask the registry for a writer schema it has not seen.
    const decode = await nsPerOp(ops, () => void codec.decode(encoded));
    const row = [rawEncode, encode, encode / rawEncode, rawDecode, decode, decode / rawDecode];
    console.log(
      `| ${name} | ${encoded.length} | ${row
        .map((n, i) => (i % 3 === 2 ? n.toFixed(2) : n.toFixed(0)))
        .join(' | ')} |`,
    );
  }
}
