// Stored adapters, their versions and aliases, and the engine's adapter pool.
//
// An adapter id names a line of immutable versions. Version 1 is the PEFT folder
// <data root>/adapters/<id>/ plus tuneserve.json (source, metrics, created time, base fingerprint,
// file manifest, content hash); version N > 1 lives in <id>/versions/v<N>/, laid out the same way.
// Aliases (<id>/aliases.json) name versions and move atomically. Every folder and file is published
// with one atomic rename. Versions never change, so their records are read once and kept in memory:
// serving an adapter reads no file of the registry (and the engine reads the weights only on a pool
// miss). A version is known to the engine's pool under its key "<id>@v<N>"; a re-made adapter (a new
// content hash under a known key) replaces the pool's entry, so no state of the old one is served.
//
// Loads go through here so that references are resolved once per request (a request finishes on the
// version it started with), and versions in use by generations are leased against unloading.

import { createHash } from 'node:crypto';
import { readdirSync, readFileSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { publishFolder, writeFileAtomic } from '../engine/atomic-file.js';
import { sha256File, verifyFiles } from '../engine/integrity.js';
import { DataRoot } from './data-root.js';
import type { AdapterConfig, AdapterPoolState, AdapterServingStats, AdapterTier, EnginePort, TrainedAdapter } from './engine-port.js';
import { alreadyExists, failedPrecondition, isEngineError, notFound } from './errors.js';
import { formatAdapterRef, type AdapterRef } from './ids.js';
import type { TrainingMetricsRecord } from './job-store.js';
import type { Logger } from './logger.js';

/** The metadata file tuneserve keeps next to the PEFT files. */
export const METADATA_FILE = 'tuneserve.json';
/** Versions after the first, inside the adapter's folder. */
export const VERSIONS_FOLDER = 'versions';
/** The adapter's aliases, inside its folder. */
export const ALIASES_FILE = 'aliases.json';

/** Files of a PEFT folder the server accepts and serves, with their size limits. */
export const ADAPTER_CONFIG_FILE = 'adapter_config.json';
export const ADAPTER_WEIGHTS_FILE = 'adapter_model.safetensors';
export const ADAPTER_README_FILE = 'README.md';

/** One file of an adapter's manifest. */
export interface AdapterFileEntry {
  name: string;
  sizeBytes: number;
  sha256: string;
}

/** The content of tuneserve.json. */
export interface AdapterRecord {
  adapterId: string;
  /** Absent on adapters stored before versions existed (they are version 1). */
  version?: number;
  /** Absent on older records; computed from the manifest then. */
  contentHash?: string;
  source: 'trained' | 'imported';
  /** The job that trained it, for trained adapters. */
  jobId: string | null;
  /** Unix milliseconds. */
  createTime: number;
  baseFingerprint: string;
  config: AdapterConfig;
  metrics: TrainingMetricsRecord | null;
  files: AdapterFileEntry[];
  /** The owning tenant; absent on adapters stored before tenants existed (the default tenant). */
  tenant?: string;
  /** Whether every tenant may see and use it. */
  shared?: boolean;
}

/** A stored version, as the registry keeps it. */
export interface VersionRecord extends AdapterRecord {
  version: number;
  contentHash: string;
  /** Its folder (real path). */
  folder: string;
}

/** Where an alias points, and where it pointed before (oldest first). */
export interface AliasRecord {
  version: number;
  history: number[];
}

/** One version of a stored adapter with its pool state. */
export interface AdapterVersionView extends AdapterRecord {
  version: number;
  contentHash: string;
  sizeBytes: number;
  /** Its state in the engine's pool, or null when the pool does not know it yet. */
  pool: AdapterPoolState | null;
}

/** A stored adapter: its latest version's record (owner and sharing of the adapter), versions, aliases and pool state. */
export interface AdapterView extends AdapterRecord {
  version: number;
  contentHash: string;
  /** Whether one of its versions is in a device slot. */
  loaded: boolean;
  sizeBytes: number;
  versions: AdapterVersionView[];
  aliases: Record<string, AliasRecord>;
  /** The pool's counters summed over its versions. */
  stats: AdapterServingStats;
  /** The highest tier of any version, or null when the pool knows none of them. */
  tier: AdapterTier | null;
}

/** A pin on an adapter version, held by a generation; release exactly once. */
export interface AdapterLease {
  /** The pool key of the version (EnginePort's adapter name). */
  key: string;
  adapterId: string;
  version: number;
  release(): void;
}

/** The key of a version in the engine's pool. */
export function versionKey(adapterId: string, version: number): string {
  return `${adapterId}@v${version}`;
}

/** Hashes a file (SHA-256, hex): integrity.ts's, the one file hasher. */
export { sha256File };

/** The content hash of a version: SHA-256 over its config's and weights' SHA-256s (README excluded). */
export function contentHashOf(files: readonly AdapterFileEntry[]): string {
  const hash = createHash('sha256');
  for (const name of [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]) {
    const file = files.find((f) => f.name === name);
    hash.update(`${name}:${file?.sha256 ?? ''}\n`);
  }
  return hash.digest('hex');
}

export function emptyStats(): AdapterServingStats {
  return {
    requests: 0, inputTokens: 0, outputTokens: 0, hits: 0, hostHits: 0, loads: 0, loadSeconds: 0, lastLoadSeconds: 0,
    placements: 0, placeSeconds: 0, evictions: 0, hostEvictions: 0, loadFailures: 0,
  };
}

function addStats(to: AdapterServingStats, s: AdapterServingStats): void {
  for (const key of Object.keys(to) as (keyof AdapterServingStats)[]) {
    if (key === 'lastLoadSeconds') to[key] = Math.max(to[key], s[key]);
    else to[key] += s[key];
  }
}

const TIER_ORDER: Record<AdapterTier, number> = { disk: 0, host: 1, device: 2 };

/** A line of versions as kept in memory. */
interface Line {
  versions: Map<number, VersionRecord>;
  aliases: Record<string, AliasRecord>;
}

/**
 * The version a job published, when a tuneserve.json of its adapter names that job (a version's folder
 * appears whole, with tuneserve.json in it, or not at all); null otherwise. Synchronous: the job store
 * asks while it opens, before the server serves, for jobs that were running when the process died.
 */
export function publishedAdapterOf(
  dataRoot: DataRoot,
  job: { jobId: string; adapterId: string },
): { adapterId: string; metrics: TrainingMetricsRecord; version: number; contentHash: string } | null {
  const root = dataRoot.entry('adapters', job.adapterId);
  const folders = [root];
  try {
    for (const name of readdirSync(path.join(root, VERSIONS_FOLDER))) folders.push(path.join(root, VERSIONS_FOLDER, name));
  } catch {
    // no versions after the first
  }
  for (const folder of folders) {
    try {
      const record = JSON.parse(readFileSync(path.join(folder, METADATA_FILE), 'utf8')) as AdapterRecord;
      if (record.jobId === job.jobId && record.metrics !== null) {
        return { adapterId: job.adapterId, metrics: record.metrics, version: record.version ?? 1, contentHash: record.contentHash ?? contentHashOf(record.files) };
      }
    } catch {
      // absent or unreadable: not this job's
    }
  }
  return null;
}

/** The adapters on disk and the engine pool. */
export class AdapterRegistry {
  /** Ids being produced as new adapters (by a training job or an import): they count as taken. */
  private readonly reserved = new Set<string>();
  /** Generations using each version, by pool key. */
  private readonly pins = new Map<string, number>();
  /** Lines read from disk, and reads in flight. */
  private readonly lines = new Map<string, Line>();
  /** Versions ("<key>:<content hash>") whose files were checked against their manifest in this process. */
  private readonly verified = new Set<string>();
  private readonly reading = new Map<string, Promise<Line>>();
  /** Changes to a line (publish, aliases, sharing, delete) run one at a time. */
  private readonly changing = new Map<string, Promise<unknown>>();

  constructor(
    private readonly dataRoot: DataRoot,
    private readonly engine: () => EnginePort,
    private readonly logger: Logger,
  ) {}

  /** Whether the id is taken on disk or reserved by work in progress. */
  async isTaken(id: string): Promise<boolean> {
    return this.reserved.has(id) || (await this.dataRoot.realExisting(this.dataRoot.entry('adapters', id))) !== null;
  }

  /** Reserves an id for work that will publish it as a new adapter; ALREADY_EXISTS when taken. */
  async reserve(id: string): Promise<void> {
    if (this.reserved.has(id)) throw alreadyExists('adapter', id);
    this.reserved.add(id);
    if ((await this.dataRoot.realExisting(this.dataRoot.entry('adapters', id))) !== null) {
      this.reserved.delete(id);
      throw alreadyExists('adapter', id);
    }
  }

  /** Reserves an id known to be free (restart of queued jobs), without checking the disk. */
  reserveUnchecked(id: string): void {
    this.reserved.add(id);
  }

  /** Ends a reservation. */
  unreserve(id: string): void {
    this.reserved.delete(id);
  }

  /** Whether an adapter with this id is stored (not merely reserved). */
  async exists(id: string): Promise<boolean> {
    return !this.reserved.has(id) && (await this.dataRoot.realExisting(this.dataRoot.entry('adapters', id))) !== null;
  }

  /** The folder of the adapter's latest version (real path); NOT_FOUND when absent. */
  async folder(id: string): Promise<string> {
    return this.latest(await this.line(id)).folder;
  }

  /** The folder of the adapter's latest version, its files checked against their manifest (verify). */
  async verifiedFolder(id: string): Promise<string> {
    return (await this.verify(this.latest(await this.line(id)))).folder;
  }

  /** A stored adapter with its versions, aliases and pool state; NOT_FOUND when absent. */
  async get(id: string): Promise<AdapterView> {
    return this.view(id, await this.line(id));
  }

  /** Every stored adapter in id order; unreadable folders are skipped with a warning. */
  async list(): Promise<AdapterView[]> {
    const ids = (await fs.readdir(this.dataRoot.folder('adapters'))).sort();
    const views: AdapterView[] = [];
    for (const id of ids) {
      if (this.reserved.has(id)) continue;
      try {
        views.push(await this.get(id));
      } catch (error) {
        this.logger.warn({ adapterId: id, error: String(error) }, 'skipping unreadable adapter folder');
      }
    }
    return views;
  }

  /**
   * The version a reference names now: NOT_FOUND for an unknown adapter, version or alias. A
   * request resolves once and keeps the result, so a later publish or alias move does not touch it.
   */
  async resolve(ref: AdapterRef): Promise<VersionRecord> {
    const line = await this.line(ref.adapterId);
    let version: number;
    if (ref.version !== null) version = ref.version;
    else if (ref.alias !== null) {
      const alias = line.aliases[ref.alias];
      if (alias === undefined) throw notFound('adapter_alias', formatAdapterRef(ref));
      version = alias.version;
    } else version = this.latest(line).version;
    const record = line.versions.get(version);
    if (record === undefined) throw notFound('adapter_version', formatAdapterRef(ref));
    return record;
  }

  /**
   * Publishes a finished PEFT folder under `record.adapterId`: as version 1 of a new adapter, or, with
   * newVersion and an existing adapter, as its next version. Writes tuneserve.json (manifest and
   * content hash) into the folder and renames it into place. A new adapter's id must be reserved by
   * the caller. `knownFiles` is the manifest when the caller has already hashed the files (imports,
   * trained adapters written from memory); otherwise the files are hashed here.
   */
  async publish(
    folder: string,
    record: Omit<AdapterRecord, 'files' | 'version' | 'contentHash'>,
    knownFiles?: AdapterFileEntry[],
    options: { newVersion?: boolean } = {},
  ): Promise<VersionRecord> {
    let files: AdapterFileEntry[] = [];
    if (knownFiles) {
      files = knownFiles;
    } else {
      for (const name of [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_README_FILE]) {
        const file = path.join(folder, name);
        const stat = await fs.stat(file).catch(() => null);
        if (stat === null) continue;
        files.push({ name, sizeBytes: stat.size, sha256: await sha256File(file) });
      }
    }
    const id = record.adapterId;
    const contentHash = contentHashOf(files);
    return this.change(id, async () => {
      const target = this.dataRoot.entry('adapters', id);
      const exists = (await this.dataRoot.realExisting(target)) !== null;
      if (exists && !options.newVersion) throw alreadyExists('adapter', id);
      if (!exists) {
        const full: VersionRecord = { ...record, version: 1, contentHash, files, folder: target };
        await writeFileAtomic(path.join(folder, METADATA_FILE), JSON.stringify(stripFolder(full), null, 2));
        try {
          await publishFolder(folder, target);
        } catch (error) {
          if ((error as NodeJS.ErrnoException).code === 'EEXIST') throw alreadyExists('adapter', id);
          throw error;
        }
        const real = (await this.dataRoot.realExisting(target)) ?? target;
        const published = { ...full, folder: real };
        this.lines.set(id, { versions: new Map([[1, published]]), aliases: {} });
        this.logger.info({ adapterId: id, version: 1, source: record.source }, 'adapter stored');
        return published;
      }
      this.reserved.delete(id);  // it exists: a reservation of it can only be stale
      const line = await this.line(id);
      const owner = line.versions.get(1) ?? this.latest(line);
      const version = this.latest(line).version + 1;
      const versions = path.join(owner.folder, VERSIONS_FOLDER);
      await fs.mkdir(versions, { recursive: true });
      const destination = path.join(versions, `v${version}`);
      // A version belongs to its adapter: owner and sharing are the adapter's.
      const full: VersionRecord = {
        ...record, tenant: owner.tenant, shared: owner.shared, version, contentHash, files, folder: destination,
      };
      await writeFileAtomic(path.join(folder, METADATA_FILE), JSON.stringify(stripFolder(full), null, 2));
      await publishFolder(folder, destination);
      line.versions.set(version, full);
      this.logger.info({ adapterId: id, version, source: record.source }, 'adapter version stored');
      return full;
    });
  }

  /** Marks an adapter shared or private (rewrites its first version's tuneserve.json atomically). */
  async setShared(id: string, shared: boolean): Promise<AdapterView> {
    await this.change(id, async () => {
      const line = await this.line(id);
      const first = line.versions.get(1) ?? this.latest(line);
      const file = this.dataRoot.file(first.folder, METADATA_FILE);
      const stored = JSON.parse(await fs.readFile(file, 'utf8')) as AdapterRecord;
      await writeFileAtomic(file, JSON.stringify({ ...stored, shared }, null, 2));
      for (const record of line.versions.values()) record.shared = shared;
    });
    this.logger.info({ adapterId: id, shared }, 'adapter sharing changed');
    return this.get(id);
  }

  /** Points an alias at a version, remembering where it pointed before. NOT_FOUND for an unknown version. */
  async setAlias(id: string, alias: string, version: number): Promise<AdapterView> {
    await this.change(id, async () => {
      const line = await this.line(id);
      if (!line.versions.has(version)) throw notFound('adapter_version', `${id}@v${version}`);
      const old = line.aliases[alias];
      const history = old === undefined ? [] : old.version === version ? old.history : [...old.history, old.version];
      await this.writeAliases(line, { ...line.aliases, [alias]: { version, history } });
    });
    this.logger.info({ adapterId: id, alias, version }, 'adapter alias set');
    return this.get(id);
  }

  /** Moves an alias back to where it pointed before its last move. */
  async rollbackAlias(id: string, alias: string): Promise<AdapterView> {
    let version = 0;
    await this.change(id, async () => {
      const line = await this.line(id);
      const old = line.aliases[alias];
      if (old === undefined) throw notFound('adapter_alias', `${id}@${alias}`);
      const previous = old.history[old.history.length - 1];
      if (previous === undefined) {
        throw failedPrecondition('NO_ALIAS_HISTORY', `alias ${JSON.stringify(`${id}@${alias}`)} has never pointed anywhere else`, { adapter_id: id, alias });
      }
      version = previous;
      await this.writeAliases(line, { ...line.aliases, [alias]: { version: previous, history: old.history.slice(0, -1) } });
    });
    this.logger.info({ adapterId: id, alias, version }, 'adapter alias rolled back');
    return this.get(id);
  }

  /** Removes an alias; NOT_FOUND when it does not exist. */
  async deleteAlias(id: string, alias: string): Promise<AdapterView> {
    await this.change(id, async () => {
      const line = await this.line(id);
      if (line.aliases[alias] === undefined) throw notFound('adapter_alias', `${id}@${alias}`);
      const aliases = { ...line.aliases };
      delete aliases[alias];
      await this.writeAliases(line, aliases);
    });
    return this.get(id);
  }

  /** FAILED_PRECONDITION when the adapter was built against another base. */
  checkBase(adapter: Pick<AdapterRecord, 'adapterId' | 'baseFingerprint'>): void {
    const fingerprint = this.engine().modelInfo().fingerprint;
    if (adapter.baseFingerprint !== fingerprint) {
      throw failedPrecondition(
        'BASE_MISMATCH',
        `adapter ${JSON.stringify(adapter.adapterId)} was built for another base model (fingerprint ${adapter.baseFingerprint.slice(0, 12)}…, loaded ${fingerprint.slice(0, 12)}…)`,
        { adapter_id: adapter.adapterId, adapter_base_fingerprint: adapter.baseFingerprint, base_fingerprint: fingerprint },
      );
    }
  }

  /** Makes a version known to the engine's pool (nothing is read until it is used). */
  private async register(record: VersionRecord): Promise<string> {
    const key = versionKey(record.adapterId, record.version);
    // The pool reads the files on its first miss: they are checked once, before the engine may read them.
    if (!this.verified.has(`${key}:${record.contentHash}`)) {
      await this.verify(record);
      this.verified.add(`${key}:${record.contentHash}`);
    }
    this.engine().registerAdapter(key, { dir: record.folder, contentHash: record.contentHash, config: record.config });
    return key;
  }

  /**
   * Checks a version's files against the manifest in its tuneserve.json (integrity.ts): INTEGRITY_MISMATCH
   * (gRPC DATA_LOSS) when one changed on disk since it was stored. Loads into the pool (once per process
   * and version), exports and merges read the files only after this.
   */
  async verify(record: VersionRecord): Promise<VersionRecord> {
    try {
      await verifyFiles(record.folder, record.files, `adapter ${JSON.stringify(versionKey(record.adapterId, record.version))}`);
    } catch (error) {
      this.logger.warn({ adapterId: record.adapterId, version: record.version, error: String(error) }, 'stored adapter failed its integrity check');
      throw error;
    }
    return record;
  }

  /**
   * Serves the adapter a training run left in memory as the version just published for it: the
   * pool keeps it, so the first request reads no file.
   */
  adoptTrained(record: VersionRecord, trained: TrainedAdapter): void {
    // Its files were written from this very copy and hashed in memory.
    this.verified.add(`${versionKey(record.adapterId, record.version)}:${record.contentHash}`);
    this.engine().adoptTrainedAdapter(versionKey(record.adapterId, record.version), trained, {
      dir: record.folder, contentHash: record.contentHash, config: record.config,
    });
  }

  /**
   * Brings a version into a device slot (waiting, within the signal, while every slot is busy); errors
   * as LoadAdapter documents.
   */
  async load(ref: AdapterRef, signal: AbortSignal): Promise<VersionRecord> {
    const record = await this.resolve(ref);
    this.checkBase(record);
    const key = await this.register(record);
    try {
      await this.engine().loadAdapter(key, { signal });
    } catch (error) {
      throw this.loadFailure(error, record);
    }
    this.logger.info({ adapterId: record.adapterId, version: record.version }, 'adapter loaded');
    return record;
  }

  /** Resolves a reference and leases its version for one generation (the engine loads it on use). */
  async lease(ref: AdapterRef): Promise<AdapterLease> {
    const record = await this.resolve(ref);
    this.checkBase(record);
    const key = await this.register(record);
    this.pins.set(key, (this.pins.get(key) ?? 0) + 1);
    let released = false;
    return {
      key,
      adapterId: record.adapterId,
      version: record.version,
      release: () => {
        if (released) return;
        released = true;
        const count = (this.pins.get(key) ?? 1) - 1;
        if (count === 0) this.pins.delete(key);
        else this.pins.set(key, count);
      },
    };
  }

  /** A failed load as the client sees it: the adapter's files do not load. */
  loadFailure(error: unknown, record: Pick<VersionRecord, 'adapterId' | 'version'>): unknown {
    if (isEngineError(error) && error.code === 'ADAPTER_LOAD_FAILED') {
      return failedPrecondition('ADAPTER_LOAD_FAILED', `adapter ${record.adapterId}@v${record.version} could not be loaded: ${this.dataRoot.redact(error.message)}`, {
        adapter_id: record.adapterId, version: String(record.version),
      });
    }
    return error;
  }

  /** Pins a version in the pool (and loads it) or unpins it. */
  async pin(ref: AdapterRef, pinned: boolean, signal: AbortSignal): Promise<VersionRecord> {
    const record = await this.resolve(ref);
    this.checkBase(record);
    const key = await this.register(record);
    try {
      this.engine().pinAdapter(key, pinned);
    } catch (error) {
      if (isEngineError(error) && error.code === 'PIN_LIMIT') {
        throw failedPrecondition('PIN_LIMIT', error.message, { adapter_id: record.adapterId, version: String(record.version) });
      }
      throw error;
    }
    if (pinned) {
      try {
        await this.engine().loadAdapter(key, { signal });
      } catch (error) {
        throw this.loadFailure(error, record);
      }
    }
    this.logger.info({ adapterId: record.adapterId, version: record.version, pinned }, 'adapter pin changed');
    return record;
  }

  /** Generations using a version now. */
  pinCount(key: string): number {
    return this.pins.get(key) ?? 0;
  }

  /**
   * Drops versions from the pool (every one for a plain id, else the one named); FAILED_PRECONDITION
   * while generations use them.
   */
  async unload(ref: AdapterRef): Promise<void> {
    const line = await this.line(ref.adapterId);
    const versions = ref.version === null && ref.alias === null ? [...line.versions.values()] : [await this.resolve(ref)];
    const keys = versions.map((v) => versionKey(v.adapterId, v.version));
    const busy = keys.find((key) => this.pinCount(key) > 0);
    if (busy !== undefined) {
      throw failedPrecondition('ADAPTER_IN_USE', `adapter ${JSON.stringify(busy)} is used by ${this.pinCount(busy)} generation(s)`, {
        adapter_id: ref.adapterId,
      });
    }
    const engine = this.engine();
    for (const key of keys) await engine.unloadAdapter(key);
    this.logger.info({ adapterId: ref.adapterId, versions: keys.length }, 'adapter unloaded');
  }

  /**
   * Deletes a stored adapter with every version, unloading them first. FAILED_PRECONDITION while
   * generations use one or `blockedBy(id)` names a reason (a queued job continues from it).
   */
  async delete(id: string, blockedBy: (id: string) => string | null): Promise<void> {
    await this.line(id);
    const reason = blockedBy(id);
    if (reason !== null) {
      throw failedPrecondition('ADAPTER_IN_USE', `adapter ${JSON.stringify(id)} ${reason}`, { adapter_id: id });
    }
    await this.change(id, async () => {
      await this.unload({ adapterId: id, version: null, alias: null });
      await this.dataRoot.removeEntry(this.dataRoot.entry('adapters', id));
      this.lines.delete(id);
    });
    this.logger.info({ adapterId: id }, 'adapter deleted');
  }

  // ------------------------------------------------------------------------------------------------

  private latest(line: Line): VersionRecord {
    let latest: VersionRecord | undefined;
    for (const record of line.versions.values()) if (!latest || record.version > latest.version) latest = record;
    if (!latest) throw new Error('an adapter line without versions');
    return latest;
  }

  /** The line of an adapter, read from disk once; NOT_FOUND when absent or reserved. */
  private async line(id: string): Promise<Line> {
    if (this.reserved.has(id)) throw notFound('adapter', id);
    const cached = this.lines.get(id);
    if (cached) return cached;
    let reading = this.reading.get(id);
    if (!reading) {
      reading = this.readLine(id).finally(() => this.reading.delete(id));
      this.reading.set(id, reading);
    }
    const line = await reading;
    this.lines.set(id, this.lines.get(id) ?? line);
    return this.lines.get(id)!;
  }

  private async readLine(id: string): Promise<Line> {
    const root = await this.dataRoot.realExisting(this.dataRoot.entry('adapters', id));
    if (root === null) throw notFound('adapter', id);
    const versions = new Map<number, VersionRecord>();
    const first = await this.readVersion(root, 1);
    if (first === null) throw notFound('adapter', id);
    versions.set(1, first);
    const names = await fs.readdir(path.join(root, VERSIONS_FOLDER)).catch(() => [] as string[]);
    for (const name of names) {
      const match = /^v([1-9][0-9]*)$/.exec(name);
      if (!match) continue;
      const record = await this.readVersion(path.join(root, VERSIONS_FOLDER, name), Number(match[1]));
      if (record) versions.set(record.version, { ...record, tenant: first.tenant, shared: first.shared });
    }
    let aliases: Record<string, AliasRecord> = {};
    try {
      aliases = (JSON.parse(await fs.readFile(path.join(root, ALIASES_FILE), 'utf8')) as { aliases: Record<string, AliasRecord> }).aliases;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code !== 'ENOENT') throw error;
    }
    return { versions, aliases };
  }

  private async readVersion(folder: string, version: number): Promise<VersionRecord | null> {
    let record: AdapterRecord;
    try {
      record = JSON.parse(await fs.readFile(this.dataRoot.file(folder, METADATA_FILE), 'utf8')) as AdapterRecord;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') return null;
      throw error;
    }
    return { ...record, version: record.version ?? version, contentHash: record.contentHash ?? contentHashOf(record.files), folder };
  }

  private async writeAliases(line: Line, aliases: Record<string, AliasRecord>): Promise<void> {
    const root = (line.versions.get(1) ?? this.latest(line)).folder;
    await writeFileAtomic(path.join(root, ALIASES_FILE), JSON.stringify({ aliases }, null, 2));
    // One assignment, after the file is durable: a request resolving the alias sees the old table or the new one.
    line.aliases = aliases;
  }

  /** Runs changes to one adapter one at a time. */
  private async change<T>(id: string, fn: () => Promise<T>): Promise<T> {
    const before = this.changing.get(id) ?? Promise.resolve();
    const run = before.catch(() => {}).then(fn);
    this.changing.set(id, run);
    try {
      return await run;
    } finally {
      if (this.changing.get(id) === run) this.changing.delete(id);
    }
  }

  private view(id: string, line: Line): AdapterView {
    const states = this.engine().adapterPoolStates();
    const latest = this.latest(line);
    const first = line.versions.get(1) ?? latest;
    const stats = emptyStats();
    let tier: AdapterTier | null = null;
    const versions: AdapterVersionView[] = [...line.versions.values()]
      .sort((a, b) => a.version - b.version)
      .map((record) => {
        const pool = states.get(versionKey(id, record.version)) ?? null;
        if (pool) {
          addStats(stats, pool.stats);
          if (tier === null || TIER_ORDER[pool.tier] > TIER_ORDER[tier]) tier = pool.tier;
        }
        return { ...stripFolder(record), sizeBytes: sizeOf(record), pool };
      });
    return {
      ...stripFolder(latest),
      tenant: first.tenant,
      shared: first.shared,
      loaded: tier === 'device',
      sizeBytes: sizeOf(latest),
      versions,
      aliases: { ...line.aliases },
      stats,
      tier,
    };
  }
}

function stripFolder<T extends { folder: string }>(record: T): Omit<T, 'folder'> {
  const { folder: _folder, ...rest } = record;
  return rest;
}

function sizeOf(record: AdapterRecord): number {
  return record.files.reduce((sum, file) => sum + file.sizeBytes, 0);
}
