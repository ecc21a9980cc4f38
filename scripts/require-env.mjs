// Fails loudly when a suite that needs an external service is run without it, so that
// nothing is skipped silently.
const missing = process.argv.slice(2).filter((name) => !process.env[name]);
if (missing.length > 0) {
  console.error(`missing environment: ${missing.join(', ')} (see README: "Tests on real Kafka")`);
  process.exit(2);
}
