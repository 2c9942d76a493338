// API keys, scopes and tenants. A key is a random secret the client sends as
// "authorization: Bearer <key>"; the server stores only its SHA-256, with the key's scopes
// (generate, train, admin) and tenant. Keys come from a JSON file (a mounted Kubernetes Secret
// works), re-read every authReloadMs so keys can be added and revoked without a restart; a file that
// fails to parse on reload is logged and the keys already loaded stay in force. The presented key's
// hash is compared with every stored hash in constant time.
//
// Keys file: {"keys": [{"id": "acme-ci", "sha256": "<64 hex>", "tenant": "acme", "scopes": ["generate", "train"]}]}
// `tuneserve keys create` makes a key and prints its entry.
//
// Without keys the server is open: every call acts as an admin of tenant "default". The deprecated
// TUNESERVE_AUTH_TOKENS shorthand makes each listed token an admin key of tenant "default".

import { status, type Metadata } from '@grpc/grpc-js';
import { createHash, randomBytes, timingSafeEqual } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { ServiceError } from './errors.js';
import type { Logger } from './logger.js';

/** What a key may do. admin: everything, in every tenant. */
export type Scope = 'generate' | 'train' | 'admin';
export const SCOPES: readonly Scope[] = ['generate', 'train', 'admin'];

/** The tenant of resources made without keys, and of the deprecated tokens. */
export const DEFAULT_TENANT = 'default';

/** Who is calling. */
export interface Principal {
  /** The key's id (never the key), or "anonymous" when the server has no keys. */
  keyId: string;
  tenant: string;
  scopes: ReadonlySet<Scope>;
}

/** The caller when the server runs without keys. */
export const ANONYMOUS: Principal = { keyId: 'anonymous', tenant: DEFAULT_TENANT, scopes: new Set(SCOPES) };

/** Something a tenant owns: an adapter, a dataset or a job. */
export interface Owned {
  /** Absent on records written before tenants existed: the default tenant. */
  tenant?: string;
  shared?: boolean;
}

export const tenantOf = (owned: Owned): string => owned.tenant ?? DEFAULT_TENANT;

/** Whether the caller may see and use a resource: its own tenant's, shared ones, or any for admin. */
export function canUse(principal: Principal, owned: Owned): boolean {
  return principal.scopes.has('admin') || tenantOf(owned) === principal.tenant || owned.shared === true;
}

/** Whether the caller may change or delete a resource: its own tenant's, or any for admin. */
export function canManage(principal: Principal, owned: Owned): boolean {
  return principal.scopes.has('admin') || tenantOf(owned) === principal.tenant;
}

/** PERMISSION_DENIED for a resource of another tenant. */
export function otherTenant(kind: string, id: string): ServiceError {
  return new ServiceError(status.PERMISSION_DENIED, 'TENANT_MISMATCH', `${kind} ${JSON.stringify(id)} belongs to another tenant`, {
    metadata: { [`${kind}_id`]: id },
  });
}

/** Throws PERMISSION_DENIED unless the caller may use the resource. */
export function requireUse(principal: Principal, kind: string, id: string, owned: Owned): void {
  if (!canUse(principal, owned)) throw otherTenant(kind, id);
}

/** Throws PERMISSION_DENIED unless the caller may manage the resource. */
export function requireManage(principal: Principal, kind: string, id: string, owned: Owned): void {
  if (!canManage(principal, owned)) {
    if (canUse(principal, owned)) {
      throw new ServiceError(status.PERMISSION_DENIED, 'NOT_OWNER', `${kind} ${JSON.stringify(id)} is shared by another tenant; only its tenant may change it`, {
        metadata: { [`${kind}_id`]: id },
      });
    }
    throw otherTenant(kind, id);
  }
}

/**
 * The scopes that allow each RPC (any one suffices; admin allows everything). Every RPC of the
 * tuneserve services is listed: the RPC wrapper refuses a method missing here (a test checks).
 */
export const RPC_SCOPES: Readonly<Record<string, readonly Scope[]>> = {
  'ModelService/GetModelInfo': ['generate', 'train'],
  'GenerationService/Generate': ['generate'],
  'AdapterService/ListAdapters': ['generate', 'train'],
  'AdapterService/GetAdapter': ['generate', 'train'],
  'AdapterService/LoadAdapter': ['generate', 'train'],
  'AdapterService/UnloadAdapter': ['generate', 'train'],
  'AdapterService/ExportAdapter': ['generate', 'train'],
  'AdapterService/DeleteAdapter': ['train'],
  'AdapterService/ImportAdapter': ['train'],
  'AdapterService/MergeAndUnload': ['train'],
  'AdapterService/SetAdapterShared': ['train'],
  'AdapterService/SetAdapterAlias': ['train'],
  'AdapterService/RollbackAdapterAlias': ['train'],
  'AdapterService/DeleteAdapterAlias': ['train'],
  'AdapterService/PinAdapter': ['generate', 'train'],
  'DatasetService/UploadDataset': ['train'],
  'DatasetService/GetDataset': ['train'],
  'DatasetService/ListDatasets': ['train'],
  'DatasetService/DeleteDataset': ['train'],
  'TrainingService/Train': ['train'],
  'TrainingService/WatchJob': ['train'],
  'TrainingService/GetJob': ['train'],
  'TrainingService/ListJobs': ['train'],
  'TrainingService/CancelJob': ['train'],
  'TrainingService/ResumeJob': ['train'],
};

