/**
 * The decider: an actor's logic as two pure functions, with every effect left to the runtime.
 *
 *   decide(command, state) -> events     what happens, given what is known
 *   evolve(state, event)   -> state      what is known after it happened
 *
 * `deciderProcessor` runs one per key (a user, a group): it loads the key's state from a store,
 * decides, evolves, stores the new state and forwards the events. The same functions rebuild any
 * state from an event history (`replay`), which is how an analyst reconstructs it.
 */
import type { Processor, ProcessorContext, ProcessorSupplier, Record } from './topology.ts';
import type { KeyValueStore } from '../../state/store.ts';

export interface Decider<C, S, E> {
  initialState(): S;
  decide(command: C, state: S): E[];
  evolve(state: S, event: E): S;
}

/** Folds events into a state. */
export function replay<C, S, E>(
  decider: Decider<C, S, E>,
  events: Iterable<E>,
  state = decider.initialState(),
): S {
  let current = state;
  for (const event of events) current = decider.evolve(current, event);
  return current;
}

/** Decides and evolves a sequence of commands from a state: the events, and the state after. */
export function run<C, S, E>(
  decider: Decider<C, S, E>,
  commands: Iterable<C>,
  state = decider.initialState(),
): { events: E[]; state: S } {
  const events: E[] = [];
  let current = state;
  for (const command of commands) {
    const decided = decider.decide(command, current);
    current = replay(decider, decided, current);
    events.push(...decided);
  }
  return { events, state: current };
}

export interface DeciderProcessorOptions<C, S, E, VOut> {
  decider: Decider<C, S, E>;
  /** The store that holds each key's state. */
  store: string;
  /**
   * What to forward for the events decided on a command (by default each event, keyed like
   * the command). Returning records keyed otherwise routes them to other partitions' owners.
   */
  emit?: (events: E[], command: Record<C>) => Array<Record<VOut>>;
}

export function deciderProcessor<C, S, E, VOut = E>(
  options: DeciderProcessorOptions<C, S, E, VOut>,
): ProcessorSupplier<C, VOut> {
  return () => new DeciderProcessor(options);
}

class DeciderProcessor<C, S, E, VOut> implements Processor<C, VOut> {
  private context!: ProcessorContext<VOut>;
  private states!: KeyValueStore<S>;

  constructor(private readonly options: DeciderProcessorOptions<C, S, E, VOut>) {}

  init(context: ProcessorContext<VOut>): void {
    this.context = context;
    this.states = context.getStateStore<S>(this.options.store);
  }

  async process(command: Record<C>): Promise<void> {
    const { decider, emit } = this.options;
    const state = (await this.states.get(command.key)) ?? decider.initialState();
    const events = decider.decide(command.value, state);
    if (events.length === 0) return;
    const next = replay(decider, events, state);
    // An evolve that returns the state it was given changed nothing: no store or changelog write.
    if (next !== state) this.states.put(command.key, next);
    const outputs = emit
      ? emit(events, command)
      : events.map((event) => ({ ...command, value: event as unknown as VOut }));
    for (const output of outputs) await this.context.forward(output);
  }
}
