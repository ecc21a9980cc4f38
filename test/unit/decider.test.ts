/**
 * The decider shape, tested as a table of command, state and expected events, with no log, no
 * store and no clock; then the processor that runs it, on an in-memory store.
 */
import assert from 'node:assert/strict';
import { deciderProcessor, replay, run, type Decider } from '../../processors/runtime/decider.ts';
import type { ProcessorContext, Record } from '../../processors/runtime/topology.ts';
import { InMemoryKeyValueStore } from '../../state/store.ts';

// A small account: deposits, and withdrawals that may not overdraw it.
type Command = { type: 'deposit'; amount: number } | { type: 'withdraw'; amount: number };
type Event =
  | { type: 'deposited'; amount: number }
  | { type: 'withdrawn'; amount: number }
  | { type: 'refused'; amount: number };
type State = { balance: number };

const account: Decider<Command, State, Event> = {
  initialState: () => ({ balance: 0 }),
  decide(command, state) {
    if (command.amount <= 0) return [];
    if (command.type === 'deposit') return [{ type: 'deposited', amount: command.amount }];
    return command.amount > state.balance
      ? [{ type: 'refused', amount: command.amount }]
      : [{ type: 'withdrawn', amount: command.amount }];
  },
  evolve(state, event) {
    if (event.type === 'deposited') return { balance: state.balance + event.amount };
    if (event.type === 'withdrawn') return { balance: state.balance - event.amount };
    return state;
  },
};

describe('decider', () => {
  const table: Array<[string, Command, State, Event[]]> = [
    [
      'a deposit is accepted',
      { type: 'deposit', amount: 5 },
      { balance: 0 },
      [{ type: 'deposited', amount: 5 }],
    ],
    [
      'a covered withdrawal happens',
      { type: 'withdraw', amount: 3 },
      { balance: 5 },
      [{ type: 'withdrawn', amount: 3 }],
    ],
    [
      'an overdraft is refused',
      { type: 'withdraw', amount: 9 },
      { balance: 5 },
      [{ type: 'refused', amount: 9 }],
    ],
    ['a zero amount changes nothing', { type: 'deposit', amount: 0 }, { balance: 5 }, []],
  ];
  for (const [what, command, state, events] of table) {
    it(what, () => assert.deepEqual(account.decide(command, state), events));
  }

  it('rebuilds state by replaying events', () => {
    const { events, state } = run(account, [
      { type: 'deposit', amount: 10 },
      { type: 'withdraw', amount: 4 },
      { type: 'withdraw', amount: 100 },
    ]);
    assert.deepEqual(state, { balance: 6 });
    assert.deepEqual(replay(account, events), state);
  });

  it('runs as a processor: state per key in a store, events forwarded', async () => {
    const store = new InMemoryKeyValueStore<State>('accounts');
    const forwarded: Array<Record<Event>> = [];
    const context = {
      getStateStore: () => store,
      forward: async (record: Record<Event>) => void forwarded.push(record),
    } as unknown as ProcessorContext<Event>;
    const processor = deciderProcessor<Command, State, Event>({
      decider: account,
      store: 'accounts',
    })();
    await processor.init?.(context);
    const at = 1_700_000_000_000;
    await processor.process({ key: 'alice', value: { type: 'deposit', amount: 7 }, timestamp: at });
    await processor.process({ key: 'bob', value: { type: 'withdraw', amount: 1 }, timestamp: at });
    await processor.process({
      key: 'alice',
      value: { type: 'withdraw', amount: 2 },
      timestamp: at,
    });
    assert.deepEqual(await store.get('alice'), { balance: 5 });
    assert.deepEqual(await store.get('bob'), undefined, 'a refusal changes no state');
    assert.deepEqual(
      forwarded.map((r) => [r.key, r.value.type]),
      [
        ['alice', 'deposited'],
        ['bob', 'refused'],
        ['alice', 'withdrawn'],
      ],
    );
  });
});