/** Throws PERMISSION_DENIED unless the caller's scopes allow the RPC. */
export function authorize(principal: Principal, service: string, method: string): void {
  const allowed = RPC_SCOPES[`${service}/${method}`] ?? [];
  if (principal.scopes.has('admin') || allowed.some((scope) => principal.scopes.has(scope))) return;
  throw new ServiceError(
    status.PERMISSION_DENIED,
    'SCOPE_MISSING',
    `${service}/${method} needs an API key with scope ${[...allowed, 'admin'].join(' or ')}`,
    { metadata: { required_scopes: [...allowed, 'admin'].join(','), key_id: principal.keyId } },
  );
}

const idRule = /^[a-z0-9][a-z0-9._-]{0,62}$/;

const keysFileSchema = z
  .object({
    keys: z.array(
      z
        .object({
          id: z.string().regex(idRule, 'must be 1-63 of a-z 0-9 . _ - starting with a letter or digit'),
          sha256: z.string().regex(/^[0-9a-f]{64}$/, 'must be the key\'s SHA-256, 64 lowercase hexadecimal characters'),
          tenant: z.string().regex(idRule, 'must be 1-63 of a-z 0-9 . _ - starting with a letter or digit'),
          scopes: z.array(z.enum(['generate', 'train', 'admin'])).min(1),
        })
        .strict(),
    ),
  })
  .strict();

interface StoredKey {
  id: string;
  hash: Buffer;
  principal: Principal;
}

/** The hash a key is stored as. */
export const hashKey = (key: string): string => createHash('sha256').update(key, 'utf8').digest('hex');

/** A new random key (32 bytes, base64url, "tsk_" prefix so scanners can spot leaked keys). */
export function newKey(): string {
  return `tsk_${randomBytes(32).toString('base64url')}`;
}

/** Parses a keys file's text; an Error naming the entry and field for bad content. */
export function parseKeysFile(text: string, file: string): StoredKey[] {
  let json: unknown;
  try {
    json = JSON.parse(text);
  } catch (error) {
    throw new Error(`keys file ${file} is not JSON: ${(error as Error).message}`);
  }
  const parsed = keysFileSchema.safeParse(json);
  if (!parsed.success) {
    const issue = parsed.error.issues[0]!;
    throw new Error(`keys file ${file}: ${issue.path.join('.') || '(top level)'} ${issue.message}`);
  }
  const seen = new Set<string>();
  return parsed.data.keys.map((entry, index) => {
    if (seen.has(entry.id)) throw new Error(`keys file ${file}: keys.${index}.id repeats ${JSON.stringify(entry.id)}`);
    seen.add(entry.id);
    return { id: entry.id, hash: Buffer.from(entry.sha256, 'hex'), principal: { keyId: entry.id, tenant: entry.tenant, scopes: new Set(entry.scopes) } };
  });
}

/** Where keys come from. */
export type KeySource = { file: string; reloadMs: number } | { tokens: readonly string[] };

/** The accepted keys; authenticate() turns a call's metadata into its Principal. */
export class KeyStore {
  private keys: StoredKey[];
  private text: string | null;
  private timer: NodeJS.Timeout | null = null;

  private constructor(
    private readonly source: KeySource,
    private readonly logger: Logger,
  ) {
    if ('file' in source) {
      this.text = readFileSync(source.file, 'utf8');
      this.keys = parseKeysFile(this.text, source.file);
      this.timer = setInterval(() => this.reload(), source.reloadMs);
      this.timer.unref();
    } else {
      this.text = null;
      this.keys = source.tokens.map((token, index) => ({
        id: `token-${index + 1}`,
        hash: Buffer.from(hashKey(token), 'hex'),
        principal: { keyId: `token-${index + 1}`, tenant: DEFAULT_TENANT, scopes: new Set(SCOPES) },
      }));
    }
  }

  /** Loads the keys; an Error naming the file and entry when they are unusable. */
  static open(source: KeySource, logger: Logger): KeyStore {
    return new KeyStore(source, logger);
  }

  /** Number of keys in force. */
  get size(): number {
    return this.keys.length;
  }

  /** Re-reads the keys file when its content changed; keeps the old keys when the new file is bad. */
  reload(): void {
    if (!('file' in this.source)) return;
    let text: string;
    try {
      text = readFileSync(this.source.file, 'utf8');
    } catch (error) {
      this.logger.warn({ file: this.source.file, error: (error as Error).message }, 'keys file unreadable; keeping the keys loaded');
      return;
    }
    if (text === this.text) return;
    try {
      this.keys = parseKeysFile(text, this.source.file);
      this.text = text;
      this.logger.info({ file: this.source.file, keys: this.keys.length }, 'keys reloaded');
    } catch (error) {
      this.text = text; // warn once per bad content, not every period
      this.logger.error({ file: this.source.file, error: (error as Error).message }, 'keys file invalid; keeping the keys loaded');
    }
  }

  /** The caller, from "authorization: Bearer <key>"; UNAUTHENTICATED when absent or unknown. */
  authenticate(metadata: Metadata): Principal {
    const header = metadata.get('authorization')[0];
    const key = typeof header === 'string' && header.startsWith('Bearer ') ? header.slice(7) : null;
    if (key !== null && key !== '') {
      const presented = createHash('sha256').update(key, 'utf8').digest();
      let found: StoredKey | null = null;
      for (const stored of this.keys) if (timingSafeEqual(stored.hash, presented) && found === null) found = stored;
      if (found !== null) return found.principal;
    }
    throw new ServiceError(
      status.UNAUTHENTICATED,
      'UNAUTHENTICATED',
      'a valid API key is required as "authorization: Bearer <key>" metadata',
    );
  }

  close(): void {
    if (this.timer !== null) clearInterval(this.timer);
    this.timer = null;
  }
}
