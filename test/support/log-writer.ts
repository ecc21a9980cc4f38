/**
 * A child process for the durability test: appends records to the embedded log as fast as it
 * can and prints each acknowledged partition:offset on stdout, until it is killed.
 *   tsx test/support/log-writer.ts <dataDir> <topic>
 */
import { EmbeddedLog } from '../../log/embedded/embedded-log.ts';

const [dataDir, topic] = process.argv.slice(2) as [string, string];
const log = await EmbeddedLog.open({ dataDir, cleanerIntervalMs: 0 });
await log.admin.createTopics([{ topic, partitions: 4 }]);
const producer = await log.producer();
process.stdout.write('ready\n');
for (let round = 0; ; round++) {
  // Several sends in flight at once, so that group commit batches them together.
  const sends = Array.from({ length: 8 }, (_, s) =>
    producer.send(
      Array.from({ length: 25 }, (_, i) => ({
        topic,
        key: Buffer.from(`k${(round * 8 + s) * 25 + i}`),
        value: Buffer.from(`r${round}-s${s}-i${i}`),
      })),
    ),
  );
  for (const metadata of await Promise.all(sends)) {
    process.stdout.write(`${metadata.map((m) => `${m.partition}:${m.offset}`).join(' ')}\n`);
  }
}
