import { KafkaLog } from '../../log/kafka/kafka-log.ts';
import { sharedRegistryConformance } from '../conformance/registry.suite.ts';

sharedRegistryConformance(`kafka (${process.env.KAFKA_BROKERS})`, async () => {
  const log = new KafkaLog({
    brokers: process.env.KAFKA_BROKERS!.split(','),
    clientId: 'registry-test',
  });
  return { log, close: () => log.close() };
});
