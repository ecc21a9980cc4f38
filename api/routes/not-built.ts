/**
 * The routes PROTOCOL.md names that this version does not serve yet (profiles, contacts, push
 * registrations, groups and history come with the groups actor, the push worker and the
 * archive). Each answers 503 `unavailable` saying so: a 404 from these paths means something to
 * a client ("no such user", "not a member of the group"), and a 405 on `PATCH /v1/me` reads as
 * "never". Nothing is stored or half done.
 */
import { Router } from '@koa/router';
import { HttpError } from '../errors.ts';

type Method = 'get' | 'post' | 'put' | 'patch' | 'delete';

const NOT_BUILT: readonly [Method, string, string][] = [
  ['patch', '/v1/me', 'changing a profile'],
  ['get', '/v1/users/:userId', 'looking up a user'],
  ['post', '/v1/contacts/sync', 'contact sync'],
  ['put', '/v1/devices/:deviceId', 'push registration'],
  ['delete', '/v1/devices/:deviceId', 'push registration'],
  ['post', '/v1/groups', 'groups'],
  ['get', '/v1/groups', 'groups'],
  ['get', '/v1/groups/:groupId', 'groups'],
  ['patch', '/v1/groups/:groupId', 'groups'],
  ['post', '/v1/groups/:groupId/members', 'groups'],
  ['delete', '/v1/groups/:groupId/members/:userId', 'groups'],
  ['put', '/v1/groups/:groupId/members/:userId/role', 'groups'],
  ['get', '/v1/messages', 'message history'],
];

export function notBuiltRouter(): Router {
  const router = new Router();
  for (const [method, path, feature] of NOT_BUILT) {
    router[method](path, () => {
      throw new HttpError(503, `${feature} is not available in this version of the server`);
    });
  }
  return router;
}
