/**
 * Who opens a WebSocket: the access token (from `Authorization: Bearer`, or the `access_token`
 * query parameter, which browsers need since they cannot set headers) and the `deviceId` of the
 * query. Refusals are plain HTTP answers written before the upgrade, with PROTOCOL.md's error
 * body.
 */
import { STATUS_CODES, type IncomingMessage } from 'node:http';
import type { Duplex } from 'node:stream';
import { MAX_DEVICE_ID } from './limits.ts';

/** Resolves to the token's userId; rejects when the token is invalid or expired. */
export type VerifyAccessToken = (token: string) => Promise<string>;

export interface Identity {
  userId: string;
  deviceId: string;
}

export const DEFAULT_DEVICE_ID = 'default';
const DEVICE_ID = new RegExp(`^[A-Za-z0-9_-]{1,${MAX_DEVICE_ID}}$`);
const BEARER = /^Bearer[ \t]+(\S+)[ \t]*$/i;

/** An upgrade refused with an HTTP status and PROTOCOL.md's error body. */
export class HandshakeRefusal extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly field?: string,
    /** Headers of the answer beyond the usual ones (`Allow`, `Sec-WebSocket-Version`). */
    readonly headers: Record<string, string> = {},
  ) {
    super(message);
    this.name = 'HandshakeRefusal';
  }

  body(): { error: { code: string; message: string; field?: string } } {
    return {
      error: {
        code: this.code,
        message: this.message,
        ...(this.field === undefined ? {} : { field: this.field }),
      },
    };
  }
}

/** The bearer token of the header, else the `access_token` query parameter. */
export function accessTokenOf(request: IncomingMessage, url: URL): string | undefined {
  const header = request.headers.authorization;
  const bearer = header === undefined ? undefined : BEARER.exec(header)?.[1];
  if (bearer !== undefined) return bearer;
  const query = url.searchParams.get('access_token');
  return query === null || query === '' ? undefined : query;
}

/** The `deviceId` query parameter, `default` when absent. */
export function deviceIdOf(url: URL): string {
  const deviceId = url.searchParams.get('deviceId');
  if (deviceId === null) return DEFAULT_DEVICE_ID;
  if (!DEVICE_ID.test(deviceId)) {
    throw new HandshakeRefusal(
      400,
      'bad_request',
      `deviceId must be 1 to ${MAX_DEVICE_ID} characters of A-Z, a-z, 0-9, "_" and "-"`,
      'deviceId',
    );
  }
  return deviceId;
}

/**
 * The identity of an upgrade request, or a HandshakeRefusal: 401 for a missing, invalid or
 * expired token (checked first), 400 for a bad deviceId.
 */
export async function authenticate(
  request: IncomingMessage,
  verifyAccessToken: VerifyAccessToken,
): Promise<Identity> {
  const url = new URL(request.url ?? '/', 'http://localhost');
  const token = accessTokenOf(request, url);
  if (token === undefined) {
    throw new HandshakeRefusal(
      401,
      'unauthorized',
      'an access token is required (Authorization: Bearer, or access_token in the query)',
    );
  }
  let userId: string;
  try {
    userId = await verifyAccessToken(token);
  } catch {
    throw new HandshakeRefusal(
      401,
      'unauthorized',
      'the access token is invalid or expired',
      undefined,
      { 'WWW-Authenticate': 'Bearer realm="kchat", error="invalid_token"' },
    );
  }
  return { userId, deviceId: deviceIdOf(url) };
}

/**
 * The handshake a WebSocket server refuses once the token and deviceId passed (ws's checks:
 * method, Upgrade, Sec-WebSocket-Key and -Version, -Protocol and -Extensions), in PROTOCOL's
 * error shape instead of ws's text/html answer: 405 for a method other than GET, else 400.
 */
export function malformedHandshake(request: IncomingMessage, error: Error): HandshakeRefusal {
  if (request.method !== 'GET')
    return new HandshakeRefusal(
      405,
      'bad_request',
      `a WebSocket opens with GET, not ${request.method}`,
      undefined,
      { Allow: 'GET' },
    );
  const version = /Sec-WebSocket-Version/.test(error.message);
  return new HandshakeRefusal(
    400,
    'bad_request',
    `not a valid WebSocket handshake: ${error.message}`,
    undefined,
    version ? { 'Sec-WebSocket-Version': '13, 8' } : {},
  );
}

/** Answers an upgrade request with a plain HTTP response and closes its socket. */
export function refuseUpgrade(socket: Duplex, refusal: HandshakeRefusal): void {
  // Node listens no more for errors of a socket it handed to 'upgrade': a peer that resets it
  // while the answer is written (ECONNRESET, emitted a tick later) must not take the process down.
  socket.on('error', () => socket.destroy());
  if (socket.destroyed || !socket.writable) {
    socket.destroy();
    return;
  }
  const body = JSON.stringify(refusal.body());
  const headers = [
    `HTTP/1.1 ${refusal.status} ${STATUS_CODES[refusal.status] ?? ''}`,
    'Connection: close',
    'Content-Type: application/json; charset=utf-8',
    'Cache-Control: no-store',
    `Content-Length: ${Buffer.byteLength(body)}`,
    // As the API answers a 401 (RFC 6750): the realm, and the error when a token was given.
    ...Object.entries({
      ...(refusal.status === 401 ? { 'WWW-Authenticate': 'Bearer realm="kchat"' } : {}),
      ...refusal.headers,
    }).map(([name, value]) => `${name}: ${value}`),
  ];
  socket.once('finish', () => socket.destroy());
  socket.end(`${headers.join('\r\n')}\r\n\r\n${body}`);
}
