/**
 * The distributed shape, one role per process: an api, two gateways and two users processors
 * on Apache Kafka and a Confluent-compatible registry. Under a steady load of sends from two
 * clients that reconnect and retry as real clients do, a gateway is killed with SIGKILL, then a
 * users processor, then (with KAFKA_BROKER_RESTART=1, as CI runs it) the broker itself
 * (kafka.sh restart --kill, or KAFKA_RESTART_COMMAND). Afterwards every acknowledged message is
 * in its recipient's inbox exactly once, with gapless seqs, in the order the sender could
 * observe, and a device that connects gets all of it.
 *
 * The broker restart holds up the gateways' heartbeats: this test is what found that a device
 * on a gateway that counted as silent got neither its replay nor live entries (8 of 25 runs).
 */
import assert from 'node:assert/strict';
import { execFile } from 'node:child_process';
import { randomBytes } from 'node:crypto';
import { promisify } from 'node:util';
import { KafkaDeployment } from '../support/process.ts';
import { Client, metricLines, register } from '../support/chat-client.ts';
import { eventually } from '../support/log-helpers.ts';
import { orderViolations, ResilientSender } from '../support/resilient-sender.ts';

const TOTAL = 400;
const WINDOW = 8;

async function restartBroker(): Promise<void> {
  const command = process.env.KAFKA_RESTART_COMMAND;
  if (command) await promisify(execFile)('bash', ['-c', command]);
  else await promisify(execFile)('deploy/kafka-local/kafka.sh', ['restart', '--kill']);
}

const withBrokerRestart = process.env.KAFKA_BROKER_RESTART === '1';

