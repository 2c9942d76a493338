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

/** Aliases of adapter versions: "latest" and v<digits> are reserved (they name versions). */
export const ALIAS_PATTERN = /^[a-z][a-z0-9_-]{0,31}$/;
const VERSION_PATTERN = /^v([1-9][0-9]{0,8})$/;

/** An adapter named by a client: an id, with a version number or an alias, or neither (the latest). */
export interface AdapterRef {
  adapterId: string;
  version: number | null;
  alias: string | null;
}

/** Checks an alias name (not a version, not "latest"); INVALID_ARGUMENT naming `field`. */
export function requireAlias(value: string, field: string): string {
  if (!ALIAS_PATTERN.test(value) || /^v[0-9]+$/.test(value) || value === 'latest') {
    throw invalidArgument(field, `${JSON.stringify(value.slice(0, 80))} is not a valid alias: must match ${ALIAS_PATTERN.source}, and "latest" and v<N> are reserved`);
  }
  return value;
}

/** Parses "<id>", "<id>@v<N>", "<id>@latest" or "<id>@<alias>"; INVALID_ARGUMENT naming `field`. */
export function requireAdapterRef(value: string, field: string): AdapterRef {
  const at = value.indexOf('@');
  if (at === -1) return { adapterId: requireId(value, field), version: null, alias: null };
  const adapterId = requireId(value.slice(0, at), field);
  const suffix = value.slice(at + 1);
  const version = VERSION_PATTERN.exec(suffix);
  if (version) return { adapterId, version: Number(version[1]), alias: null };
  if (suffix === 'latest') return { adapterId, version: null, alias: null };
  return { adapterId, version: null, alias: requireAlias(suffix, field) };
}

/** The reference as clients write it. */
export function formatAdapterRef(ref: AdapterRef): string {
  return ref.version !== null ? `${ref.adapterId}@v${ref.version}` : ref.alias !== null ? `${ref.adapterId}@${ref.alias}` : ref.adapterId;
}
