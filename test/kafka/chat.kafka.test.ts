/**
 * The chat on the distributed shape: two `npm start` processes on Apache Kafka and a
 * Confluent-compatible registry, each with its own gateway and data directory, sharing the users
 * actor's tasks. One is killed with SIGKILL: its tasks move to the other, restored from their
 * changelogs, and a user who reconnects there gets everything above its ack, in order.
 */
import assert from 'node:assert/strict';
import { randomBytes } from 'node:crypto';
import { KafkaDeployment } from '../support/process.ts';
import { Client } from '../support/chat-client.ts';

describe('chat on Kafka: two processes, one killed', function () {
  this.timeout(240_000);
  const deployment = new KafkaDeployment();
  const run = randomBytes(3).toString('hex');
  const alice = `alice-${run}`;
  const bob = `bob-${run}`;
  const start = (name: string) => deployment.start(name);
  after(() => deployment.stopAll());

  it('delivers across gateways, and after a process dies, through the other one', async () => {
    const a = await start('a');
    const b = await start('b');
    const tokens = new Map<string, string>();
    for (const username of [alice, bob]) {
      const response = await fetch(`${a.url}/v1/auth/register`, {
        method: 'POST',
        headers: { 'content-type': 'application/json' },
        body: JSON.stringify({ username, password: 'a good password' }),
      });
      assert.equal(response.status, 201, await response.clone().text());
      tokens.set(username, ((await response.json()) as { accessToken: string }).accessToken);
    }
    const aliceOnA = await Client.open(a.url, tokens.get(alice)!, 'phone');
    const bobOnB = await Client.open(b.url, tokens.get(bob)!, 'phone'); // a token A signed

    // The gateway knows bob once the accounts table has his registration.
    let sent;
    for (let attempt = 0; ; attempt++) {
      aliceOnA.send({ type: 'send', id: `first-${attempt}`, to: bob, body: { text: 'across' } });
      const answer = await aliceOnA.next(
        (f) => f.id === `first-${attempt}` && (f.type === 'sent' || f.type === 'error'),
      );
      if (answer.type === 'sent') {
        sent = answer;
        break;
      }
      assert.ok(attempt < 50, `bob stayed unknown: ${JSON.stringify(answer)}`);
      await new Promise((r) => setTimeout(r, 200));
    }
    const received = await bobOnB.next(
      (f) => f.type === 'message' && f.messageId === sent.messageId,
      60_000,
    );
    assert.equal(received.seq, 1);
    bobOnB.send({ type: 'ack', upTo: 1 });
    const receipt = await aliceOnA.next((f) => f.type === 'receipt', 60_000);
    assert.equal(receipt.by, bob);

    await b.stop('SIGKILL');
    for (let i = 1; i <= 3; i++)
      aliceOnA.send({ type: 'send', id: `after-${i}`, to: bob, body: { n: i } });
    await aliceOnA.next((f) => f.type === 'sent' && f.id === 'after-3', 60_000);

    const bobOnA = await Client.open(a.url, tokens.get(bob)!, 'phone');
    await bobOnA.next((f) => f.type === 'message' && (f.body as { n?: number }).n === 3, 120_000);
    assert.deepEqual(
      bobOnA.entries().map((f) => [f.seq, (f.body as { n: number }).n]),
      [
        [2, 1],
        [3, 2],
        [4, 3],
      ],
      'above the ack, in order, each once',
    );
    await aliceOnA.close();
    await bobOnA.close();
  });
});
