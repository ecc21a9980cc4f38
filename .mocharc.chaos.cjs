// `npm run test:chaos`: `npm start` killed with SIGKILL ten times under load, then every inbox
// checked against PROTOCOL's guarantees (about 2.5 minutes; CI runs it after `npm test`).
module.exports = {
  'node-option': ['import=tsx'],
  require: ['test/support/summary.ts'],
  spec: ['test/chaos/**/*.test.ts'],
  timeout: 400000,
  exit: true,
};
