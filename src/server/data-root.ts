// The server's data root: every file the server reads or writes lives under it (plus the export
// root for merged models). Paths are built from validated ids only, checked to stay inside the
// root lexically, and existing entries are resolved with realpath so a symlink cannot lead out.
//
// Layout:
//   <root>/tuneserve.db               job store (SQLite, WAL)
//   <root>/datasets/<id>/             data.jsonl + dataset.json
//   <root>/adapters/<id>/             PEFT folder + tuneserve.json (metadata)
//   <root>/jobs/<job-id>/             inline.jsonl, checkpoints/
//   <root>/tmp/                       work in progress; emptied at start
//   <export root>/<name>/             merged models (default <root>/exports)
//
// Files and folders are written and published with src/engine/atomic-file.ts.

import { randomBytes } from 'node:crypto';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { isValidId } from './ids.js';

/** The kinds of entries named by id. */
export type EntryKind = 'datasets' | 'adapters' | 'jobs';

/** Raised when a path would leave its root; a server bug or a planted symlink, never a client error. */
export class PathEscapeError extends Error {
  override readonly name = 'PathEscapeError';
}

/** Whether `candidate` is `root` itself or lies below it (both absolute and normalized). */
function isInside(root: string, candidate: string): boolean {
  const relative = path.relative(root, candidate);
  return relative === '' || (!relative.startsWith('..') && !path.isAbsolute(relative));
}

/** The data root and export root, resolved once at start. */
export class DataRoot {
  private constructor(
    /** Real absolute path of the data root. */
    readonly root: string,
    /** Real absolute path of the export root. */
    readonly exportRoot: string,
  ) {}

  /** Creates (when missing) and resolves the roots and their folders, and empties tmp/. */
  static async open(root: string, exportRoot?: string): Promise<DataRoot> {
    await fs.mkdir(root, { recursive: true });
    const realRoot = await fs.realpath(root);
    const exportPath = exportRoot ?? path.join(realRoot, 'exports');
    await fs.mkdir(exportPath, { recursive: true });
    const dataRoot = new DataRoot(realRoot, await fs.realpath(exportPath));
    for (const folder of ['datasets', 'adapters', 'jobs', 'tmp']) {
      await fs.mkdir(path.join(realRoot, folder), { recursive: true });
    }
    await dataRoot.emptyFolder(path.join(realRoot, 'tmp'));
    // Merges in progress when the server stopped: the work folder (".tmp-<hex>") and the engine's own
    // temp folder beside it ("..tmp-<hex>.tmp-<pid>-<hex>", atomic-file.ts's naming).
    for (const entry of await fs.readdir(dataRoot.exportRoot)) {
      if (entry.startsWith('.') && entry.includes('.tmp-')) await fs.rm(path.join(dataRoot.exportRoot, entry), { recursive: true, force: true });
    }
    return dataRoot;
  }

  /** The job store's database file. */
  get databasePath(): string {
    return path.join(this.root, 'tuneserve.db');
  }

  /** The folder holding every entry of a kind. */
  folder(kind: EntryKind): string {
    return path.join(this.root, kind);
  }

  /** The path of an entry named by a valid id (it may not exist). */
  entry(kind: EntryKind, id: string): string {
    return this.checked(this.root, path.join(this.root, kind, this.segment(id)));
  }

  /** The path of a merged-model folder under the export root (it may not exist). */
  exportEntry(name: string): string {
    return this.checked(this.exportRoot, path.join(this.exportRoot, this.segment(name)));
  }

  /** A file inside an entry folder, e.g. file(entry('adapters', id), 'adapter_config.json'). */
  file(folder: string, name: string): string {
    if (name === '' || name.includes('/') || name.includes('\\') || name === '.' || name === '..') {
      throw new PathEscapeError(`not a plain file name: ${JSON.stringify(name)}`);
    }
    return this.checked(this.root, path.join(folder, name), this.exportRoot);
  }

  /**
   * Resolves an existing path with realpath and checks it is still inside the data root (or the
   * export root); returns the real path, or null when it does not exist.
   */
  async realExisting(candidate: string): Promise<string | null> {
    let real: string;
    try {
      real = await fs.realpath(candidate);
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw error;
    }
    if (!isInside(this.root, real) && !isInside(this.exportRoot, real)) {
      throw new PathEscapeError(`${candidate} resolves outside the data root`);
    }
    return real;
  }

  /** Replaces the roots' absolute paths in a message (e.g. an engine error) so paths never reach clients. */
  redact(message: string): string {
    return message.split(this.exportRoot).join('<export-root>').split(this.root).join('<data-root>');
  }

  /** Creates a fresh, empty folder under <root>/tmp (same file system as the entries). */
  async tempFolder(prefix: string): Promise<string> {
    return fs.mkdtemp(path.join(this.root, 'tmp', `${prefix}-`));
  }

  /** A fresh folder path (not created) next to the export root's entries, for atomic renames. */
  exportTempPath(): string {
    return path.join(this.exportRoot, `.tmp-${randomBytes(6).toString('hex')}`);
  }

  /**
   * Moves an existing entry out of sight atomically (rename into tmp/) and then deletes it, so
   * readers see it either whole or gone.
   */
  async removeEntry(entryPath: string): Promise<void> {
    const real = await this.realExisting(entryPath);
    if (real === null) return;
    // The graveyard lies on the entry's own file system so the rename is atomic.
    const graveyard = isInside(this.exportRoot, real)
      ? this.exportTempPath()
      : path.join(this.root, 'tmp', `deleted-${randomBytes(6).toString('hex')}`);
    await fs.rename(entryPath, graveyard);
    await fs.rm(graveyard, { recursive: true, force: true });
  }

  private segment(id: string): string {
    if (!isValidId(id)) throw new PathEscapeError(`not a valid id: ${JSON.stringify(id)}`);
    return id;
  }

  private checked(root: string, candidate: string, otherRoot?: string): string {
    const resolved = path.resolve(candidate);
    if (!isInside(root, resolved) && !(otherRoot !== undefined && isInside(otherRoot, resolved))) {
      throw new PathEscapeError(`${resolved} is outside ${root}`);
    }
    return resolved;
  }

  private async emptyFolder(folder: string): Promise<void> {
    for (const entry of await fs.readdir(folder)) {
      await fs.rm(path.join(folder, entry), { recursive: true, force: true });
    }
  }
}
