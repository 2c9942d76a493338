// `tuneserve keys create`: makes a new API key and its keys-file entry. The key is printed once (the
// server stores only its SHA-256); with --file the entry is added to a keys file in place (written
// atomically; a running server picks it up at its next re-read).

import { existsSync, readFileSync } from 'node:fs';
import { parseArgs } from 'node:util';

import { writeFileAtomic } from '../engine/atomic-file.js';
import { EngineError } from '../engine/errors.js';
import { hashKey, newKey, parseKeysFile, SCOPES, type Scope } from '../server/auth.js';
import { required } from './flags.js';

export const KEYS_USAGE = `usage: tuneserve keys create --id NAME --tenant TENANT --scopes generate,train,admin [--file keys.json]

  Prints a new API key (once: only its SHA-256 is stored) and its keys-file entry. With --file the entry is
  added to that file (created when missing). Clients send the key as "authorization: Bearer <key>".
`;

export async function keysCommand(argv: string[], io: { stdout: NodeJS.WritableStream } = process): Promise<void> {
  const [sub, ...rest] = argv;
  if (sub !== 'create') {
    io.stdout.write(KEYS_USAGE);
    if (sub === undefined || sub === '--help' || sub === '-h') return;
    throw new EngineError('INVALID_ARGUMENT', `unknown keys command ${JSON.stringify(sub)}`);
  }
  const { values } = parseArgs({
    args: rest, strict: true,
    options: { id: { type: 'string' }, tenant: { type: 'string' }, scopes: { type: 'string' }, file: { type: 'string' } },
  });
  const scopes = required(values, 'scopes').split(',').map((s) => s.trim()).filter(Boolean);
  for (const scope of scopes) {
    if (!(SCOPES as readonly string[]).includes(scope)) {
      throw new EngineError('INVALID_ARGUMENT', `--scopes: ${JSON.stringify(scope)} is not one of ${SCOPES.join(', ')}`, { field: 'scopes' });
    }
  }
  const key = newKey();
  const entry = { id: required(values, 'id'), sha256: hashKey(key), tenant: required(values, 'tenant'), scopes: scopes as Scope[] };
  // Validate the entry with the server's own parser (id and tenant rules, duplicate ids).
  const file = values.file;
  const current = file !== undefined && existsSync(file) ? (JSON.parse(readFileSync(file, 'utf8')) as { keys: unknown[] }) : { keys: [] };
  const next = { ...current, keys: [...current.keys, entry] };
  try {
    parseKeysFile(JSON.stringify(next), file ?? 'the new entry');
  } catch (error) {
    throw new EngineError('INVALID_ARGUMENT', (error as Error).message);
  }
  if (file !== undefined) await writeFileAtomic(file, `${JSON.stringify(next, null, 2)}\n`);
  io.stdout.write(`${key}\n`);
  io.stdout.write(`${JSON.stringify(entry)}\n`);
}
