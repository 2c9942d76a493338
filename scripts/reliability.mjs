// `npm run test:reliability`: the full reliability run, whose figures docs/reliability.md publishes.
// Builds the addon with AddressSanitizer + UndefinedBehaviorSanitizer (scripts/build-sanitized-addon.mjs)
// and runs the reliability suites under it with their full case counts (TUNESERVE_RELIABILITY=full):
// test/reliability/ (fuzzing, faults, load) and test/e2e/resume.test.ts (SIGKILL during training). Each
// suite records its figures as JSON in build/reliability/<run>/; the output of the whole run is kept
// there too and searched for sanitizer reports; then docs/reliability.md is written from the figures
// (scripts/reliability-report.mjs). The exit status is the suites'. `npm test` runs the same suites with
// their bounded counts and the normal addon.
//
//   node scripts/reliability.mjs [--no-sanitize] [--report-only <run folder>]

import { execFileSync, spawn } from 'node:child_process';
import { createWriteStream, mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { buildSanitizedAddon } from './build-sanitized-addon.mjs';
import { SANITIZER_REPORT, writeReport } from './reliability-report.mjs';

const ROOT = join(import.meta.dirname, '..');
const args = process.argv.slice(2);

if (args[0] === '--report-only') {
  writeReport(args[1], join(ROOT, 'docs', 'reliability.md'));
  process.exit(0);
}

const sanitize = !args.includes('--no-sanitize');
const run = join(ROOT, 'build', 'reliability', new Date().toISOString().replace(/[:.]/g, '-'));
mkdirSync(run, { recursive: true });

const env = { ...process.env, TUNESERVE_RELIABILITY: 'full', TUNESERVE_RELIABILITY_OUT: run };
if (sanitize) {
  const addon = buildSanitizedAddon();
  const libasan = execFileSync('gcc', ['-print-file-name=libasan.so'], { encoding: 'utf8' }).trim();
  // As test/helpers/sanitizer.ts's sanitizedAddonEnv: libasan first (Node is not instrumented), leaks
  // not tracked (Node keeps memory until exit), the first report ends the process.
  Object.assign(env, {
    TUNESERVE_NATIVE_ADDON: addon,
    LD_PRELOAD: libasan,
    ASAN_OPTIONS: 'detect_leaks=0:abort_on_error=1:allocator_may_return_null=1',
    UBSAN_OPTIONS: 'print_stacktrace=1:halt_on_error=1',
  });
}
writeFileSync(join(run, 'run.json'), `${JSON.stringify({
  commit: execFileSync('git', ['rev-parse', 'HEAD'], { cwd: ROOT, encoding: 'utf8' }).trim(),
  dirty: execFileSync('git', ['status', '--porcelain', '--untracked-files=no'], { cwd: ROOT, encoding: 'utf8' }).trim() !== '',
  started: new Date().toISOString(),
  sanitized: sanitize,
}, null, 2)}\n`);

const log = createWriteStream(join(run, 'output.log'));
const suites = ['test/reliability', 'test/e2e/resume.test.ts'];
const child = spawn(process.execPath, [join(ROOT, 'node_modules', 'vitest', 'vitest.mjs'), 'run', ...suites], { cwd: ROOT, env, stdio: ['ignore', 'pipe', 'pipe'] });
let output = '';
for (const stream of [child.stdout, child.stderr]) {
  stream.on('data', (chunk) => {
    process.stdout.write(chunk);
    log.write(chunk);
    output += chunk.toString();
  });
}
const code = await new Promise((resolve) => child.on('exit', (c, signal) => resolve(c ?? (signal ? 128 : 1))));
log.end();
const reports = output.match(SANITIZER_REPORT) ?? [];
writeFileSync(join(run, 'suites.json'), `${JSON.stringify({ exitCode: code, sanitizerReportsInOutput: reports.length, finished: new Date().toISOString() }, null, 2)}\n`);
writeReport(run, join(ROOT, 'docs', 'reliability.md'));
console.log(`\nreliability run ${code === 0 ? 'passed' : `FAILED (exit ${code})`}; figures in ${run}; docs/reliability.md written`);
process.exit(code === 0 && reports.length === 0 ? 0 : 1);
