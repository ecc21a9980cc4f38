/**
 * A connection whose frames wait for the log stops reading its socket once MAX_QUEUED_FRAMES
 * wait to be issued (gateway/limits.ts), so that a client cannot make the gateway hold frames
 * without bound while the log is slow. Acks are not rate limited: without this bound a client
 * could queue as many as it can write. (The e2e gateway test sends past the bound too, but only
 * checks that the connection survives and answers, which it does either way.)
 */
import assert from 'node:assert/strict';
import { createServer, type Server } from 'node:http';
import type { AddressInfo, Socket } from 'node:net';
import { SignJWT, jwtVerify } from 'jose';
import { WebSocket } from 'ws';
import { createGateway, type Gateway } from '../../gateway/gateway.ts';
import { MAX_QUEUED_FRAMES, MAX_UNANSWERED_FRAMES } from '../../gateway/limits.ts';
import { topics } from '../../schemas/topics.ts';
import { eventually, wrappingSends } from '../support/log-helpers.ts';
import { openEmbeddedChat } from '../support/embedded-chat.ts';

const secret = new TextEncoder().encode('a test secret of thirty-two bytes or more');

describe('gateway: a connection whose frames wait for the log', function () {
  this.timeout(30_000);

  it('stops reading its socket once MAX_QUEUED_FRAMES wait, and reads again when they are taken', async () => {
    const chat = await openEmbeddedChat(1, 'kchat-backpressure-');
    const { log, registry, codecs } = chat;
    // Once `holding`, sends to chat.user-commands are stored but said durable only on release.
    let holding = false;
    let release!: () => void;
    const released = new Promise<void>((resolve) => (release = resolve));
    const slowLog = wrappingSends(log, async (records, send) => {
      const held = holding && records.some((r) => r.topic === topics.userCommands);
      const stored = await send(records);
      if (held) await released;
      return stored;
    });
    let gateway: Gateway | undefined;
    let server: Server | undefined;
    try {
      gateway = createGateway({
        gatewayId: 'gw-backpressure',
        log: slowLog,
        codecs,
        registry,
        verifyAccessToken: async (token) => {
          const { payload } = await jwtVerify(token, secret, { algorithms: ['HS256'] });
          return payload.sub!;
        },
        userExists: () => true,
        partitions: 1,
      });
      await gateway.start();
      server = createServer((_request, response) => response.writeHead(404).end());
      const sockets: Socket[] = [];
      server.on('connection', (socket) => sockets.push(socket));
      gateway.attach(server);
      await new Promise<void>((resolve) => server!.listen(0, '127.0.0.1', resolve));
      const { port } = server.address() as AddressInfo;
      const token = await new SignJWT({})
        .setProtectedHeader({ alg: 'HS256' })
        .setSubject('alice')
        .setExpirationTime('1h')
        .sign(secret);
      const ws = new WebSocket(`ws://127.0.0.1:${port}/v1/ws?deviceId=phone`, {
        headers: { authorization: `Bearer ${token}` },
      });
      const frames: Array<{ type: string }> = [];
      ws.on('message', (data) => frames.push(JSON.parse(data.toString()) as { type: string }));
      await eventually(() => frames.some((f) => f.type === 'ready'), 10_000, 'ready');
      // Let the CONNECTED's Sync through before the log turns slow.
      await new Promise((resolve) => setTimeout(resolve, 200));
      holding = true;

      const sends = MAX_UNANSWERED_FRAMES + MAX_QUEUED_FRAMES + 16;
      for (let i = 1; i <= sends; i++) ws.send(JSON.stringify({ type: 'ack', upTo: i }));
      const serverSocket = sockets[0]!;
      await eventually(
        () => serverSocket.isPaused(),
        5_000,
        `the gateway to stop reading after ${MAX_QUEUED_FRAMES} queued frames`,
      );

      release();
      await eventually(() => !serverSocket.isPaused(), 5_000, 'reading again');
      ws.send(JSON.stringify({ type: 'ping', id: 'p' }));
      await eventually(() => frames.some((f) => f.type === 'pong'), 10_000, 'the pong');
      assert.equal(
        frames.filter((f) => f.type === 'error').length,
        0,
        'every ack taken, none refused',
      );
      ws.close();
    } finally {
      release();
      await gateway?.close();
      server?.closeAllConnections();
      await new Promise((resolve) => (server ? server.close(resolve) : resolve(undefined)));
      await chat.close();
    }
  });
});
