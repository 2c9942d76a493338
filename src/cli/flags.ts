// Reading command-line flag values (as node:util parseArgs returns them) with one error shape: an
// EngineError('INVALID_ARGUMENT') naming the flag, so main prints `[INVALID_ARGUMENT] --lr must be ...`.
// Absent flags read as undefined; callers supply their own defaults with `??`.

import { EngineError } from '../engine/errors.js';

export type Flags = Record<string, string | boolean | string[] | undefined>;

function invalid(name: string, what: string, value: string): EngineError {
  return new EngineError('INVALID_ARGUMENT', `--${name} must be ${what}, got ${JSON.stringify(value)}`, { field: name });
}

export function text(flags: Flags, name: string): string | undefined {
  const value = flags[name];
  return typeof value === 'string' ? value : undefined;
}

export function required(flags: Flags, name: string): string {
  const value = text(flags, name);
  if (value === undefined || value === '') throw new EngineError('INVALID_ARGUMENT', `--${name} is required`, { field: name });
  return value;
}

/** A finite number. */
export function float(flags: Flags, name: string): number | undefined {
  const value = text(flags, name);
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === '' || !Number.isFinite(n)) throw invalid(name, 'a number', value);
  return n;
}

/** A non-negative safe integer (ports, thread counts, steps). */
export function integer(flags: Flags, name: string): number | undefined {
  const value = text(flags, name);
  if (value === undefined) return undefined;
  const n = Number(value);
  if (value.trim() === '' || !Number.isSafeInteger(n) || n < 0) throw invalid(name, 'a non-negative integer', value);
  return n;
}

/** A uint32, for flags that travel in uint32 proto fields (counts, steps, seeds). */
export function count(flags: Flags, name: string): number | undefined {
  const n = integer(flags, name);
  if (n !== undefined && n > 0xffff_ffff) throw invalid(name, 'a whole number from 0 to 4294967295', String(n));
  return n;
}

/** One of `allowed`. */
export function choice<T extends string>(flags: Flags, name: string, allowed: readonly T[]): T | undefined {
  const value = text(flags, name);
  if (value === undefined) return undefined;
  if (!(allowed as readonly string[]).includes(value)) throw invalid(name, `one of ${allowed.join(', ')}`, value);
  return value as T;
}
