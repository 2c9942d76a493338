// The one atomic-file module (src/engine/atomic-file.ts): whole-file writes, streamed files that
// appear only on commit, folders published without replacing anything, folders replaced, and
// failures that name the path and leave no temp file behind.

import { mkdir, mkdtemp, readdir, readFile, rm, symlink, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { AtomicFile, publishFolder, replaceFolder, syncFolder, tempFolderBeside, writeFileAtomic } from '../src/engine/atomic-file.js';

let root: string;
let count = 0;
beforeAll(async () => {
  root = await mkdtemp(join(tmpdir(), 'tuneserve-atomic-'));
});
afterAll(async () => {
  await rm(root, { recursive: true, force: true });
});

async function freshFolder(): Promise<string> {
  const dir = join(root, `case-${count++}`);
  await mkdir(dir);
  return dir;
}

/** Entries a failed or finished write must not leave behind. */
const leftovers = async (dir: string) => (await readdir(dir)).filter((name) => name.includes('.tmp-') || name.includes('.old-'));

describe('writeFileAtomic', () => {
  it('writes strings and bytes, replaces an existing file, and leaves no temp file', async () => {
    const dir = await freshFolder();
    const file = join(dir, 'config.json');
    await writeFileAtomic(file, '{"a": 1}\n');
    expect(await readFile(file, 'utf8')).toBe('{"a": 1}\n');
    await writeFileAtomic(file, Uint8Array.of(0xe2, 0x82, 0xac));
    expect(await readFile(file, 'utf8')).toBe('€');
    expect(await readdir(dir)).toEqual(['config.json']);
  });

  it('fails with IO_ERROR naming the path when the folder is missing', async () => {
    const file = join(root, 'no-such-folder', 'x.json');
    await expect(writeFileAtomic(file, 'x')).rejects.toMatchObject({ code: 'IO_ERROR', message: expect.stringContaining(join(root, 'no-such-folder')) });
  });

  it('fails with IO_ERROR and no temp file when the target is a folder', async () => {
    const dir = await freshFolder();
    await mkdir(join(dir, 'taken'));
    await expect(writeFileAtomic(join(dir, 'taken'), 'x')).rejects.toMatchObject({ code: 'IO_ERROR', details: { path: join(dir, 'taken') } });
    expect(await leftovers(dir)).toEqual([]);
  });
});

describe('AtomicFile', () => {
  it('keeps the old file until commit, and abort leaves the old file and no temp', async () => {
    const dir = await freshFolder();
    const file = join(dir, 'weights.bin');
    await writeFile(file, 'old');
    const writing = await AtomicFile.create(file);
    await writing.write(Buffer.from('new '));
    await writing.write(Buffer.from('bytes'));
    expect(await readFile(file, 'utf8')).toBe('old');
    await writing.commit();
    expect(await readFile(file, 'utf8')).toBe('new bytes');

    const dropped = await AtomicFile.create(file);
    await dropped.write(Buffer.from('never'));
    await dropped.abort();
    await dropped.abort(); // idempotent
    expect(await readFile(file, 'utf8')).toBe('new bytes');
    expect(await readdir(dir)).toEqual(['weights.bin']);
    await expect(dropped.write(Buffer.from('late'))).rejects.toMatchObject({ code: 'IO_ERROR' });
  });
});

describe('publishFolder', () => {
  it('moves a finished folder into place with its files', async () => {
    const dir = await freshFolder();
    const work = await tempFolderBeside(join(dir, 'adapter'));
    await writeFile(join(work, 'adapter_config.json'), '{}');
    await publishFolder(work, join(dir, 'adapter'));
    expect(await readdir(dir)).toEqual(['adapter']);
    expect(await readdir(join(dir, 'adapter'))).toEqual(['adapter_config.json']);
  });

  it('never replaces an existing entry: a full folder, an empty one or a dangling symlink (code EEXIST)', async () => {
    const dir = await freshFolder();
    await mkdir(join(dir, 'full'));
    await writeFile(join(dir, 'full', 'keep'), 'kept');
    await mkdir(join(dir, 'empty'));
    await symlink(join(dir, 'nowhere'), join(dir, 'dangling'));
    for (const name of ['full', 'empty', 'dangling']) {
      const work = await tempFolderBeside(join(dir, name));
      await writeFile(join(work, 'new'), 'new');
      await expect(publishFolder(work, join(dir, name))).rejects.toMatchObject({ code: 'EEXIST' });
      await rm(work, { recursive: true });
    }
    expect(await readFile(join(dir, 'full', 'keep'), 'utf8')).toBe('kept');
    expect(await readdir(join(dir, 'empty'))).toEqual([]);
  });
});

describe('replaceFolder', () => {
  it('replaces an existing folder whole and removes the old one', async () => {
    const dir = await freshFolder();
    const target = join(dir, 'merged');
    await mkdir(target);
    await writeFile(join(target, 'old-only'), 'x');
    const work = await tempFolderBeside(target);
    await writeFile(join(work, 'model.safetensors'), 'y');
    await replaceFolder(work, target);
    expect(await readdir(target)).toEqual(['model.safetensors']);
    expect(await readdir(dir)).toEqual(['merged']);
  });

  it('creates the folder when there is none', async () => {
    const dir = await freshFolder();
    const work = await tempFolderBeside(join(dir, 'a', 'b'));
    await replaceFolder(work, join(dir, 'a', 'b'));
    expect(await readdir(join(dir, 'a'))).toEqual(['b']);
  });
});

describe('syncFolder', () => {
  it('syncs an existing folder and reports a missing one as IO_ERROR', async () => {
    await expect(syncFolder(root)).resolves.toBeUndefined();
    await expect(syncFolder(join(root, 'missing'))).rejects.toMatchObject({ code: 'IO_ERROR' });
  });
});
