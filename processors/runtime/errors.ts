/** Errors of the stream-processing runtime. */

export class StreamsError extends Error {
  constructor(message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = new.target.name;
  }
}

/** Co-partitioned source topics have different partition counts. */
export class CoPartitioningError extends StreamsError {
  constructor(readonly counts: Array<{ topic: string; partitions: number }>) {
    super(
      `co-partitioned topics must have the same number of partitions: ${counts
        .map((c) => `${c.topic} (${c.partitions})`)
        .join(', ')}`,
    );
  }
}

/**
 * Thrown by a processor when the same record may succeed later (a service is unreachable):
 * the runtime retries it with backoff instead of sending it to the dead-letter topic.
 */
export class RetriableError extends StreamsError {
  readonly retriable = true;
}

export function isRetriable(error: unknown): boolean {
  return (error as { retriable?: unknown } | null)?.retriable === true;
}
