// The seeded fuzz runner of the reliability suite (test/reliability/): runs a target's cases one by one,
// each with its own Random (seed, case index), so any case replays alone; sorts every outcome into
// accepted, rejected with a clear error (by code), crash (any other throw, or a broken invariant the
// target reports) or hang (no answer within the case timeout), and records the figures for
// docs/reliability.md. Case counts: `bounded` inside `npm test`, `full` under `npm run test:reliability`.

import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { Random } from './random.js';

/** Whether this run is the full reliability run (scripts/reliability.mjs sets it). */
export const FULL = process.env.TUNESERVE_RELIABILITY === 'full';

/** A case's outcome as the target sees it: accepted, or a problem the fuzzer must count as a crash. */
export type CaseResult = 'accepted' | { failure: string };

export interface FuzzTarget<T> {
  /** Shown in docs/reliability.md, e.g. "adapter_config.json". */
  name: string;
  /** File name stem of the recorded figures. */
  id: string;
  seed: number;
  cases: { bounded: number; full: number };
  /** Builds case `index`. */
  make(random: Random, index: number): T | Promise<T>;
  /** Runs it: resolves when accepted, throws when refused. */
  run(input: T, index: number): Promise<CaseResult>;
  /** The refusal code of a clear error, or null when the error is not one (then it counts as a crash). */
  clearError(error: unknown): string | null;
  /** A short description of a case for failure reports. */
  describe?(input: T): string;
  caseTimeoutMs?: number;
}

export interface FuzzSummary {
  id: string;
  name: string;
  seed: number;
  cases: number;
  accepted: number;
  rejected: number;
  codes: Record<string, number>;
  crashes: string[];
  hangs: string[];
  slowestMs: number;
  sanitized: boolean;
}

/** True when this process runs the addon built with the sanitizers (test/helpers/sanitizer.ts). */
export function sanitizedAddon(): boolean {
  return (process.env.TUNESERVE_NATIVE_ADDON ?? '').includes('/sanitize/');
}

export function caseCount(cases: { bounded: number; full: number }): number {
  return FULL ? cases.full : cases.bounded;
}

const HANG = Symbol('hang');

export async function fuzz<T>(target: FuzzTarget<T>): Promise<FuzzSummary> {
  const total = caseCount(target.cases);
  const timeoutMs = target.caseTimeoutMs ?? 10_000;
  const summary: FuzzSummary = {
    id: target.id, name: target.name, seed: target.seed, cases: 0, accepted: 0, rejected: 0, codes: {}, crashes: [], hangs: [],
    slowestMs: 0, sanitized: sanitizedAddon(),
  };
  for (let index = 0; index < total; index++) {
    // Case i's stream depends only on (seed, i).
    const random = new Random((Math.imul(target.seed, 0x9e3779b1) ^ Math.imul(index + 1, 0x85ebca6b)) >>> 0);
    const input = await target.make(random, index);
    const label = (): string => `case ${index}${target.describe ? ` (${target.describe(input)})` : ''}`;
    const started = performance.now();
    let timer: NodeJS.Timeout | undefined;
    const outcome = await Promise.race([
      target.run(input, index).then(
        (result) => ({ result }),
        (error: unknown) => ({ error }),
      ),
      new Promise<typeof HANG>((resolve) => { timer = setTimeout(() => resolve(HANG), timeoutMs); }),
    ]);
    clearTimeout(timer);
    summary.cases++;
    summary.slowestMs = Math.max(summary.slowestMs, performance.now() - started);
    if (outcome === HANG) {
      summary.hangs.push(`${label()}: no answer in ${timeoutMs} ms`);
    } else if ('error' in outcome) {
      const code = target.clearError(outcome.error);
      if (code === null) {
        const error = outcome.error as Error;
        summary.crashes.push(`${label()}: ${error?.name ?? typeof error}: ${String(error?.stack ?? error).slice(0, 600)}`);
      } else {
        summary.rejected++;
        summary.codes[code] = (summary.codes[code] ?? 0) + 1;
      }
    } else if (outcome.result === 'accepted') {
      summary.accepted++;
    } else {
      summary.crashes.push(`${label()}: ${outcome.result.failure}`);
    }
  }
  record(`fuzz-${target.id}`, summary);
  return summary;
}

/** Writes figures for the report when scripts/reliability.mjs asked for them (TUNESERVE_RELIABILITY_OUT). */
export function record(name: string, figures: object): void {
  const dir = process.env.TUNESERVE_RELIABILITY_OUT;
  if (!dir) return;
  mkdirSync(dir, { recursive: true });
  writeFileSync(join(dir, `${name}.json`), `${JSON.stringify(figures, null, 2)}\n`);
}

/** An Error carrying a string `code` and a message: what the engine and the row validator throw. */
export function codedError(error: unknown): string | null {
  if (!(error instanceof Error) || error.message.length === 0) return null;
  const code = (error as { code?: unknown }).code;
  return typeof code === 'string' && /^[A-Z][A-Z0-9_]*$/.test(code) ? code : null;
}
