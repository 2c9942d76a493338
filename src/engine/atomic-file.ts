// Atomic files and folders for the whole TypeScript side (engine and server): a reader sees a file or
// folder either whole or not at all, and once a call returns, a crash does not undo it.
//
// Files: write to a temp file in the same folder (so the rename stays on one file system), fsync it,
// rename it over the target, fsync the folder (so the rename itself is durable). Folders: fsync the
// finished folder, rename it into place, fsync the parent. Temp names start with "." and contain
// ".tmp-", so listings can skip them and a restart can sweep them.
//
// Failures are EngineError IO_ERROR naming the path (the errno error is the cause), except that
// publishFolder keeps code EEXIST for "the destination exists", which callers turn into
// ALREADY_EXISTS.

import { randomBytes } from 'node:crypto';
import { constants as fsConstants } from 'node:fs';
import { lstat, mkdir, open, rename, rm, type FileHandle } from 'node:fs/promises';
import { basename, dirname, join } from 'node:path';
import { EngineError } from './errors.js';

/** errno codes with which a platform refuses to open or fsync a folder; the rename is still atomic there. */
const FOLDER_SYNC_UNSUPPORTED = new Set(['EISDIR', 'EINVAL', 'ENOTSUP', 'EPERM', 'EBADF', 'EACCES']);

/** A fresh hidden temp path next to `target` (same folder, so a rename onto target is atomic). */
export function tempPathBeside(target: string): string {
  return join(dirname(target), `.${basename(target)}.tmp-${process.pid}-${randomBytes(4).toString('hex')}`);
}

function ioError(action: string, path: string, error: unknown): EngineError {
  if (error instanceof EngineError) return error;
  return new EngineError('IO_ERROR', `cannot ${action} ${path}: ${(error as Error).message}`, { path }, { cause: error });
}

/**
 * fsyncs a folder so that renames and new entries inside it survive a crash. Where the platform
 * refuses to sync folders (see FOLDER_SYNC_UNSUPPORTED) it does nothing; other failures throw.
 */
export async function syncFolder(folder: string): Promise<void> {
  let handle: FileHandle | undefined;
  try {
    handle = await open(folder, fsConstants.O_RDONLY);
    await handle.sync();
  } catch (error) {
    if (!FOLDER_SYNC_UNSUPPORTED.has((error as NodeJS.ErrnoException).code ?? '')) throw ioError('sync folder', folder, error);
  } finally {
    await handle?.close().catch(() => undefined);
  }
}

/** Writes a whole file atomically (temp file in the same folder, fsync, rename, folder fsync). */
export async function writeFileAtomic(path: string, data: string | Uint8Array): Promise<void> {
  const file = await AtomicFile.create(path);
  try {
    await file.write(typeof data === 'string' ? Buffer.from(data, 'utf8') : data);
  } catch (error) {
    await file.abort();
    throw error;
  }
  await file.commit();
}

/**
 * A file written in pieces that appears at `path` only on commit() (streaming writers such as the
 * safetensors writer). abort() drops it; both are safe to call after a failure.
 */
export class AtomicFile {
  private handle: FileHandle | null;
  private done = false;

  private constructor(
    readonly path: string,
    readonly tempPath: string,
    handle: FileHandle,
  ) {
    this.handle = handle;
  }

  /** Creates the temp file (mode 0644) beside `path`; the folder must exist. */
  static async create(path: string): Promise<AtomicFile> {
    const tempPath = tempPathBeside(path);
    try {
      return new AtomicFile(path, tempPath, await open(tempPath, 'wx', 0o644));
    } catch (error) {
      throw ioError('create', tempPath, error);
    }
  }

  /** Appends bytes (the whole buffer, however many writes that takes). */
  async write(bytes: Uint8Array): Promise<void> {
    const handle = this.openHandle();
    try {
      let written = 0;
      while (written < bytes.byteLength) {
        const { bytesWritten } = await handle.write(bytes, written, bytes.byteLength - written);
        written += bytesWritten;
      }
    } catch (error) {
      await this.abort();
      throw ioError('write', this.path, error);
    }
  }

  /** fsyncs, renames the temp file onto `path` (replacing it) and fsyncs the folder. */
  async commit(): Promise<void> {
    const handle = this.openHandle();
    try {
      await handle.sync();
      await handle.close();
      this.handle = null;
      await rename(this.tempPath, this.path);
    } catch (error) {
      await this.abort();
      throw ioError('write', this.path, error);
    }
    this.done = true;
    await syncFolder(dirname(this.path));
  }

  /** Closes and deletes the temp file; a no-op once committed or aborted. */
  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    const handle = this.handle;
    this.handle = null;
    await handle?.close().catch(() => undefined);
    await rm(this.tempPath, { force: true });
  }

  private openHandle(): FileHandle {
    if (this.handle === null) throw new EngineError('IO_ERROR', `${this.path} is already committed or aborted`, { path: this.path });
    return this.handle;
  }
}

/**
 * Moves a finished folder into place atomically, never over an existing entry: fails with an
 * error whose code is EEXIST when `to` exists. `from` must lie on the same file system as `to`.
 */
export async function publishFolder(from: string, to: string): Promise<void> {
  const exists = () => Object.assign(new Error(`${to} exists`), { code: 'EEXIST' });
  if (await pathExists(to)) throw exists();
  await syncFolder(from);
  try {
    await rename(from, to);
  } catch (error) {
    const code = (error as NodeJS.ErrnoException).code;
    // rename(2) replaces an empty folder silently on Linux but fails on a non-empty one.
    if (code === 'ENOTEMPTY' || code === 'EEXIST') throw exists();
    throw ioError('publish', to, error);
  }
  await syncFolder(dirname(to));
}

/**
 * Moves a finished folder into place, replacing an existing one: the old folder is renamed aside,
 * the new one renamed in, then the old one deleted. Readers see the old or the new folder, and
 * neither only for the instant between the two renames.
 */
export async function replaceFolder(from: string, to: string): Promise<void> {
  await syncFolder(from);
  const old = `${to}.old-${process.pid}-${randomBytes(4).toString('hex')}`;
  let hadOld = false;
  try {
    await rename(to, old);
    hadOld = true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw ioError('replace', to, error);
  }
  try {
    await rename(from, to);
  } catch (error) {
    if (hadOld) await rename(old, to).catch(() => undefined);
    throw ioError('replace', to, error);
  }
  await syncFolder(dirname(to));
  if (hadOld) await rm(old, { recursive: true, force: true });
}

/** Creates `folder`'s parent when missing and returns a fresh hidden temp folder beside `folder`. */
export async function tempFolderBeside(folder: string): Promise<string> {
  await mkdir(dirname(folder), { recursive: true });
  const temp = tempPathBeside(folder);
  await mkdir(temp);
  return temp;
}

/** Whether anything (a dangling symlink included) exists at `path`. */
async function pathExists(path: string): Promise<boolean> {
  try {
    await lstat(path);
    return true;
  } catch (error) {
    if ((error as NodeJS.ErrnoException).code === 'ENOENT') return false;
    throw ioError('check', path, error);
  }
}
