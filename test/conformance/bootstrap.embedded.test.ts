/**
 * bootstrap: the chat topics exist with PARTITIONS partitions when it creates them; topics that
 * exist keep their count, and a count other than PARTITIONS is logged as a warning.
 */
import assert from 'node:assert/strict';
import { Writable } from 'node:stream';
import { pino } from 'pino';
import { bootstrap } from '../../app/bootstrap.ts';
import { topics, topicSpecs } from '../../schemas/topics.ts';
import { openEmbeddedChat, type EmbeddedChat } from '../support/embedded-chat.ts';

describe('bootstrap (embedded log)', () => {
  let chat: EmbeddedChat;
  const lines: Array<Record<string, unknown>> = [];
  const logger = pino(
    { level: 'info' },
    new Writable({
      write(chunk: Buffer, _encoding, callback) {
        lines.push(JSON.parse(chunk.toString('utf8')) as Record<string, unknown>);
        callback();
      },
    }),
  );

  before(async () => {
    chat = await openEmbeddedChat(4, 'kchat-bootstrap-');
  });
  after(async () => {
    await chat?.close();
  });
  beforeEach(() => (lines.length = 0));

  it('says nothing when the topics have PARTITIONS partitions', async () => {
    await bootstrap(chat.log, chat.registry, 4, logger);
    assert.deepEqual(
      lines.filter((l) => l.level === 40),
      [],
    );
  });

  it('keeps the partitions of existing topics and warns, naming each, when PARTITIONS differs', async () => {
    await bootstrap(chat.log, chat.registry, 6, logger);
    const warnings = lines.filter((l) => l.level === 40);
    assert.equal(warnings.length, 1, JSON.stringify(lines));
    assert.equal(warnings[0]!.partitions, 6);
    const named = warnings[0]!.topics as Record<string, number>;
    assert.deepEqual(Object.keys(named).sort(), Object.keys(topicSpecs).sort());
    assert.ok(Object.values(named).every((count) => count === 4));
    assert.equal((await chat.log.admin.describeTopic(topics.messages))?.partitions, 4);
  });
});
