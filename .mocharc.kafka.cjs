// `npm run test:kafka`: the conformance suites again, on the Kafka adapter and the Confluent
// registry adapter. Requires KAFKA_BROKERS and SCHEMA_REGISTRY_URL; nothing is skipped.
module.exports = {
  'node-option': ['import=tsx'],
  require: ['test/support/summary.ts'],
  // The crash test last: with KAFKA_BROKER_RESTART=1 (CI) it restarts the broker, and the
  // other suites should not start on a broker that is still loading its logs.
  spec: ['test/kafka/!(chat-roles)*.test.ts', 'test/kafka/chat-roles.kafka.test.ts'],
  timeout: 60000,
  exit: true,
};
