/**
 * How one record is stored in the embedded log: a small, versioned binary layout.
 *
 *   u8 version (1) | f64 timestamp | i32 key length (-1: null) | key
 *   | i32 value length (-1: null) | value | u16 header count | (u16 name length | name | u32 length | value)*
 */
import type { Headers } from '../port.ts';

const VERSION = 1;

export interface StoredRecord {
  timestamp: number;
  key: Buffer | null;
  value: Buffer | null;
  headers: Headers;
}

export function encodeRecord(record: StoredRecord): Buffer {
  const headerNames = Object.keys(record.headers);
  const names = headerNames.map((name) => Buffer.from(name, 'utf8'));
  let size = 1 + 8 + 4 + (record.key?.length ?? 0) + 4 + (record.value?.length ?? 0) + 2;
  for (let i = 0; i < names.length; i++) {
    size += 2 + names[i]!.length + 4 + record.headers[headerNames[i]!]!.length;
  }
  const out = Buffer.allocUnsafe(size);
  let at = out.writeUInt8(VERSION, 0);
  at = out.writeDoubleBE(record.timestamp, at);
  at = writeBytes(out, at, record.key);
  at = writeBytes(out, at, record.value);
  at = out.writeUInt16BE(names.length, at);
  for (let i = 0; i < names.length; i++) {
    at = out.writeUInt16BE(names[i]!.length, at);
    at += names[i]!.copy(out, at);
    const value = record.headers[headerNames[i]!]!;
    at = out.writeUInt32BE(value.length, at);
    at += value.copy(out, at);
  }
  return out;
}

export function decodeRecord(data: Buffer): StoredRecord {
  const version = data.readUInt8(0);
  if (version !== VERSION) throw new Error(`unknown stored record version ${version}`);
  let at = 1;
  const timestamp = data.readDoubleBE(at);
  at += 8;
  const [key, afterKey] = readBytes(data, at);
  const [value, afterValue] = readBytes(data, afterKey);
  at = afterValue;
  const count = data.readUInt16BE(at);
  at += 2;
  const headers: Headers = {};
  for (let i = 0; i < count; i++) {
    const nameLength = data.readUInt16BE(at);
    at += 2;
    const name = data.toString('utf8', at, at + nameLength);
    at += nameLength;
    const length = data.readUInt32BE(at);
    at += 4;
    headers[name] = Buffer.from(data.subarray(at, at + length));
    at += length;
  }
  return { timestamp, key, value, headers };
}

function writeBytes(out: Buffer, at: number, bytes: Buffer | null): number {
  if (bytes === null) return out.writeInt32BE(-1, at);
  at = out.writeInt32BE(bytes.length, at);
  return at + bytes.copy(out, at);
}

function readBytes(data: Buffer, at: number): [Buffer | null, number] {
  const length = data.readInt32BE(at);
  if (length < 0) return [null, at + 4];
  return [Buffer.from(data.subarray(at + 4, at + 4 + length)), at + 4 + length];
}
