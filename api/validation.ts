/**
 * Validation at the edge: zod schemas of the request bodies, and `validate`, which answers the
 * parsed body or throws a 400 naming the first field at fault. Unknown fields are dropped.
 * Lengths are counted in Unicode code points, which is what a user calls characters.
 */
import { z } from 'zod';
import { HttpError } from './errors.ts';
import { LONE_SURROGATE } from '../schemas/conventions.ts';

export const USERNAME = /^[A-Za-z0-9_.-]{3,32}$/;
export const PASSWORD_MIN = 8;
export const PASSWORD_MAX = 256;
export const DISPLAY_NAME_MAX = 64;

const length = (text: string) => [...text].length;

/**
 * A string that is valid Unicode: JSON's `\uD800` escapes a lone surrogate, which becomes
 * U+FFFD on its way to UTF-8, so two different passwords would hash as the same one.
 */
const text = (field: string) =>
  z
    .string({
      error: (issue) =>
        issue.input === undefined ? `${field} is required` : `${field} must be a string`,
    })
    .refine((value) => !LONE_SURROGATE.test(value), {
      error: `${field} must be valid Unicode (it holds a lone surrogate)`,
      abort: true,
    });

const body = <Shape extends z.ZodRawShape>(shape: Shape) =>
  z.object(shape, { error: 'the body must be a JSON object' });

/**
 * A username is its userId once case-folded. Only ASCII letters fold: a Unicode letter whose
 * lower case happens to be ASCII (the Kelvin sign, dotted I) is refused, not folded.
 */
const username = text('username')
  .regex(USERNAME, {
    error: 'username must be 3 to 32 characters, each a letter a-z, a digit, "_", "." or "-"',
  })
  .transform((name) => name.toLowerCase());

/** NFC, so that the same password typed on two keyboards is the same password. */
const password = (min: number) =>
  text('password')
    .refine((value) => length(value) >= min && length(value) <= PASSWORD_MAX, {
      error:
        min > 1
          ? `password must be ${min} to ${PASSWORD_MAX} characters`
          : `password must be 1 to ${PASSWORD_MAX} characters`,
    })
    .transform((value) => value.normalize('NFC'));

/**
 * Format characters that make a name read as another (UTS #39, Trojan Source): the bidi
 * controls, which reorder what follows (`admin\u202Egnp.exe`), and the ones that show nothing
 * (`ad\u200Bmin`). The joiners (U+200C, U+200D) stay: Persian, Indic scripts and emoji
 * sequences need them.
 */
const SPOOFING = /[\u061C\u200B\u200E\u200F\u202A-\u202E\u2060-\u2064\u2066-\u2069\uFEFF]/u;

/** Trimmed; null or absent means none (the userId is shown). */
const displayName = text('displayName')
  .trim()
  .refine((name) => length(name) >= 1 && length(name) <= DISPLAY_NAME_MAX, {
    error: `displayName must be 1 to ${DISPLAY_NAME_MAX} characters, not counting surrounding spaces`,
  })
  .refine((name) => !/\p{Cc}/u.test(name), {
    error: 'displayName must not contain control characters',
  })
  .refine((name) => !SPOOFING.test(name), {
    error: 'displayName must not contain direction controls or invisible characters',
  })
  .nullish();

const refreshToken = text('refreshToken').min(1, { error: 'refreshToken is required' });

export const registerBody = body({ username, password: password(PASSWORD_MIN), displayName });
/** Any password up to the maximum: a wrong one is a 401, not a 400. */
export const loginBody = body({ username, password: password(1) });
export const refreshBody = body({ refreshToken });

export function validate<T>(schema: z.ZodType<T>, input: unknown): T {
  const result = schema.safeParse(input);
  if (result.success) return result.data;
  const issue = result.error.issues[0];
  const field = issue && issue.path.length > 0 ? issue.path.map(String).join('.') : undefined;
  throw new HttpError(400, issue?.message ?? 'the body is not valid', { field });
}
