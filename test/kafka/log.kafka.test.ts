import { KafkaLog } from '../../log/kafka/kafka-log.ts';
import { logConformance } from '../conformance/log.suite.ts';

let log: KafkaLog;

logConformance(
  `kafka (${process.env.KAFKA_BROKERS})`,
  async () => {
    log = new KafkaLog({ brokers: process.env.KAFKA_BROKERS!.split(','), clientId: 'conformance' });
    return { log, settleMs: 15000 };
  },
  async () => {
    await log.close();
  },
);
