/**
 * The Confluent adapter's handling of registry failures, against an in-process HTTP
 * stub on an ephemeral port of 127.0.0.1 (no real registry, nothing outside this process).
 * Each case once hung a decode, or dead-lettered a good record for good (found by a review helper,
 * session 18).
 */
import assert from 'node:assert/strict';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import { ConfluentSchemaRegistry } from '../../schemas/registry/confluent.ts';
import { DecodeError, TopicCodec } from '../../schemas/codec.ts';
import { loadType } from '../../schemas/avro.ts';
import { isRetriable } from '../../processors/runtime/errors.ts';

type Handler = (req: http.IncomingMessage, res: http.ServerResponse) => void;
let handler: Handler;
let server: http.Server;
let url: string;
const pending: http.ServerResponse[] = [];

/** A record of chat.accounts written with schema id 99 (not the codec's own, 7). */
function recordWithId99(): Buffer {
  const body = loadType('Account').toBuffer({ userId: 'u', displayName: 'U', createdAt: 1 });
  return Buffer.concat([Buffer.from([0, 0, 0, 0, 99]), body]);
}

function codec(): TopicCodec<object> {
  const registry = new ConfluentSchemaRegistry(url);
  return new TopicCodec('chat.accounts', 7, loadType('Account'), registry);
}

describe('Confluent registry adapter against a misbehaving registry (in-process stub)', function () {
  this.timeout(30_000);
  before(async () => {
    server = http.createServer((req, res) => handler(req, res));
    await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
    url = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  });
  after(async () => {
    for (const res of pending) res.destroy();
    server.closeAllConnections();
    await new Promise((resolve) => server.close(resolve));
  });

  it('a registry that accepts the request and never answers: decode settles (retriable) instead of hanging', async () => {
    handler = (_req, res) => void pending.push(res); // never answered
    const outcome = await Promise.race([
      codec()
        .decode(recordWithId99())
        .then(
          () => 'decoded',
          (e: unknown) => `rejected: ${(e as Error).name}`,
        ),
      new Promise((resolve) => setTimeout(() => resolve('still pending after 15 s'), 15_000)),
    ]);
    assert.match(String(outcome), /^rejected: RegistryUnavailableError/);
  });

  it('a registry that never answers a registration: the error says so, not "status 400"', async () => {
    handler = (_req, res) => void pending.push(res); // never answered
    await assert.rejects(
      new ConfluentSchemaRegistry(url).register(
        'chat.accounts-value',
        JSON.stringify(loadType('Account').schema()),
      ),
      (error: Error) => {
        assert.match(error.message, /no answer within 5000 ms/);
        assert.doesNotMatch(error.message, /status 400/);
        return true;
      },
    );
  });

  it('a 404 that is not the registry saying "schema not found" (a proxy, a wrong path) is retriable, not a bad record', async () => {
    handler = (_req, res) => {
      res.writeHead(404, { 'content-type': 'text/html' });
      res.end('<html><body>404 Not Found</body></html>');
    };
    const error = await codec()
      .decode(recordWithId99())
      .then(
        () => undefined,
        (e: unknown) => e,
      );
    assert.ok(
      !(error instanceof DecodeError) && isRetriable(error),
      `dead-lettered as a bad record: ${String(error)}`,
    );
  });

  it('an answer without a schema is not cached: once the registry answers properly, the record decodes', async () => {
    let broken = true;
    handler = (_req, res) => {
      res.writeHead(200, { 'content-type': 'application/json' });
      res.end(
        broken ? '{}' : JSON.stringify({ schema: JSON.stringify(loadType('Account').schema()) }),
      );
    };
    const c = codec();
    await assert.rejects(() => c.decode(recordWithId99()));
    broken = false;
    await assert.doesNotReject(() => c.decode(recordWithId99()), 'the broken answer stayed cached');
  });

  it('an id whose schema is not Avro (JSON Schema, Protobuf, or no parse) makes the record bad for good, not a registry to wait for', async () => {
    for (const answer of [
      { schemaType: 'JSON', schema: '{"type":"object"}' },
      { schemaType: 'PROTOBUF', schema: 'syntax = "proto3"; message M {}' },
      { schema: '{"type":"object"}' },
    ]) {
      let asked = 0;
      handler = (_req, res) => {
        asked++;
        res.writeHead(200, { 'content-type': 'application/json' });
        res.end(JSON.stringify(answer));
      };
      const c = codec();
      for (let i = 0; i < 2; i++) {
        const error = await c.decode(recordWithId99()).then(
          () => undefined,
          (e: unknown) => e,
        );
        assert.ok(error instanceof DecodeError, `${JSON.stringify(answer)}: ${String(error)}`);
        assert.ok(!isRetriable(error));
        assert.match(error.message, /schema id 99 is not an Avro schema/);
      }
      assert.equal(asked, 1, 'an id names one schema for good: asked once');
    }
  });
});
