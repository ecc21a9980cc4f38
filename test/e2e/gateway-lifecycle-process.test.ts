/**
 * The gateway on `npm start`: a replay that a slow reader pauses while live entries arrive, a
 * user reconnecting in a loop (each connection replays a part of its inbox: bounded by the
 * per-user connect rate), and a kill -9 and restart under the same gatewayId. Written by a
 * review helper (session 18), which found the reconnect loop: 222 to 300 connections in 3 s
 * replayed 33,000 to 44,000 entries.
 */
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { freePort, startServer, type Started } from '../support/process.ts';
import { eventually } from '../support/log-helpers.ts';
import { Client, metric, register } from '../support/chat-client.ts';
import { WebSocket } from 'ws';

describe('gateway on npm start: replays, reconnect loops, a restart', function () {
  this.timeout(120_000);
  let dataDir: string;
  let server: Started;
  const tokens = new Map<string, string>();

  before(async () => {
    dataDir = await mkdtemp(join(tmpdir(), 'kchat-gw-lifecycle-srv-'));
    server = await startServer({
      PORT: String(await freePort()),
      DATA_DIR: dataDir,
      LOG_LEVEL: 'warn',
      RATE_LIMIT_PER_S: '5000',
    });
    for (const u of ['alice', 'bobby']) tokens.set(u, await register(server.url, u));
  });

  after(async () => {
    await server?.stop();
    await rm(dataDir, { recursive: true, force: true });
  });

  /** Sends `to` a probe (body 0, id `probe`) until the gateway knows `to` and answers `sent`. */
  async function untilKnown(from: Client, to: string) {
    await eventually(
      async () => {
        from.send({ type: 'send', id: 'probe', to, body: 0 });
        return (await from.next((f) => f.id === 'probe')).type === 'sent';
      },
      10_000,
      `${to} known`,
    );
  }

  async function sendMany(alice: Client, from: number, count: number) {
    for (let i = from; i < from + count; i++)
      alice.send({ type: 'send', id: `m${i}`, to: 'bobby', body: { i, pad: 'x'.repeat(1500) } });
    await alice.next((f) => f.type === 'sent' && f.id === `m${from + count - 1}`, 60_000);
  }

  it('a replay that a slow reader pauses, with live entries meanwhile: every seq once, in order', async () => {
    const alice = await Client.open(server.url, tokens.get('alice')!, 'phone');
    await untilKnown(alice, 'bobby');
    await sendMany(alice, 1, 1200);
    const bob = await Client.open(server.url, tokens.get('bobby')!, 'phone');
    const socket = (bob.ws as unknown as { _socket: { pause(): void; resume(): void } })._socket;
    socket.pause();
    await sendMany(alice, 1201, 150);
    await new Promise((r) => setTimeout(r, 1500));
    socket.resume();
    await sendMany(alice, 1351, 50);
    const total = 1 + 1400;
    await eventually(() => bob.entries().length >= total, 60_000, `${total} entries`);
    await new Promise((r) => setTimeout(r, 500));
    const seqs = bob.entries().map((f) => f.seq as number);
    const bad = seqs.flatMap((s, i) =>
      i > 0 && s !== seqs[i - 1]! + 1 ? [[i, seqs[i - 1], s]] : [],
    );
    assert.deepEqual(bad.slice(0, 10), [], `${seqs.length} entries`);
    assert.equal(seqs.length, total);
    await bob.close();
    await alice.close();
  });

  it('bounds how often one user can make the server replay its inbox by reconnecting', async () => {
    // bobby holds 1,401 unacknowledged entries (the test before); each connection replays a
    // part of them (REPLAY_PART_ENTRIES, 256 at most).
    const token = tokens.get('bobby')!;
    const skippedBefore = await metric(server.url, 'kchat_gateway_deliveries_skipped_total');
    const deliveredBefore = await metric(server.url, 'kchat_gateway_deliveries_total');
    const started = Date.now();
    let accepted = 0;
    let refused = 0;
    while (Date.now() - started < 3_000 && accepted + refused < 300) {
      const ws = new WebSocket(`${server.url.replace('http', 'ws')}/v1/ws?deviceId=phone`, {
        headers: { authorization: `Bearer ${token}` },
      });
      const status = await new Promise<number>((resolve) => {
        ws.once('open', () => resolve(101));
        ws.once('error', () => undefined);
        ws.once('unexpected-response', (_request, response) => resolve(response.statusCode ?? 0));
      });
      if (status === 101) accepted++;
      else {
        assert.equal(status, 429);
        refused++;
      }
      ws.terminate();
    }
    await new Promise((r) => setTimeout(r, 3_000));
    const seconds = (Date.now() - started) / 1000;
    const replayed =
      (await metric(server.url, 'kchat_gateway_deliveries_skipped_total')) -
      skippedBefore +
      (await metric(server.url, 'kchat_gateway_deliveries_total')) -
      deliveredBefore;
    // A burst of 20, then one a second (CONNECTS_PER_USER_BURST, CONNECTS_PER_USER_PER_S).
    assert.ok(refused > 0, `${accepted} connections accepted, none refused`);
    assert.ok(accepted <= 20 + Math.ceil(seconds), `${accepted} accepted in ${seconds} s`);
    assert.ok(replayed <= accepted * 256, `${replayed} entries replayed for ${accepted}`);
  });

  it('after kill -9 and a restart under the same gatewayId: gapless, nothing at or below the ack again', async () => {
    const env = {
      PORT: new URL(server.url).port,
      DATA_DIR: dataDir,
      LOG_LEVEL: 'warn',
      RATE_LIMIT_PER_S: '5000',
    };
    tokens.set('carol', await register(server.url, 'carol'));
    tokens.set('dave', await register(server.url, 'dave'));
    const carol = await Client.open(server.url, tokens.get('carol')!, 'phone');
    let dave = await Client.open(server.url, tokens.get('dave')!, 'phone');
    await untilKnown(carol, 'dave');
    for (let i = 1; i <= 200; i++) carol.send({ type: 'send', id: `a${i}`, to: 'dave', body: i });
    await carol.next((f) => f.id === 'a200' && f.type === 'sent', 30_000);
    await eventually(() => dave.entries().length >= 201, 30_000, 'dave has 201');
    dave.send({ type: 'ack', upTo: 150 });
    dave.send({ type: 'ping', id: 'acked' });
    await dave.next((f) => f.type === 'pong');
    await server.stop('SIGKILL');
    server = await startServer(env);
    const carol2 = await Client.open(server.url, tokens.get('carol')!, 'phone');
    dave = await Client.open(server.url, tokens.get('dave')!, 'phone');
    for (let i = 201; i <= 300; i++)
      carol2.send({ type: 'send', id: `a${i}`, to: 'dave', body: i });
    await carol2.next((f) => f.id === 'a300' && f.type === 'sent', 30_000);
    await eventually(() => (dave.entries().at(-1)?.seq as number) >= 301, 30_000, 'dave up to 301');
    await new Promise((r) => setTimeout(r, 500));
    const seqs = dave.entries().map((f) => f.seq as number);
    assert.equal(seqs[0], 151, `first after reconnect ${seqs[0]}`);
    const bad = seqs.flatMap((s, i) =>
      i > 0 && s !== seqs[i - 1]! + 1 ? [[i, seqs[i - 1], s]] : [],
    );
    assert.deepEqual(bad, []);
    await dave.close();
    await carol2.close();
    await carol.close().catch(() => undefined);
  });
});
