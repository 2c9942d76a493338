// Integrity of stored files, checked when they are loaded, not only when they arrive: a manifest of
// each file's size and SHA-256 is taken when a folder is stored (an adapter's tuneserve.json "files",
// a merged model's tuneserve-manifest.json), and every later load compares the bytes on disk with it.
// A file that changed since (bit rot, a partial copy, an edit in place, same size or not) is refused
// with INTEGRITY_MISMATCH naming it; other files and folders are unaffected. Hashing reads each file
// once before the engine reads it again to load it: ~0.8 GB/s from the page cache on the 2-core CI
// machine (a 200 MB file, 256 KiB reads; about 0.2 s for a 168 MB rank-16 all-linear adapter of an 8B
// model), slower when the file must come from disk.

import { createHash } from 'node:crypto';
import { open, readFile, readdir, stat } from 'node:fs/promises';
import { basename, join } from 'node:path';
import { writeFileAtomic } from './atomic-file.js';
import { EngineError } from './errors.js';

/** One file of a manifest. */
export interface FileDigest {
  name: string;
  sizeBytes: number;
  /** SHA-256, lowercase hex. */
  sha256: string;
}

/** The manifest tuneserve writes into a model folder it stores (merged models). */
export const MODEL_MANIFEST_FILE = 'tuneserve-manifest.json';

/**
 * Bytes per read while hashing. One buffer of this size per file being hashed, reused for every read:
 * sixteen concurrent exports (each checked first) then hold 4 MiB, where a stream's fresh 1 MiB chunk per
 * read left ~40 MB of garbage in the server's RSS until a collection.
 */
const HASH_READ_BYTES = 256 * 1024;

/** SHA-256 (hex) of a file. */
export async function sha256File(file: string): Promise<string> {
  const hash = createHash('sha256');
  const handle = await open(file, 'r');
  try {
    const buffer = Buffer.allocUnsafe(HASH_READ_BYTES);
    for (;;) {
      const { bytesRead } = await handle.read(buffer, 0, buffer.length, null);
      if (bytesRead === 0) break;
      hash.update(buffer.subarray(0, bytesRead));
    }
  } finally {
    await handle.close();
  }
  return hash.digest('hex');
}

/** Size and SHA-256 of the named files of a folder, in the order given. */
export async function digestFiles(folder: string, names: readonly string[]): Promise<FileDigest[]> {
  const digests: FileDigest[] = [];
  for (const name of names) {
    const file = join(folder, name);
    digests.push({ name, sizeBytes: (await stat(file)).size, sha256: await sha256File(file) });
  }
  return digests;
}

/**
 * Checks every file of a manifest against the disk; INTEGRITY_MISMATCH (naming `what` and the file) for
 * the first that is missing, of another size, or of other bytes.
 */
export async function verifyFiles(folder: string, files: readonly FileDigest[], what: string): Promise<void> {
  for (const file of files) {
    const path = join(folder, file.name);
    const size = await stat(path).then((s) => s.size, () => null);
    const changed = (how: string) =>
      new EngineError('INTEGRITY_MISMATCH', `${what}: ${file.name} ${how} since it was stored; restore it or store it again`, { file: file.name });
    if (size === null) throw changed('is missing');
    if (size !== file.sizeBytes) throw changed(`is ${size} bytes, not the ${file.sizeBytes} it had`);
    const sha256 = await sha256File(path);
    if (sha256 !== file.sha256) throw changed(`has changed (SHA-256 ${sha256.slice(0, 12)}…, stored ${file.sha256.slice(0, 12)}…)`);
  }
}

/** Writes tuneserve-manifest.json over every other file of a (finished, not yet published) model folder. */
export async function writeModelManifest(folder: string): Promise<FileDigest[]> {
  const names = (await readdir(folder)).filter((name) => name !== MODEL_MANIFEST_FILE && !name.startsWith('.')).sort();
  const files = await digestFiles(folder, names);
  await writeFileAtomic(join(folder, MODEL_MANIFEST_FILE), `${JSON.stringify({ files }, null, 2)}\n`);
  return files;
}

/**
 * Checks a model folder against its tuneserve-manifest.json; returns false when it has none (a folder
 * tuneserve did not store, such as a Hugging Face download: nothing to compare with).
 */
export async function verifyModelManifest(folder: string): Promise<boolean> {
  let text: string;
  try {
    text = await readFile(join(folder, MODEL_MANIFEST_FILE), 'utf8');
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw new EngineError('IO_ERROR', `cannot read ${join(folder, MODEL_MANIFEST_FILE)}: ${(error as Error).message}`, undefined, { cause: error });
  }
  let files: FileDigest[];
  try {
    files = (JSON.parse(text) as { files: FileDigest[] }).files;
    if (!Array.isArray(files) || !files.every((f) => typeof f?.name === 'string' && basename(f.name) === f.name && Number.isSafeInteger(f.sizeBytes) && /^[0-9a-f]{64}$/.test(f.sha256))) throw new Error('malformed');
  } catch {
    throw new EngineError('INTEGRITY_MISMATCH', `model ${folder}: ${MODEL_MANIFEST_FILE} is damaged; store the model again`, { file: MODEL_MANIFEST_FILE });
  }
  await verifyFiles(folder, files, `model ${folder}`);
  return true;
}
