// The op test of the native backends (native/tests/test_backend_ops.cpp, llama.cpp's test-backend-ops
// for core/backend.h), built with CMake outside node-gyp and run as a plain executable:
//   1. the CPU build (-DTS_CUDA=off): the CPU backend, the oracle, against double-precision references
//      (forward ops) and central finite differences of them (backward ops); then the parity harness
//      against itself (a second CPU backend as the target: every error must be exactly 0);
//   2. the emulator build (-DTS_CUDA=emu): the CUDA backend's kernels on the CPU emulator against the
//      CPU backend, in float32-compute and bf16 mode, and the emulator's own self-test.
// The tolerances live next to each check in the C++ (float32 ops against double: a few float32
// roundings, 1e-6..5e-6 relative; the CUDA f32 mode against the CPU: summation order, 1e-6..5e-5; bf16:
// outputs rounded to 8 significant bits, 3e-3..1.6e-2); here the suite asserts the exit status and that
// every op of the Backend interface was run, so an op dropped from the executable fails CI.
// cmake is required (Debian's cmake package; CI installs it): a missing cmake fails the suite.

import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { beforeAll, describe, expect, it } from 'vitest';

import { BUILD_TIMEOUT, buildNativeTests, runProgram as run } from './helpers/sanitizer.js';

const ROOT = join(import.meta.dirname, '..');
/** The ops of the Backend interface: the virtual methods of core/backend.h's "model's ops" section. */
function backendOps(): string[] {
  const header = readFileSync(join(ROOT, 'native', 'core', 'backend.h'), 'utf8');
  const begin = header.indexOf("// ---- the model's ops");
  const end = header.indexOf('// ---- captured step graphs');
  if (begin < 0 || end < begin) throw new Error("core/backend.h: the \"model's ops\" section was not found");
  return [...header.slice(begin, end).matchAll(/virtual\s+\w+\s+(\w+)\s*\(/g)].map((m) => m[1]!);
}

/** Ops without a PASS line for this backend and mode (one line per op and shape: `PASS  cpu  f32  rope ...`). */
function missingOps(output: string, backend: string, mode: string): string[] {
  return backendOps().filter((op) => !new RegExp(`^PASS +${backend} +${mode} +${op} `, 'm').test(output));
}

describe('test-backend-ops: the CPU backend (the oracle)', () => {
  let bin: string;
  beforeAll(() => {
    bin = join(buildNativeTests('native-tests', ['test-backend-ops']), 'test-backend-ops');
  }, BUILD_TIMEOUT);

  it('reads every op of the Backend interface from core/backend.h', () => {
    const ops = backendOps();
    expect(ops.length).toBeGreaterThanOrEqual(20);
    for (const op of ['embedding', 'attention_backward', 'lora_backward', 'adamw', 'sample']) expect(ops).toContain(op);
  });

  it('passes every op against double references and finite differences, and covers every op', () => {
    const r = run(bin, ['--backend', 'cpu'], 120_000);
    expect(r.status, r.output.slice(-6000)).toBe(0);
    expect(r.output).toMatch(/^== \d+ cases, 0 failed$/m);
    expect(missingOps(r.output, 'cpu', 'f32')).toEqual([]);
  });

  it('runs the parity harness on a second CPU backend with every error exactly 0', () => {
    const r = run(bin, ['--backend', 'cpu-self'], 120_000);
    expect(r.status, r.output.slice(-6000)).toBe(0);
    expect(missingOps(r.output, 'cpu-self', 'f32')).toEqual([]);
    // Identical code on identical inputs: any nonzero error means the harness compares the wrong things.
    const nonzero = r.output.split('\n').filter((l) => /^PASS/.test(l) && !/l2 0\.0e\+00  max 0\.0e\+00/.test(l));
    expect(nonzero).toEqual([]);
  });

  it('refuses a backend this build does not have', () => {
    const r = run(bin, ['--backend', 'cuda-emu', '--op', 'add'], 60_000);
    expect(r.status).toBe(1);
    expect(r.output).toMatch(/UNAVAILABLE +cuda-emu/);
  });
});

describe('test-backend-ops: the CUDA backend on the emulator', () => {
  let dir: string;
  beforeAll(() => {
    dir = buildNativeTests('native-tests-emu', ['test-backend-ops', 'emu-selftest', 'test-model-backends', 'attention-sample-test'], { tsCuda: 'emu' });
  }, BUILD_TIMEOUT);

  it('the emulator passes its self-test', () => {
    const r = run(join(dir, 'emu-selftest'), [], 300_000);
    expect(r.status, r.output.slice(-6000)).toBe(0);
  });

  it('matches the CPU backend op by op in float32-compute and bf16 mode', () => {
    const r = run(join(dir, 'test-backend-ops'), ['--backend', 'cuda-emu', '--mode', 'both'], 300_000);
    expect(r.status, r.output.slice(-6000)).toBe(0);
    expect(r.output).toMatch(/^== \d+ cases, 0 failed$/m);
    expect(missingOps(r.output, 'cuda-emu', 'f32')).toEqual([]);
    expect(missingOps(r.output, 'cuda-emu', 'bf16')).toEqual([]);
  });

  it('runs the attention and sampling kernels against their references', () => {
    const r = run(join(dir, 'attention-sample-test'), [], 300_000);
    expect(r.status, r.output.slice(-6000)).toBe(0);
  });

  it('runs whole models on the CUDA backend with the CPU backend\'s logits and greedy ids', () => {
    const r = run(join(dir, 'test-model-backends'), ['--backend', 'cuda-emu', '--mode', 'both'], 300_000);
    expect(r.status, r.output.slice(-6000)).toBe(0);
    expect(r.output).toMatch(/PASS/);
    expect(r.output).not.toMatch(/FAIL/);
  });
});
