/** Error types a caller can act on, in the manner of kafkajs's KafkaJS*Error family. */

export class LogError extends Error {
  /** Whether the same call may succeed if tried again later. */
  readonly retriable: boolean;
  constructor(message: string, options: { retriable?: boolean; cause?: unknown } = {}) {
    super(message, { cause: options.cause });
    this.name = new.target.name;
    this.retriable = options.retriable ?? false;
  }
}

/** The topic does not exist. */
export class UnknownTopicError extends LogError {
  constructor(readonly topic: string) {
    super(`unknown topic "${topic}"`);
  }
}

/** A newer producer with the same transactional id exists; this one must stop. */
export class ProducerFencedError extends LogError {
  constructor(readonly transactionalId: string) {
    super(`producer with transactional id "${transactionalId}" was fenced by a newer one`);
  }
}

/** The log is closed or closing. */
export class LogClosedError extends LogError {
  constructor() {
    super('the log is closed');
  }
}

/** A call was made that the state of the object does not allow (e.g. two open transactions). */
export class IllegalStateError extends LogError {}

/** The records given to produce are not acceptable (bad partition, empty topic name...). */
export class InvalidRecordError extends LogError {}
