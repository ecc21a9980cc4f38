// `npm run test:kafka`: the conformance suites again, on the Kafka adapter and the Confluent
// registry adapter. Requires KAFKA_BROKERS and SCHEMA_REGISTRY_URL; nothing is skipped.
module.exports = {
  'node-option': ['import=tsx'],
  require: ['test/support/summary.ts'],
  spec: ['test/kafka/**/*.test.ts'],
  timeout: 60000,
  exit: true,
};
