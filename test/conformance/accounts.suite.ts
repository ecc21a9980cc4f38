/**
 * The accounts ports' conformance suite (AccountRepository, RefreshTokenRepository): run on the
 * embedded adapter (accounts.embedded.test.ts), and unchanged on every other adapter.
 */
import assert from 'node:assert/strict';
import { createHash, randomBytes, randomUUID } from 'node:crypto';
import {
  AccountExistsError,
  type AccountRecord,
  type AccountStores,
  type RefreshTokenGrant,
} from '../../state/accounts/port.ts';
import { uniqueName } from '../support/log-helpers.ts';

const DAY_MS = 24 * 3600_000;

const account = (userId: string, displayName = userId): AccountRecord => ({
  userId,
  displayName,
  createdAt: 1_700_000_000_000,
  passwordHash: '$scrypt$ln=4,r=8,p=1$c2FsdA$aGFzaA',
});

/** A fresh token hash, as the API computes it: SHA-256 of 32 random bytes, hex. */
const tokenHash = () => createHash('sha256').update(randomBytes(32)).digest('hex');

const grant = (familyId = randomUUID(), userId = uniqueName('user')): RefreshTokenGrant => ({
  userId,
  familyId,
  expiresAt: Date.now() + 30 * DAY_MS,
});

export function accountsConformance(
  adapter: string,
  open: () => Promise<AccountStores>,
  close: () => Promise<void>,
) {
  describe(`accounts conformance: ${adapter}`, function () {
    let stores: AccountStores;
    before(async () => {
      stores = await open();
    });
    after(close);

    describe('AccountRepository', () => {
      it('creates an account and gets it back as it was given', async () => {
        const created = account(uniqueName('alice'), 'Alice Liddell');
        await stores.accounts.create(created);
        assert.deepEqual(await stores.accounts.get(created.userId), created);
      });

      it('answers undefined for an account that does not exist', async () => {
        assert.equal(await stores.accounts.get(uniqueName('nobody')), undefined);
      });

      it('refuses a taken userId with AccountExistsError, keeping the first account', async () => {
        const first = account(uniqueName('bob'), 'First');
        await stores.accounts.create(first);
        await assert.rejects(
          stores.accounts.create({ ...first, displayName: 'Second', passwordHash: 'other' }),
          (error: unknown) => error instanceof AccountExistsError && error.userId === first.userId,
        );
        assert.deepEqual(await stores.accounts.get(first.userId), first);
      });

      it('of 20 concurrent creates of one userId, exactly one succeeds', async () => {
        const userId = uniqueName('carol');
        const results = await Promise.allSettled(
          Array.from({ length: 20 }, (_, i) =>
            stores.accounts.create({ ...account(userId), displayName: `attempt ${i}` }),
          ),
        );
        const fulfilled = results.flatMap((r, i) => (r.status === 'fulfilled' ? [i] : []));
        assert.equal(fulfilled.length, 1);
        for (const result of results) {
          if (result.status === 'rejected')
            assert.ok(result.reason instanceof AccountExistsError, String(result.reason));
        }
        assert.equal(
          (await stores.accounts.get(userId))?.displayName,
          `attempt ${fulfilled[0]}`,
          'the account kept is the one whose create succeeded',
        );
      });

      it('concurrent creates of different userIds all succeed', async () => {
        const userIds = Array.from({ length: 20 }, () => uniqueName('dave'));
        await Promise.all(userIds.map((userId) => stores.accounts.create(account(userId))));
        for (const userId of userIds)
          assert.equal((await stores.accounts.get(userId))?.userId, userId);
      });

      it('updates the display name, keeping everything else', async () => {
        const created = account(uniqueName('erin'));
        await stores.accounts.create(created);
        const updated = await stores.accounts.updateDisplayName(created.userId, 'Erin');
        assert.deepEqual(updated, { ...created, displayName: 'Erin' });
        assert.deepEqual(await stores.accounts.get(created.userId), updated);
      });

      it('keeps every created or renamed account in the outbox until its publication is confirmed', async () => {
        const created = account(uniqueName('olga'));
        const pending = async () =>
          (await stores.accounts.unpublished(100_000)).filter((a) => a.userId === created.userId);
        await stores.accounts.create(created);
        const { passwordHash: _hash, ...publicPart } = created;
        assert.deepEqual(await pending(), [publicPart], 'the public part, never the hash');

        await stores.accounts.markPublished(publicPart);
        assert.deepEqual(await pending(), []);

        await stores.accounts.updateDisplayName(created.userId, 'Olga');
        assert.deepEqual(await pending(), [{ ...publicPart, displayName: 'Olga' }]);
        // A confirmation of the old name (a publication racing the rename) keeps the new one.
        await stores.accounts.markPublished(publicPart);
        assert.deepEqual(await pending(), [{ ...publicPart, displayName: 'Olga' }]);
        await stores.accounts.markPublished({ ...publicPart, displayName: 'Olga' });
        assert.deepEqual(await pending(), []);
      });

      it('answers at most limit outbox entries', async () => {
        for (let i = 0; i < 3; i++) await stores.accounts.create(account(uniqueName('pia')));
        assert.equal((await stores.accounts.unpublished(2)).length, 2);
      });

      it('answers undefined when updating an account that does not exist, creating none', async () => {
        const userId = uniqueName('nobody');
        assert.equal(await stores.accounts.updateDisplayName(userId, 'Ghost'), undefined);
        assert.equal(await stores.accounts.get(userId), undefined);
      });
    });

    describe('RefreshTokenRepository', () => {
      it('stores a token by its hash; its first consume answers consumed with the grant', async () => {
        const hash = tokenHash();
        const stored = grant();
        await stores.refreshTokens.store(hash, stored);
        assert.deepEqual(await stores.refreshTokens.consume(hash), {
          state: 'consumed',
          grant: stored,
        });
      });

      it('answers undefined for an unknown token', async () => {
        assert.equal(await stores.refreshTokens.consume(tokenHash()), undefined);
      });

      it('a second consume of one token answers reused, with the grant', async () => {
        const hash = tokenHash();
        const stored = grant();
        await stores.refreshTokens.store(hash, stored);
        await stores.refreshTokens.consume(hash);
        assert.deepEqual(await stores.refreshTokens.consume(hash), {
          state: 'reused',
          grant: stored,
        });
        assert.equal((await stores.refreshTokens.consume(hash))?.state, 'reused');
      });

      it('of 20 concurrent consumes of one token, exactly one is consumed', async () => {
        const hash = tokenHash();
        await stores.refreshTokens.store(hash, grant());
        const outcomes = await Promise.all(
          Array.from({ length: 20 }, () => stores.refreshTokens.consume(hash)),
        );
        const states = outcomes.map((outcome) => outcome?.state);
        assert.equal(states.filter((state) => state === 'consumed').length, 1);
        assert.equal(states.filter((state) => state === 'reused').length, 19);
      });

      it('tokens are independent: consuming one leaves the others of its family', async () => {
        const familyId = randomUUID();
        const [a, b] = [tokenHash(), tokenHash()];
        await stores.refreshTokens.store(a, grant(familyId));
        await stores.refreshTokens.store(b, grant(familyId));
        assert.equal((await stores.refreshTokens.consume(a))?.state, 'consumed');
        assert.equal((await stores.refreshTokens.consume(b))?.state, 'consumed');
      });

      it('a revoked token answers revoked, before and after a consume', async () => {
        const [fresh, used] = [tokenHash(), tokenHash()];
        const stored = grant();
        await stores.refreshTokens.store(fresh, stored);
        await stores.refreshTokens.store(used, grant());
        await stores.refreshTokens.consume(used);
        await stores.refreshTokens.revoke(fresh);
        await stores.refreshTokens.revoke(used);
        assert.deepEqual(await stores.refreshTokens.consume(fresh), {
          state: 'revoked',
          grant: stored,
        });
        assert.equal((await stores.refreshTokens.consume(used))?.state, 'revoked');
        await stores.refreshTokens.revoke(fresh); // twice is no error
      });

      it('revoking an unknown token is no error and creates nothing', async () => {
        const hash = tokenHash();
        await stores.refreshTokens.revoke(hash);
        assert.equal(await stores.refreshTokens.consume(hash), undefined);
      });

      it('revoking a family revokes its used and unused tokens, and no other family', async () => {
        const familyId = randomUUID();
        const userId = uniqueName('frank');
        const [used, unused, other] = [tokenHash(), tokenHash(), tokenHash()];
        await stores.refreshTokens.store(used, grant(familyId, userId));
        await stores.refreshTokens.store(unused, grant(familyId, userId));
        await stores.refreshTokens.store(other, grant(randomUUID(), userId));
        await stores.refreshTokens.consume(used);
        await stores.refreshTokens.revokeFamily(familyId);
        assert.equal((await stores.refreshTokens.consume(used))?.state, 'revoked');
        assert.equal((await stores.refreshTokens.consume(unused))?.state, 'revoked');
        assert.equal((await stores.refreshTokens.consume(other))?.state, 'consumed');
        await stores.refreshTokens.revokeFamily(familyId); // twice is no error
        await stores.refreshTokens.revokeFamily(randomUUID()); // an unknown family neither
      });

      it('a token stored in a family after its revocation is revoked', async () => {
        const familyId = randomUUID();
        const [before, late] = [tokenHash(), tokenHash()];
        await stores.refreshTokens.store(before, grant(familyId));
        await stores.refreshTokens.revokeFamily(familyId);
        await stores.refreshTokens.store(late, grant(familyId));
        assert.equal((await stores.refreshTokens.consume(late))?.state, 'revoked');
      });

      it('a rotation racing a family revocation never leaves a live token in the family', async () => {
        const familyId = randomUUID();
        const userId = uniqueName('grace');
        const first = tokenHash();
        await stores.refreshTokens.store(first, grant(familyId, userId));
        const next = tokenHash();
        const rotate = async () => {
          const outcome = await stores.refreshTokens.consume(first);
          if (outcome?.state === 'consumed')
            await stores.refreshTokens.store(next, grant(familyId, userId));
        };
        await Promise.all([rotate(), stores.refreshTokens.revokeFamily(familyId)]);
        assert.notEqual((await stores.refreshTokens.consume(next))?.state, 'consumed');
        assert.equal((await stores.refreshTokens.consume(first))?.state, 'revoked');
      });
    });
  });
}
