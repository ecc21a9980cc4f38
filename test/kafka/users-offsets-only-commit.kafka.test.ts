/**
 * A users task whose input produces nothing (typing to a user with no device online: relayed to
 * online recipients only, never stored) commits transactions that hold only its input offsets,
 * back to back (commitIntervalMs 0). Each one's AddOffsetsToTxn can meet the coordinator still
 * writing the markers of the one before and be answered CONCURRENT_TRANSACTIONS, which kafkajs
 * does not retry there: the commit must not fail for it (a failed commit drops the task and
 * restores it from its changelogs, and /readyz says the processor cannot commit meanwhile).
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { KafkaDeployment } from '../support/process.ts';
import { Client, register } from '../support/chat-client.ts';
import { eventually } from '../support/log-helpers.ts';

describe('users processor: transactions with offsets only', function () {
  this.timeout(240_000);
  const deployment = new KafkaDeployment();
  const run = randomBytes(3).toString('hex');
  after(() => deployment.stopAll());

  it('commits typing relayed to nobody without failing a commit', async () => {
    const env = { RATE_LIMIT_PER_S: '5000', REGISTRATIONS_PER_HOUR: '0' };
    const [api, gateway, processor] = await Promise.all([
      deployment.start('api', ['api'], env),
      deployment.start('g', ['gateway'], env),
      deployment.start('u', ['processor', 'users'], { LOG_LEVEL: 'info' }),
    ]);
    const alice = `alice-${run}`;
    const bob = `bob-${run}`;
    const aliceToken = await register(api!.url, alice);
    await register(api!.url, bob);
    const client = await Client.open(gateway!.url, aliceToken, 'phone');
    // Once the gateway knows bob, and the processor has its tasks (the message comes through).
    await eventually(
      async () => {
        const id = `known-${randomBytes(3).toString('hex')}`;
        client.send({ type: 'send', id, to: bob, body: { hello: true } });
        return (await client.next((f) => f.id === id)).type === 'sent';
      },
      60_000,
      'the gateway to know bob',
    );
    await eventually(
      async () => (await fetch(`${processor!.url}/readyz`)).status === 200,
      120_000,
      'the processor to be ready',
    );
    const failedBefore = (processor!.output().match(/commit failed/g) ?? []).length;
    let notReady = 0;
    const started = Date.now();
    for (let i = 0; Date.now() - started < 20_000 && i < 4000; i++) {
      client.send({ type: 'typing', to: bob, state: i % 2 === 0 ? 'start' : 'stop' });
      if (i % 20 === 0) {
        const ready = await fetch(`${processor!.url}/readyz`);
        if (ready.status !== 200) notReady++;
      }
      await new Promise((r) => setTimeout(r, 10));
    }
    await new Promise((r) => setTimeout(r, 2000));
    const failed = processor!
      .output()
      .split('\n')
      .filter((l) => l.includes('commit failed'))
      .slice(failedBefore);
    console.log(
      `      ${failed.length} failed commits, /readyz not 200 ${notReady} times; first: ${failed[0]?.slice(0, 400) ?? '-'}`,
    );
    await client.close();
    assert.equal(failed.length, 0, 'commits that failed');
  });
});
