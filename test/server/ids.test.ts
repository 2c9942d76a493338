// The id rule and the data root's path checks: hostile ids are refused before any path is built,
// and the data root never hands out a path outside itself.

import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { afterEach, describe, expect, it } from 'vitest';
import { status } from '@grpc/grpc-js';
import { DataRoot, PathEscapeError } from '../../src/server/data-root.js';
import { ServiceError } from '../../src/server/errors.js';
import { isValidId, requireId } from '../../src/server/ids.js';
import { hostileIds, makeSandbox } from './harness.js';


describe('ids', () => {
  it('accepts lowercase names of 1 to 64 characters', () => {
    for (const id of ['a', '0', 'support-bot', 'v1.2_final', 'x'.repeat(64)]) expect(isValidId(id), id).toBe(true);
  });

  it.each(hostileIds)('refuses %j with INVALID_ARGUMENT naming the field', (id) => {
    expect(isValidId(id)).toBe(false);
    let error: unknown = null;
    try {
      requireId(id, 'adapter_id');
    } catch (caught) {
      error = caught;
    }
    expect(error).toBeInstanceOf(ServiceError);
    expect((error as ServiceError).code).toBe(status.INVALID_ARGUMENT);
    expect((error as ServiceError).details.fieldViolations?.[0]?.field).toBe('adapter_id');
  });

  it('refuses 65 characters', () => {
    expect(isValidId('x'.repeat(65))).toBe(false);
  });
});

describe('data root', () => {
  let sandbox = '';
  afterEach(async () => {
    if (sandbox) await fs.rm(sandbox, { recursive: true, force: true });
  });

  it('builds entry paths only from valid ids', async () => {
    sandbox = await makeSandbox();
    const root = await DataRoot.open(path.join(sandbox, 'data'));
    expect(root.entry('adapters', 'ok')).toBe(path.join(root.root, 'adapters', 'ok'));
    for (const id of hostileIds) expect(() => root.entry('adapters', id)).toThrow(PathEscapeError);
    expect(() => root.file(root.entry('adapters', 'ok'), '../../../etc/passwd')).toThrow(PathEscapeError);
  });

  it('refuses an entry that is a symlink leading outside the root', async () => {
    sandbox = await makeSandbox();
    const outside = path.join(sandbox, 'outside');
    await fs.mkdir(outside);
    await fs.writeFile(path.join(outside, 'secret'), 'keep');
    const root = await DataRoot.open(path.join(sandbox, 'data'));
    await fs.symlink(outside, path.join(root.root, 'adapters', 'planted'));
    await expect(root.realExisting(root.entry('adapters', 'planted'))).rejects.toThrow(PathEscapeError);
    await expect(root.removeEntry(root.entry('adapters', 'planted'))).rejects.toThrow(PathEscapeError);
    expect(await fs.readFile(path.join(outside, 'secret'), 'utf8')).toBe('keep');
  });

  it('redacts its absolute paths from messages', async () => {
    sandbox = await makeSandbox();
    const root = await DataRoot.open(path.join(sandbox, 'data'));
    expect(root.redact(`${root.root}/datasets/x/data.jsonl:3: bad`)).toBe('<data-root>/datasets/x/data.jsonl:3: bad');
  });
});
