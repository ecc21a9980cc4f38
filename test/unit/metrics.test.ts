import assert from 'node:assert/strict';
import { Metrics } from '../../observability/metrics.ts';

describe('metrics', () => {
  it('shares a counter or histogram registered twice under one name, told apart by label', async () => {
    const metrics = new Metrics();
    const users = metrics.counter('kchat_test_total', 'test', ['application']);
    const groups = metrics.counter('kchat_test_total', 'test', ['application']);
    assert.equal(users, groups);
    users.inc({ application: 'users' });
    groups.inc({ application: 'groups' }, 2);
    const text = await metrics.text();
    assert.match(text, /kchat_test_total\{application="users"\} 1/);
    assert.match(text, /kchat_test_total\{application="groups"\} 2/);
    assert.equal(
      metrics.histogram('kchat_test_seconds', 'test', [1]),
      metrics.histogram('kchat_test_seconds', 'test', [1]),
    );
  });
});
