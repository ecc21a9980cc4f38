import { KafkaLog } from '../../log/kafka/kafka-log.ts';
import type { Log } from '../../log/port.ts';
import { runtimeSuite } from '../conformance/runtime.suite.ts';

const brokers = process.env.KAFKA_BROKERS!;

runtimeSuite({
  name: `kafka (${brokers})`,
  open: async () => new KafkaLog({ brokers: brokers.split(','), clientId: 'runtime-test' }),
  close: (log: Log) => log.close(),
  childEnv: () => ({ KAFKA_BROKERS: brokers }),
  settleMs: 15_000,
  shared: true,
});
