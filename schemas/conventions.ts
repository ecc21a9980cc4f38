/**
 * Values that writers and readers of the event schemas must agree on, beyond the types.
 */

/** `Sync.after` meaning "every kept entry above this device's last applied ack". */
export const FROM_ACK = -1;

/** A gateway whose last heartbeat (`chat.gateways`) is older than this counts as gone. */
export const GATEWAY_SILENCE_MS = 15_000;

/**
 * A UTF-16 surrogate not in a pair (a `u` regex sees a pair as one code point). Text holding one
 * is not Unicode and has no UTF-8 form: no string written to an event may hold one, and the
 * gateway and the API refuse it where a client sends text.
 */
export const LONE_SURROGATE = /[\uD800-\uDFFF]/u;
