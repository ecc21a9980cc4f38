/** How the Kafka adapter reads kafkajs's errors: a fence is a fence, however kafkajs wraps it. */
import assert from 'node:assert/strict';
import kafkajs from 'kafkajs';
import { translate } from '../../log/kafka/kafka-log.ts';
import { LogError, ProducerFencedError } from '../../log/errors.ts';

const { KafkaJSNumberOfRetriesExceeded, KafkaJSProtocolError } = kafkajs;

/** What kafkajs throws for a broker's error code (its constructor takes the code's entry). */
const protocolError = (type: string) =>
  new KafkaJSProtocolError(
    Object.assign(new Error(`the broker said ${type}`), { type, code: 0, retriable: false }),
  );

describe('kafka adapter: kafkajs errors translated', () => {
  it('a fence is a ProducerFencedError, bare or wrapped when kafkajs ran out of retries', () => {
    for (const type of ['PRODUCER_FENCED', 'INVALID_PRODUCER_EPOCH']) {
      assert.ok(translate(protocolError(type), 'app-3') instanceof ProducerFencedError, type);
      const wrapped = new KafkaJSNumberOfRetriesExceeded(protocolError(type), {
        retryCount: 5,
        retryTime: 100,
      });
      assert.ok(translate(wrapped, 'app-3') instanceof ProducerFencedError, `${type}, wrapped`);
    }
  });

  it('anything else is a LogError keeping the cause; a fence without a transactional id too', () => {
    const other = translate(protocolError('NOT_LEADER_OR_FOLLOWER'), 'app-3');
    assert.ok(other instanceof LogError && !(other instanceof ProducerFencedError));
    assert.ok(!(translate(protocolError('PRODUCER_FENCED')) instanceof ProducerFencedError));
  });
});
