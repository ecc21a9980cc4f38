/**
 * The ceiling of the chat benchmark: a minimal WebSocket relay with the same frames as the chat
 * (`send` in; `sent` to the sender, `message` to the recipient), and nothing else: no
 * authentication, no log, no durability, no inbox. What a Node `ws` path reaches on this machine.
 *
 *   PORT=8090 node --import tsx bench/chat/relay.ts
 *
 * A client names itself in the query: /v1/ws?user=<userId>.
 */
import { createServer } from 'node:http';
import { WebSocketServer, type WebSocket } from 'ws';

const sockets = new Map<string, WebSocket>();
let nextMessageId = 0;

const server = createServer((_request, response) => {
  response.writeHead(200, { 'content-type': 'application/json' });
  response.end('{"status":"ok"}');
});
const wss = new WebSocketServer({ server, path: '/v1/ws' });
wss.on('connection', (ws, request) => {
  const user = new URL(request.url ?? '/', 'http://relay').searchParams.get('user') ?? '';
  sockets.set(user, ws);
  ws.on('close', () => sockets.get(user) === ws && sockets.delete(user));
  ws.on('message', (data) => {
    let frame: { type?: string; id?: string; to?: string; body?: unknown };
    try {
      frame = JSON.parse(data.toString()) as typeof frame;
    } catch {
      return;
    }
    if (frame.type !== 'send' || typeof frame.to !== 'string') return;
    const messageId = `m${++nextMessageId}`;
    const at = Date.now();
    ws.send(JSON.stringify({ type: 'sent', id: frame.id, messageId, at }));
    sockets.get(frame.to)?.send(
      JSON.stringify({
        type: 'message',
        messageId,
        from: user,
        to: frame.to,
        body: frame.body,
        at,
      }),
    );
  });
  ws.send(JSON.stringify({ type: 'ready' }));
});
server.listen(Number(process.env.PORT ?? 8090), '127.0.0.1', () => console.log('relay listening'));
process.on('SIGTERM', () => process.exit(0));
