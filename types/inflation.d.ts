// inflation ships no types: it pipes a request through the zlib decoder its Content-Encoding
// names (gzip, deflate, br), or returns it as it is for identity; an unknown one throws (415).
declare module 'inflation' {
  import type { Readable } from 'node:stream';

  export default function inflate(
    stream: Readable & { headers?: Record<string, string | string[] | undefined> },
    options?: { encoding?: string },
  ): Readable;
}
