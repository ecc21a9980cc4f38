// `npm test`: everything that needs no external service (unit, conformance on the embedded
// adapters). Suites that need Kafka live under test/kafka and run with `npm run test:kafka`.
module.exports = {
  'node-option': ['import=tsx'],
  require: ['test/support/summary.ts'],
  spec: ['test/unit/**/*.test.ts', 'test/conformance/**/*.test.ts', 'test/e2e/**/*.test.ts'],
  timeout: 20000,
  exit: true,
};