describe('chat on Kafka, one role per process: gateway, users processor and broker killed under load', function () {
  this.timeout(420_000);
  const deployment = new KafkaDeployment();
  const processes = deployment.processes;
  const run = randomBytes(3).toString('hex');
  const start = (name: string, role: string[]) =>
    deployment.start(name, role, { RATE_LIMIT_PER_S: '5000' });
  after(() => deployment.stopAll());

  it(`loses nothing acknowledged and delivers nothing twice (broker restart: ${withBrokerRestart ? 'on' : 'off, KAFKA_BROKER_RESTART=1 turns it on'})`, async () => {
    const [api, g1, g2] = await Promise.all([
      start('api', ['api']),
      start('g1', ['gateway']),
      start('g2', ['gateway']),
      start('u1', ['processor', 'users']),
      start('u2', ['processor', 'users']),
    ]);
    const gatewayUrls = [g1!.url, g2!.url];
    const liveGateways = () =>
      gatewayUrls.filter((url) =>
        [...processes.values()].some(
          (p) => p.url === url && p.child.exitCode === null && !killed.has(url),
        ),
      );
    const killed = new Set<string>();

    // A gateway-only process serves no REST route; the api process serves no WebSocket.
    assert.equal((await fetch(`${g1!.url}/v1/auth/verify`)).status, 404);
    assert.equal((await fetch(`${api!.url}/healthz`)).status, 200);

    const tokens = new Map<string, string>();
    const users = ['a1', 'b1', 'a2', 'b2'].map((u) => `${u}-${run}`);
    for (const username of users) tokens.set(username, await register(api!.url, username));
    const [a1, b1, a2, b2] = users as [string, string, string, string];
    // Both gateways know every user once the accounts table has the registrations.
    for (const url of gatewayUrls) {
      const probe = await Client.open(url, tokens.get(a1)!, 'probe');
      await eventually(
        async () => {
          probe.frames.length = 0;
          probe.send({ type: 'typing', to: b2 });
          probe.send({ type: 'send', id: 'probe', to: b2, body: 'probe' });
          const answer = await probe.next((f) => f.id === 'probe');
          return answer.type === 'sent';
        },
        60_000,
        `${url} to know ${b2}`,
      );
      await probe.close();
    }

    // a1 starts on g1 and a2 on g2; each fails over to the other gateway.
    const senders = [
      new ResilientSender({
        urls: () => liveGateways(),
        token: tokens.get(a1)!,
        deviceId: 'laptop',
        to: b1,
        total: TOTAL,
        window: WINDOW,
        tag: 'x',
      }),
      new ResilientSender({
        urls: () => [...liveGateways()].reverse(),
        token: tokens.get(a2)!,
        deviceId: 'laptop',
        to: b2,
        total: TOTAL,
        window: WINDOW,
        tag: 'y',
      }),
    ];
    const deadline = Date.now() + 300_000;
    const load = Promise.all(senders.map((s) => s.run(deadline)));
    load.catch(() => undefined); // awaited below; a fault step failing first must not leave it unhandled
    const acknowledged = () => Math.min(...senders.map((s) => s.acknowledged));
    const when = (count: number, what: string) =>
      eventually(
        () => acknowledged() >= count,
        120_000,
        `${count} acknowledged sends before ${what}`,
      );

    await when(TOTAL / 8, 'killing g1');
    killed.add(g1!.url);
    await processes.get('g1')!.stop('SIGKILL');
    await when((TOTAL * 2) / 8, 'killing u1');
    await processes.get('u1')!.stop('SIGKILL');
    if (withBrokerRestart) {
      await when((TOTAL * 3) / 8, 'restarting the broker');
      await restartBroker();
    }
    await load;
    console.log(
      `      ${senders.map((s) => `${s.acknowledged} acknowledged, ${s.reconnects} reconnects, ${s.resends} resends, errors ${JSON.stringify(Object.fromEntries(s.errors))}`).join('; ')}`,
    );
    assert.ok(senders[0]!.reconnects >= 1, 'a1 reconnected on the other gateway');

    // Each recipient's inbox, read whole by a device that has never connected.
    for (const [recipient, sender] of [
      [b1, senders[0]!],
      [b2, senders[1]!],
    ] as const) {
      const audit = await Client.open(g2!.url, tokens.get(recipient)!, 'audit');
      const numbers = () =>
        audit.frames
          .filter((f) => f.type === 'message' && typeof (f.body as { n?: number }).n === 'number')
          .map((f) => (f.body as { n: number }).n);
      await eventually(() => numbers().length >= TOTAL, 120_000, `${recipient}'s inbox`).catch(
        async (error) => {
          // What the processes say is what tells why: readiness, counters and logs go along.
          const state = await Promise.all(
            [...processes].map(async ([name, p]) => {
              const ready = await fetch(`${p.url}/readyz`).then(
                async (r) => `${r.status} ${await r.text()}`,
                () => 'down',
              );
              const metrics = (
                await metricLines(
                  p.url,
                  /^kchat_(streams_records_processed|streams_commits_total|gateway_deliveries|users_live_gateways|users_catch_up)/,
                )
              ).join('; ');
              return `${name}: readyz ${ready}; ${metrics}`;
            }),
          );
          const logs = [...processes]
            .map(([name, p]) => {
              const lines = p
                .output()
                .split('\n')
                .filter((line) => !line.includes('"kafkajs":"Connection"'));
              const state =
                p.child.exitCode === null && p.child.signalCode === null ? 'running' : 'ended';
              return `--- ${name} (${state}):\n${lines
                .slice(-25)
                .map((l) => l.slice(0, 400))
                .join('\n')}`;
            })
            .join('\n');
          // TEST_HOLD_ON_FAILURE_MS keeps the deployment up for a look from outside.
          const hold = Number(process.env.TEST_HOLD_ON_FAILURE_MS ?? 0);
          if (hold > 0) {
            console.log(`      failed; holding the deployment for ${hold} ms`);
            await new Promise((r) => setTimeout(r, hold));
          }
          throw new Error(
            `${(error as Error).message}: ${numbers().length} of ${TOTAL}\n${state.join('\n')}\n${logs}`,
          );
        },
      );
      await new Promise((r) => setTimeout(r, 1000)); // anything extra would show up now
      const inbox = numbers();
      assert.equal(new Set(inbox).size, inbox.length, `${recipient}: no message twice`);
      assert.equal(inbox.length, TOTAL, `${recipient}: every acknowledged message`);
      const seqs = audit.entries().map((f) => f.seq as number);
      assert.deepEqual(
        seqs,
        Array.from({ length: seqs.length }, (_, i) => seqs[0]! + i),
        'gapless seq',
      );
      assert.deepEqual(orderViolations(inbox, sender), [], `${recipient}: in the order sent`);
      await audit.close();
    }
  });
});
