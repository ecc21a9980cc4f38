/**
 * The messageId of a `send`: derived from (sender, deviceId, client id), never drawn at random,
 * so that a retried send gets the same messageId on any gateway, and the users actor, which
 * keeps one entry per messageId, stores it once.
 */
import { createHash } from 'node:crypto';

/** Names the derivation, so that a later scheme cannot produce the same ids by accident. */
const SCHEME = 'kchat.messageId.v1';

/**
 * base64url of SHA-256 over the three fields, each prefixed by its UTF-8 length (4 bytes,
 * big-endian): no two distinct triples hash the same input ("ab","c" differs from "a","bc").
 * 43 characters of [A-Za-z0-9_-].
 */
export function messageIdFor(sender: string, deviceId: string, clientId: string): string {
  const hash = createHash('sha256');
  for (const field of [SCHEME, sender, deviceId, clientId]) {
    const bytes = Buffer.from(field, 'utf8');
    const length = Buffer.allocUnsafe(4);
    length.writeUInt32BE(bytes.length, 0);
    hash.update(length);
    hash.update(bytes);
  }
  return hash.digest('base64url');
}
