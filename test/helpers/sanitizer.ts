// Native test executables (native/tests, built with CMake outside node-gyp) and the sanitizer builds:
// building a set of targets into build/<dir>, running a program, recognising a sanitizer report, and
// passing on the variables with which scripts/reliability.mjs loads the addon built with
// TUNESERVE_SANITIZE=1 (libasan preloaded, since Node itself is not instrumented) to the processes a
// suite starts.

import { spawnSync } from 'node:child_process';
import { join } from 'node:path';

const ROOT = join(import.meta.dirname, '..', '..');
const SOURCE = join(ROOT, 'native', 'tests');
export const BUILD_TIMEOUT = 900_000; // a cold build of the engine takes a couple of minutes on 2 cores

/** What AddressSanitizer and UndefinedBehaviorSanitizer print when they find something. */
export { SANITIZER_REPORT } from '../../scripts/reliability-report.mjs';

/** Runs a program to completion; its status and combined output. A program that cannot start throws. */
export function runProgram(program: string, args: string[], timeoutMs: number, env?: NodeJS.ProcessEnv): { status: number | null; output: string } {
  const r = spawnSync(program, args, { cwd: ROOT, encoding: 'utf8', timeout: timeoutMs, maxBuffer: 64 << 20, ...(env ? { env } : {}) });
  if (r.error) {
    const missing = (r.error as NodeJS.ErrnoException).code === 'ENOENT';
    throw new Error(missing ? `${program} is not installed: the native tests need it (apt-get install cmake)` : String(r.error));
  }
  return { status: r.status, output: `${r.stdout}${r.stderr}` };
}

/**
 * Configures native/tests into build/<dir> (TS_CUDA off or emu, sanitizers on or off) and builds the
 * given targets only; returns the folder. Throws with the log on failure.
 */
export function buildNativeTests(dir: string, targets: string[], options: { tsCuda?: 'off' | 'emu'; sanitize?: boolean } = {}): string {
  const out = join(ROOT, 'build', dir);
  for (const args of [
    ['-S', SOURCE, '-B', out, `-DTS_CUDA=${options.tsCuda ?? 'off'}`, `-DTS_SANITIZE=${options.sanitize ? 'on' : 'off'}`],
    ['--build', out, '-j2', '--target', ...targets],
  ]) {
    const r = runProgram('cmake', args, BUILD_TIMEOUT);
    if (r.status !== 0) throw new Error(`cmake ${args.join(' ')} failed:\n${r.output.slice(-8000)}`);
  }
  return out;
}

/** The sanitizer variables of this process (set by scripts/reliability.mjs), for the processes it starts. */
export function inheritedSanitizerEnv(): NodeJS.ProcessEnv {
  const names = ['TUNESERVE_NATIVE_ADDON', 'LD_PRELOAD', 'ASAN_OPTIONS', 'UBSAN_OPTIONS'];
  return Object.fromEntries(names.filter((name) => process.env[name] !== undefined).map((name) => [name, process.env[name]]));
}
