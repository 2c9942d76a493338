// Native test executables (native/tests, built with CMake outside node-gyp) and the sanitizer builds:
// building a set of targets into build/<dir>, running a program, recognising a sanitizer report, and
// the environment that loads the addon built with TUNESERVE_SANITIZE=1 into Node (libasan preloaded,
// since Node itself is not instrumented; leak checking off, since Node keeps memory until exit).

import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import { join } from 'node:path';

const ROOT = join(import.meta.dirname, '..', '..');
const SOURCE = join(ROOT, 'native', 'tests');
export const BUILD_TIMEOUT = 900_000; // a cold build of the engine takes a couple of minutes on 2 cores

/** What AddressSanitizer and UndefinedBehaviorSanitizer print when they find something. */
export const SANITIZER_REPORT = /ERROR: (AddressSanitizer|LeakSanitizer)|runtime error: |SUMMARY: UndefinedBehaviorSanitizer/g;

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

/** libasan's path as the compiler that built the addon knows it. */
export function libasanPath(): string {
  const r = spawnSync('gcc', ['-print-file-name=libasan.so'], { encoding: 'utf8' });
  const path = r.stdout?.trim() ?? '';
  if (r.status !== 0 || !path.startsWith('/') || !existsSync(path)) throw new Error('libasan.so not found (gcc -print-file-name=libasan.so): install gcc with its sanitizer runtimes');
  return path;
}

/** Variables that make a Node process load the sanitized addon at `addon` (scripts/build-sanitized-addon.mjs). */
export function sanitizedAddonEnv(addon: string): NodeJS.ProcessEnv {
  return {
    TUNESERVE_NATIVE_ADDON: addon,
    LD_PRELOAD: libasanPath(),
    // abort_on_error: a report ends the process at once (a crash the suite sees), not an exit code a
    // library might swallow. Node's own allocations are not tracked, so leaks are not meaningful here.
    ASAN_OPTIONS: 'detect_leaks=0:abort_on_error=1:allocator_may_return_null=1',
    UBSAN_OPTIONS: 'print_stacktrace=1:halt_on_error=1',
  };
}

/** The sanitizer variables of this process (set by scripts/reliability.mjs), for the processes it starts. */
export function inheritedSanitizerEnv(): NodeJS.ProcessEnv {
  const names = ['TUNESERVE_NATIVE_ADDON', 'LD_PRELOAD', 'ASAN_OPTIONS', 'UBSAN_OPTIONS'];
  return Object.fromEntries(names.filter((name) => process.env[name] !== undefined).map((name) => [name, process.env[name]]));
}
