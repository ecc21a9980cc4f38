// `npm run test:kafka`: the conformance suites again, on the Kafka adapter and the Confluent
// registry adapter. Requires KAFKA_BROKERS (and SCHEMA_REGISTRY_URL for the registry suite).
module.exports = {
  'node-option': ['import=tsx'],
  spec: ['test/kafka/**/*.test.ts'],
  timeout: 60000,
  exit: true,
};
