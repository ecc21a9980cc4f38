/**
 * The key layout of the embedded log's RocksDB database. Every key is a string whose parts are
 * separated by '/', which Kafka topic names cannot contain, and whose numbers are zero-padded
 * so that RocksDB's byte order is offset order.
 *
 *   t/<topic>                           topic metadata (JSON)
 *   r/<topic>/<partition>/<offset>      a record
 *   h/<topic>/<partition>               the partition's next offset (its high watermark)
 *   o/<group>/<topic>/<partition>       a consumer group's committed offset
 */

const pad = (n: number, width: number) => n.toString().padStart(width, '0');

export const topicKey = (topic: string) => `t/${topic}`;
export const TOPICS = { gte: 't/', lt: 't0' };

export const recordKey = (topic: string, partition: number, offset: number) =>
  `r/${topic}/${pad(partition, 5)}/${pad(offset, 16)}`;
export const recordRange = (topic: string, partition: number, from: number, to: number) => ({
  gte: recordKey(topic, partition, from),
  lt: recordKey(topic, partition, to),
});
export const topicRecords = (topic: string) => ({ gte: `r/${topic}/`, lt: `r/${topic}0` });
/** The offset at the end of a record key. */
export const offsetOfRecordKey = (key: string) => Number(key.slice(key.length - 16));

export const highWatermarkKey = (topic: string, partition: number) =>
  `h/${topic}/${pad(partition, 5)}`;

export const offsetKey = (groupId: string, topic: string, partition: number) =>
  `o/${encodeURIComponent(groupId)}/${topic}/${pad(partition, 5)}`;
