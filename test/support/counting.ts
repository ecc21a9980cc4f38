/**
 * The counting topology of the runtime tests: counts records per key and emits the running
 * count. After any number of crashes, the output must hold exactly 1, 2, ..., n for a key
 * seen n times: no count twice, none missing.
 */
import {
  Topology,
  type Processor,
  type ProcessorContext,
  type Record,
} from '../../processors/runtime/topology.ts';
import type { KeyValueStore } from '../../state/store.ts';

export const POISON = 'poison';

export class UndecodableError extends Error {}

class CountProcessor implements Processor<string, number> {
  private context!: ProcessorContext<number>;
  private counts!: KeyValueStore<number>;

  init(context: ProcessorContext<number>): void {
    this.context = context;
    this.counts = context.getStateStore<number>('counts');
  }

  async process(record: Record<string>): Promise<void> {
    const count = ((await this.counts.get(record.key)) ?? 0) + 1;
    this.counts.put(record.key, count);
    await this.context.forward({ ...record, value: count });
  }
}

export function countingTopology(input: string | string[], output: string): Topology {
  return new Topology()
    .addSource('input', {
      topics: Array.isArray(input) ? input : [input],
      decode: (value) => {
        const text = value?.toString('utf8') ?? '';
        if (text === POISON) throw new UndecodableError('not a word: poison');
        return text;
      },
    })
    .addProcessor('count', () => new CountProcessor(), 'input')
    .addStateStore({ name: 'counts' }, 'count')
    .addSink('output', { topic: output, encode: (n: number) => Buffer.from(String(n)) }, 'count');
}
