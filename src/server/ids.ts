// The id rule for everything clients name (adapters, datasets, jobs, merged-model folders):
// lowercase letters, digits, '.', '_' and '-', starting with a letter or digit, at most 64
// characters, never "..". An id is a single path segment by construction, so ids can name files.

import { invalidArgument } from './errors.js';

/** The accepted form of an id. */
export const ID_PATTERN = /^[a-z0-9][a-z0-9._-]{0,63}$/;

/** Describes the rule in error messages. */
export const ID_RULE = 'must match ^[a-z0-9][a-z0-9._-]{0,63}$ and not contain ".."';

/** Whether `value` is a valid id. */
export function isValidId(value: string): boolean {
  return ID_PATTERN.test(value) && !value.includes('..');
}

/**
 * Returns `value` when it is a valid id, else throws INVALID_ARGUMENT naming `field`
 * (the proto field path, e.g. "header.dataset_id").
 */
export function requireId(value: string, field: string): string {
  if (value === '') throw invalidArgument(field, `is required; ${ID_RULE}`);
  if (!isValidId(value)) {
    const shown = value.length > 80 ? `${value.slice(0, 80)}…` : value;
    throw invalidArgument(field, `${JSON.stringify(shown)} is not a valid id: ${ID_RULE}`);
  }
  return value;
}
