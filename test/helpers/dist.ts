// Builds dist/ when a source file is newer than its compiled output, for tests that run
// bin/tuneserve.js (CI builds dist/ in `npm ci`; a developer may have edited src/ since).

import { execFile } from 'node:child_process';
import { readdir, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { promisify } from 'node:util';

export const ROOT = join(import.meta.dirname, '..', '..');
const run = promisify(execFile);

export async function ensureDistFresh(): Promise<void> {
  const sources = (await readdir(join(ROOT, 'src'), { recursive: true })).filter((file) => file.endsWith('.ts') && !file.endsWith('.d.ts'));
  for (const file of sources) {
    const compiled = join(ROOT, 'dist', file.replace(/\.ts$/, '.js'));
    const [source, output] = await Promise.all([stat(join(ROOT, 'src', file)), stat(compiled).catch(() => null)]);
    if (!output || output.mtimeMs < source.mtimeMs) {
      await run(process.execPath, [join(ROOT, 'node_modules', 'typescript', 'bin', 'tsc'), '-p', join(ROOT, 'tsconfig.json')], { cwd: ROOT });
      return;
    }
  }
}
