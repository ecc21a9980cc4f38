/**
 * A mocha root-hook plugin: after the run, prints how many tests ran on each adapter (from the
 * "...conformance: <adapter>" and "...runtime: <adapter>" suite titles) and a closing line
 * `tests: N passed, N failed`.
 * With TEST_SUMMARY_FILE set, it also appends the counts there, for .ci/run's grand total.
 */
import { appendFileSync } from 'node:fs';
import type { Context } from 'mocha';

const perAdapter = new Map<string, { passed: number; failed: number }>();
let passed = 0;
let failed = 0;
let pending = 0;

function adapterOf(test: Mocha.Runnable | undefined): string {
  for (let suite = test?.parent; suite; suite = suite.parent) {
    // "log port conformance: kafka (...)", "stream-processing runtime: embedded"...
    const match = /(?:conformance|runtime): (.+)$/.exec(suite.title);
    if (match) return match[1]!;
  }
  return 'unit and adapter-specific';
}

export const mochaHooks = {
  afterEach(this: Context) {
    const test = this.currentTest;
    if (!test) return;
    if (test.isPending()) {
      pending++;
      return;
    }
    const counts = perAdapter.get(adapterOf(test)) ?? { passed: 0, failed: 0 };
    if (test.state === 'passed') {
      counts.passed++;
      passed++;
    } else if (test.state === 'failed') {
      counts.failed++;
      failed++;
    }
    perAdapter.set(adapterOf(test), counts);
  },
  afterAll() {
    console.log('\nTests by adapter:');
    for (const [adapter, counts] of perAdapter) {
      console.log(`  ${adapter}: ${counts.passed} passed, ${counts.failed} failed`);
    }
    console.log(
      `tests: ${passed} passed, ${failed} failed${pending ? `, ${pending} skipped` : ''}`,
    );
    if (process.env.TEST_SUMMARY_FILE)
      appendFileSync(process.env.TEST_SUMMARY_FILE, `${passed} ${failed} ${pending}\n`);
  },
};
