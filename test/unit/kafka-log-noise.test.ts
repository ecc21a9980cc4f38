/**
 * Which kafkajs log lines go to debug: those about errors kafkajs hands to its caller or retries
 * itself. Everything else keeps its level.
 */
import assert from 'node:assert/strict';
import { isNoise } from '../../log/kafka/kafka-log.ts';

describe('kafkajs log lines taken for noise', () => {
  const cases: Array<[string, string, boolean]> = [
    ['Connection', 'Response Heartbeat(key: 12, version: 3)', true],
    ['Producer', 'Failed to send messages: The producer attempted to update a transaction', true],
    [
      'Producer',
      'Limiting retries for the idempotent producer may invalidate EoS guarantees',
      true,
    ],
    ['Connection', 'Connection error: connect ECONNREFUSED 127.0.0.1:9092', false],
    ['Producer', 'The producer attempted to update a transaction', false],
    ['Consumer', 'Crash: KafkaJSNumberOfRetriesExceeded', false],
    ['Consumer', 'Failed to send messages: x', false],
  ];
  for (const [namespace, message, noise] of cases)
    it(`${noise ? 'debug' : 'keeps'}: ${namespace} "${message}"`, () =>
      assert.equal(isNoise(namespace, message), noise));
});
