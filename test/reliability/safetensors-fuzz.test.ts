// Fuzzing of the safetensors readers. The native reader and the JSON parser under it run in
// native/tests/fuzz_readers.cpp, built with AddressSanitizer + UndefinedBehaviorSanitizer (CMake
// TS_SANITIZE=on): the first memory or UB error aborts it with a report, which fails this suite. The same
// generator then writes its cases to files, and the TypeScript reader (src/engine/safetensors.ts) and the
// addon's reader each judge every file: both must give the verdict the case calls for (a valid file
// accepted, a file breaking a reference rule refused), agree with each other, and read back the same
// floats from what they accept.

import { spawnSync } from 'node:child_process';
import { mkdtempSync, readdirSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { native } from '../../src/engine/native.js';
import { readSafetensorsHeader, readTensorAsFloat32 } from '../../src/engine/safetensors.js';
import { caseCount, codedError, fuzz, record } from '../helpers/fuzz.js';
import { buildNativeTests, SANITIZER_REPORT } from '../helpers/sanitizer.js';

const NATIVE_CASES = { bounded: 3000, full: 25000 };
const FILE_CASES = { bounded: 1000, full: 6000 };

interface NativeTarget { cases: number; accepted: number; rejected: number; failures: number; slowestMs: number; codes: Record<string, number> }

/** The "TARGET name k=v ..." lines of fuzz-readers. */
function parseTargets(output: string): Map<string, NativeTarget> {
  const targets = new Map<string, NativeTarget>();
  for (const m of output.matchAll(/^TARGET (\S+) cases=(\d+) accepted=(\d+) rejected=(\d+) failures=(\d+) slowest_ms=([\d.]+) codes=(\S*)$/gm)) {
    const codes = Object.fromEntries((m[7] ?? '').split(',').filter(Boolean).map((pair) => [pair.split(':')[0]!, Number(pair.split(':')[1])]));
    targets.set(m[1]!, { cases: Number(m[2]), accepted: Number(m[3]), rejected: Number(m[4]), failures: Number(m[5]), slowestMs: Number(m[6]), codes });
  }
  return targets;
}

describe('safetensors readers under fuzzing', () => {
  let fuzzer: string;
  let corpus: string;

  beforeAll(() => {
    fuzzer = join(buildNativeTests('native-fuzz-asan', ['fuzz-readers'], { sanitize: true }), 'fuzz-readers');
    corpus = mkdtempSync(join(tmpdir(), 'tuneserve-safetensors-fuzz-'));
  }, 900_000);
  afterAll(() => {
    if (corpus) rmSync(corpus, { recursive: true, force: true });
  });

  it('the native reader and JSON parser (ASan + UBSan): every case a verdict, no sanitizer report', () => {
    const cases = caseCount(NATIVE_CASES);
    const r = spawnSync(fuzzer, ['--cases', String(cases), '--seed', '1'], { encoding: 'utf8', timeout: 1_800_000, maxBuffer: 64 << 20 });
    const output = `${r.stdout}${r.stderr}`;
    const reports = output.match(SANITIZER_REPORT) ?? [];
    const targets = parseTargets(output);
    for (const [name, label] of [['safetensors', 'safetensors files (native reader)'], ['json', 'JSON documents (native parser)']] as const) {
      const t = targets.get(name);
      record(`fuzz-native-${name}`, {
        id: `native-${name}`, name: label, seed: 1, cases: t?.cases ?? 0, accepted: t?.accepted ?? 0, rejected: t?.rejected ?? 0,
        codes: t?.codes ?? {}, crashes: r.status === 0 ? [] : [`exit status ${r.status ?? r.signal}`], hangs: [],
        slowestMs: t?.slowestMs ?? 0, sanitized: true, sanitizerReports: reports.length,
      });
    }
    expect(reports, output.slice(-6000)).toEqual([]);
    expect(r.status, output.slice(-6000)).toBe(0);
    expect(targets.get('safetensors')?.cases).toBe(cases);
    expect(targets.get('json')?.cases).toBe(cases);
    // The generator reaches both verdicts in quantity (a generator stuck on one kind of file tests little).
    expect(targets.get('safetensors')!.accepted).toBeGreaterThan(cases / 10);
    expect(targets.get('safetensors')!.rejected).toBeGreaterThan(cases / 2);
  }, 1_800_000);

  it('the TypeScript reader and the addon agree on every file, with the verdict the case calls for', async () => {
    const cases = caseCount(FILE_CASES);
    const r = spawnSync(fuzzer, ['--cases', String(cases), '--seed', '2', '--target', 'safetensors', '--emit', corpus], { encoding: 'utf8', timeout: 600_000 });
    expect(r.status, `${r.stdout}${r.stderr}`.slice(-4000)).toBe(0);
    const files = readdirSync(corpus).sort((a, b) => parseInt(a, 10) - parseInt(b, 10));
    expect(files).toHaveLength(cases);

    const addon = native();
    const summary = await fuzz({
      name: 'safetensors files (TypeScript reader vs the addon)', id: 'safetensors-ts', seed: 2, cases: FILE_CASES,
      make: (_random, index) => join(corpus, files[index]!),
      describe: (file) => file.slice(corpus.length + 1),
      clearError: codedError,
      run: async (file) => {
        const expected = /-(accept|reject|any)\.safetensors$/.exec(file)![1];
        let tsError: unknown = null;
        let nativeError: unknown = null;
        const header = await readSafetensorsHeader(file).catch((e: unknown) => { tsError = e; return null; });
        let nativeHeader: ReturnType<typeof addon.safetensorsHeader> | null = null;
        try {
          nativeHeader = addon.safetensorsHeader(file);
        } catch (e) {
          nativeError = e;
        }
        if ((tsError === null) !== (nativeError === null)) {
          return { failure: `the readers disagree: TypeScript ${tsError === null ? 'accepts' : `refuses (${(tsError as Error).message})`}, native ${nativeError === null ? 'accepts' : `refuses (${(nativeError as Error).message})`}` };
        }
        if (tsError !== null) {
          if (codedError(nativeError) === null) return { failure: `the native reader threw an unclear error: ${String(nativeError)}` };
          if (expected === 'accept') return { failure: `a valid file was refused: ${(tsError as Error).message}` };
          throw tsError;
        }
        if (expected === 'reject') return { failure: 'an invalid file was accepted by both readers' };
        // Same tensors, and the same floats read back (bit for bit: NaN payloads included).
        const names = [...header!.tensors.keys()].sort();
        const nativeNames = nativeHeader!.tensors.map((t) => t.name).sort();
        if (JSON.stringify(names) !== JSON.stringify(nativeNames)) return { failure: `tensor lists differ: ${JSON.stringify(names)} vs ${JSON.stringify(nativeNames)}` };
        for (const [name, entry] of header!.tensors) {
          if (!['F32', 'BF16', 'F16'].includes(entry.dtype)) continue;
          const a = await readTensorAsFloat32(file, name, header!);
          const b = addon.safetensorsReadF32(file, name);
          if (!Buffer.from(a.buffer, a.byteOffset, a.byteLength).equals(Buffer.from(b.buffer, b.byteOffset, b.byteLength))) {
            return { failure: `tensor ${name} reads back differently` };
          }
        }
        return 'accepted';
      },
    });
    expect(summary.crashes).toEqual([]);
    expect(summary.hangs).toEqual([]);
    expect(summary.accepted).toBeGreaterThan(cases / 10);
  }, 1_800_000);
});
