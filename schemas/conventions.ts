/**
 * Values that writers and readers of the event schemas must agree on, beyond the types.
 */

/** `Sync.after` meaning "every kept entry above this device's last applied ack". */
export const FROM_ACK = -1;

/** A gateway whose last heartbeat (`chat.gateways`) is older than this counts as gone. */
export const GATEWAY_SILENCE_MS = 15_000;
