import assert from 'node:assert/strict';
import { createRequire } from 'node:module';
import { randomBytes } from 'node:crypto';
import { murmur2, partitionFor } from '../../log/partitioner.ts';

// kafkajs's Java-compatible murmur2 serves as an independent oracle.
const require = createRequire(import.meta.url);
const kafkajsMurmur2 = require('kafkajs/src/producer/partitioners/default/murmur2.js') as (
  key: Buffer,
) => number;

describe('partitioner (Java client murmur2)', () => {
  it('matches the hashes of the Java client', () => {
    // Values from Kafka's own UtilsTest / kafkajs's murmur2 spec.
    const vectors: Array<[string, number]> = [
      ['21', -973932308],
      ['foobar', -790332482],
      ['a-little-bit-long-string', -985981536],
      ['a-little-bit-longer-string', -1486304829],
      ['lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8', -58897971],
      ['abc', 479470107],
    ];
    for (const [key, hash] of vectors) assert.equal(murmur2(Buffer.from(key)), hash, key);
  });

  it('agrees with kafkajs on random keys of every length remainder', () => {
    for (let i = 0; i < 2000; i++) {
      const key = randomBytes(i % 67);
      assert.equal(murmur2(key), kafkajsMurmur2(key), key.toString('hex'));
    }
  });

  it('maps a key to a partition in range, the same every time', () => {
    for (const user of ['alice', 'bob', 'carol', 'dave']) {
      const p = partitionFor(Buffer.from(user), 12);
      assert.ok(p >= 0 && p < 12);
      assert.equal(partitionFor(Buffer.from(user), 12), p);
    }
  });
});
