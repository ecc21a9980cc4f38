/**
 * The API's throttles hold a bounded number of clients: a client with many addresses must not
 * make the process hold a key and a timer for each (the soak review held 20,000 in 12 s).
 */
import assert from 'node:assert/strict';
import { AddressLimit, LoginThrottle } from '../../api/throttles.ts';
import { HttpError } from '../../api/errors.ts';

const refused = (error: unknown) => error instanceof HttpError && error.status === 429;

describe('API throttles: bounded', () => {
  it('holds at most its capacity of addresses, forgetting the least recently seen', async () => {
    const limit = new AddressLimit('registrations', 1, 3);
    await limit.attempt('10.0.0.1');
    await assert.rejects(limit.attempt('10.0.0.1'), refused, 'one an hour');
    await limit.attempt('10.0.0.2');
    await limit.attempt('10.0.0.3');
    await limit.attempt('10.0.0.4'); // 10.0.0.1 is forgotten
    const byAddress = limit.byAddress!;
    assert.equal(byAddress.size, 3);
    assert.equal(await byAddress.limiter.get('10.0.0.1'), null, 'gone from the limiter too');
    for (const held of ['10.0.0.2', '10.0.0.3', '10.0.0.4'])
      assert.notEqual(await byAddress.limiter.get(held), null, held);
    await limit.attempt('10.0.0.1'); // a full allowance again
    await assert.rejects(limit.attempt('10.0.0.4'), refused, 'the recent ones keep their count');
  });

  it('holds at most its capacity of login keys, however many addresses fail', async () => {
    const throttle = new LoginThrottle(undefined, 100);
    for (let i = 0; i < 1_000; i++) {
      const address = `2001:db8:${(i >> 8).toString(16)}:${(i & 0xff).toString(16)}::1`;
      await throttle.attempt('alice', address);
    }
    for (const limiter of [throttle.byUserAndAddress, throttle.byAddress, throttle.everyByAddress])
      assert.equal(limiter.size, 100);
  });
});
