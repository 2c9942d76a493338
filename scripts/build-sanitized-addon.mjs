// Builds the addon with AddressSanitizer + UndefinedBehaviorSanitizer (binding.gyp's TUNESERVE_SANITIZE=1)
// beside the normal one: node-gyp always builds into ./build, so it runs in build/sanitize/, a folder of
// symbolic links to binding.gyp, native/, scripts/ and node_modules/, and the result is
// build/sanitize/build/Release/tuneserve_native.node. Prints that path. Incremental: make rebuilds what
// changed. Run it with node; load the result through test/helpers/sanitizer.ts (LD_PRELOAD of libasan).

import { spawnSync } from 'node:child_process';
import { existsSync, mkdirSync, symlinkSync } from 'node:fs';
import { dirname, join } from 'node:path';

const ROOT = join(import.meta.dirname, '..');
const STAGE = join(ROOT, 'build', 'sanitize');
export const SANITIZED_ADDON = join(STAGE, 'build', 'Release', 'tuneserve_native.node');

export function buildSanitizedAddon({ jobs = 2, quiet = false } = {}) {
  mkdirSync(STAGE, { recursive: true });
  for (const entry of ['binding.gyp', 'native', 'scripts', 'node_modules']) {
    if (!existsSync(join(STAGE, entry))) symlinkSync(join(ROOT, entry), join(STAGE, entry));
  }
  const nodeGyp = join(ROOT, 'node_modules', 'node-gyp', 'bin', 'node-gyp.js');
  // Offline: the headers of the running Node (its install prefix), as npm's nodedir gives node-gyp.
  const nodedir = process.env.npm_config_nodedir ?? dirname(dirname(process.execPath));
  // CUDA stays out: the sanitizers instrument host code, and the fuzzed readers are host code.
  const env = { ...process.env, TUNESERVE_SANITIZE: '1', TUNESERVE_NO_CUDA: '1' };
  const steps = existsSync(join(STAGE, 'build', 'Makefile')) ? [['build']] : [['configure'], ['build']];
  for (const step of steps) {
    const args = [nodeGyp, ...step, `--nodedir=${nodedir}`, ...(step[0] === 'build' ? ['-j', String(jobs)] : [])];
    const r = spawnSync(process.execPath, args, { cwd: STAGE, env, stdio: quiet ? 'pipe' : 'inherit', encoding: 'utf8' });
    if (r.status !== 0) throw new Error(`node-gyp ${step[0]} (sanitized) failed${quiet ? `:\n${(r.stdout ?? '') + (r.stderr ?? '')}`.slice(-8000) : ''}`);
  }
  return SANITIZED_ADDON;
}

if (import.meta.url === `file://${process.argv[1]}`) {
  process.stdout.write(`${buildSanitizedAddon()}\n`);
}
