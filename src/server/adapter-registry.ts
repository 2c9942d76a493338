// Stored adapters and the engine's adapter pool. An adapter is a PEFT folder under
// <data root>/adapters/<id>/ plus tuneserve.json (source, metrics, created time, base fingerprint,
// file manifest). Folders are published with one atomic rename; loading goes through here so
// that ids are checked, loads of one id are not duplicated, and adapters in use by generations
// are pinned against unloading. Eviction is never implicit.

import { readFileSync } from 'node:fs';
import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { publishFolder, writeFileAtomic } from '../engine/atomic-file.js';
import { digestFiles, verifyFiles } from '../engine/integrity.js';
import { DataRoot } from './data-root.js';
import type { AdapterConfig, EnginePort } from './engine-port.js';
import { alreadyExists, failedPrecondition, isEngineError, notFound, resourceExhausted } from './errors.js';
import type { TrainingMetricsRecord } from './job-store.js';
import type { Logger } from './logger.js';

/** The metadata file tuneserve keeps next to the PEFT files. */
export const METADATA_FILE = 'tuneserve.json';

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

/** A stored adapter and its pool state. */
export interface AdapterView extends AdapterRecord {
  loaded: boolean;
  sizeBytes: number;
}

/** A pin on a loaded adapter, held by a generation; release exactly once. */
export interface AdapterLease {
  release(): void;
}

/**
 * The adapter a job published, when its tuneserve.json names that job (the folder appears whole, with
 * tuneserve.json in it, or not at all); null otherwise. Synchronous: the job store asks while it opens,
 * before the server serves, for jobs that were running when the process died.
 */
export function publishedAdapterOf(dataRoot: DataRoot, job: { jobId: string; adapterId: string }): { adapterId: string; metrics: TrainingMetricsRecord } | null {
  try {
    const record = JSON.parse(readFileSync(path.join(dataRoot.entry('adapters', job.adapterId), METADATA_FILE), 'utf8')) as AdapterRecord;
    return record.jobId === job.jobId && record.metrics !== null ? { adapterId: job.adapterId, metrics: record.metrics } : null;
  } catch {
    return null;
  }
}

/** The adapters on disk and the engine pool. */
export class AdapterRegistry {
  /** Ids being produced (by a training job or an import): they count as taken. */
  private readonly reserved = new Set<string>();
  /** In-flight loads per id, so concurrent requests share one load. */
  private readonly loading = new Map<string, Promise<void>>();
  /** Generations using each adapter. */
  private readonly pins = new Map<string, number>();

  constructor(
    private readonly dataRoot: DataRoot,
    private readonly engine: () => EnginePort,
    private readonly logger: Logger,
  ) {}

  /** Whether the id is taken on disk or reserved by work in progress. */
  async isTaken(id: string): Promise<boolean> {
    return this.reserved.has(id) || (await this.dataRoot.realExisting(this.dataRoot.entry('adapters', id))) !== null;
  }

  /** Reserves an id for work that will publish it; ALREADY_EXISTS when taken. */
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

  /** The stored adapter's folder as a real path; NOT_FOUND when absent. */
  async folder(id: string): Promise<string> {
    const real = await this.dataRoot.realExisting(this.dataRoot.entry('adapters', id));
    if (real === null || this.reserved.has(id)) throw notFound('adapter', id);
    return real;
  }

  /**
   * The stored adapter's folder after checking its files against the manifest in tuneserve.json
   * (integrity.ts): INTEGRITY_MISMATCH (gRPC DATA_LOSS) when a file changed on
   * disk since the adapter was stored. Every path that reads an adapter's weights comes through here.
   */
  async verifiedFolder(id: string, record?: AdapterRecord): Promise<string> {
    const folder = await this.folder(id);
    const files = (record ?? (await this.get(id))).files;
    try {
      await verifyFiles(folder, files, `adapter ${JSON.stringify(id)}`);
    } catch (error) {
      this.logger.warn({ adapterId: id, error: String(error) }, 'stored adapter failed its integrity check');
      throw error;
    }
    return folder;
  }

  /** A stored adapter; NOT_FOUND when absent. */
  async get(id: string): Promise<AdapterView> {
    const folder = await this.folder(id);
    let record: AdapterRecord;
    try {
      record = JSON.parse(await fs.readFile(this.dataRoot.file(folder, METADATA_FILE), 'utf8')) as AdapterRecord;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') throw notFound('adapter', id);
      throw error;
    }
    return {
      ...record,
      loaded: this.engine().loadedAdapters().includes(id),
      sizeBytes: record.files.reduce((sum, file) => sum + file.sizeBytes, 0),
    };
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
   * Publishes a finished PEFT folder under `id`: writes tuneserve.json (with the file manifest)
   * into it and renames it into place. The id must be reserved by the caller. `knownFiles` is
   * the manifest when the caller has already hashed the files (imports).
   */
  async publish(
    folder: string,
    record: Omit<AdapterRecord, 'files'>,
    knownFiles?: AdapterFileEntry[],
  ): Promise<AdapterRecord> {
    let files: AdapterFileEntry[] = [];
    if (knownFiles) {
      files = knownFiles;
    } else {
      const present: string[] = [];
      for (const name of [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE, ADAPTER_README_FILE]) {
        if ((await fs.stat(path.join(folder, name)).catch(() => null)) !== null) present.push(name);
      }
      files = await digestFiles(folder, present);
    }
    const full: AdapterRecord = { ...record, files };
    await writeFileAtomic(path.join(folder, METADATA_FILE), JSON.stringify(full, null, 2));
    try {
      await publishFolder(folder, this.dataRoot.entry('adapters', record.adapterId));
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'EEXIST') throw alreadyExists('adapter', record.adapterId);
      throw error;
    }
    this.logger.info({ adapterId: record.adapterId, source: record.source }, 'adapter stored');
    return full;
  }

  /** Marks an adapter shared or private (rewrites its tuneserve.json atomically). */
  async setShared(id: string, shared: boolean): Promise<AdapterView> {
    const folder = await this.folder(id);
    const file = this.dataRoot.file(folder, METADATA_FILE);
    const record = JSON.parse(await fs.readFile(file, 'utf8')) as AdapterRecord;
    await writeFileAtomic(file, JSON.stringify({ ...record, shared }, null, 2));
    this.logger.info({ adapterId: id, shared }, 'adapter sharing changed');
    return this.get(id);
  }

  /** FAILED_PRECONDITION when the adapter was built against another base. */
  checkBase(adapter: AdapterRecord): void {
    const fingerprint = this.engine().modelInfo().fingerprint;
    if (adapter.baseFingerprint !== fingerprint) {
      throw failedPrecondition(
        'BASE_MISMATCH',
        `adapter ${JSON.stringify(adapter.adapterId)} was built for another base model (fingerprint ${adapter.baseFingerprint.slice(0, 12)}…, loaded ${fingerprint.slice(0, 12)}…)`,
        { adapter_id: adapter.adapterId, adapter_base_fingerprint: adapter.baseFingerprint, base_fingerprint: fingerprint },
      );
    }
  }

  /** Loads an adapter into the pool unless it is there; errors as LoadAdapter documents. */
  async load(id: string): Promise<void> {
    const engine = this.engine();
    if (engine.loadedAdapters().includes(id)) return;
    const inFlight = this.loading.get(id);
    if (inFlight) return inFlight;
    const load = (async () => {
      const adapter = await this.get(id);
      this.checkBase(adapter);
      const folder = await this.verifiedFolder(id, adapter);
      try {
        await engine.loadAdapter(id, folder);
      } catch (error) {
        if (isEngineError(error) && error.code === 'RESOURCE_EXHAUSTED') {
          const slots = engine.modelInfo().adapterSlots;
          throw resourceExhausted(
            'ADAPTER_POOL_FULL',
            `all ${slots} adapter slots are taken; unload an adapter first`,
            5000,
            { adapter_slots: String(slots) },
          );
        }
        throw error;
      }
      this.logger.info({ adapterId: id }, 'adapter loaded');
    })();
    this.loading.set(id, load);
    try {
      await load;
    } finally {
      this.loading.delete(id);
    }
  }

  /** Loads (when needed) and pins an adapter for one generation. */
  async lease(id: string): Promise<AdapterLease> {
    this.pins.set(id, (this.pins.get(id) ?? 0) + 1);
    let released = false;
    const release = (): void => {
      if (released) return;
      released = true;
      const count = (this.pins.get(id) ?? 1) - 1;
      if (count === 0) this.pins.delete(id);
      else this.pins.set(id, count);
    };
    try {
      await this.load(id);
    } catch (error) {
      release();
      throw error;
    }
    return { release };
  }

  /** Generations using an adapter now. */
  pinCount(id: string): number {
    return this.pins.get(id) ?? 0;
  }

  /** Unloads an adapter (no-op when not loaded); FAILED_PRECONDITION while generations use it. */
  async unload(id: string): Promise<void> {
    await this.folder(id);
    const inFlight = this.loading.get(id);
    if (inFlight) await inFlight.catch(() => {});
    if (this.pinCount(id) > 0) {
      throw failedPrecondition('ADAPTER_IN_USE', `adapter ${JSON.stringify(id)} is used by ${this.pinCount(id)} generation(s)`, {
        adapter_id: id,
      });
    }
    const engine = this.engine();
    if (!engine.loadedAdapters().includes(id)) return;
    await engine.unloadAdapter(id);
    this.logger.info({ adapterId: id }, 'adapter unloaded');
  }

  /**
   * Deletes a stored adapter, unloading it first. FAILED_PRECONDITION while generations use it
   * or `blockedBy(id)` names a reason (a queued job continues from it).
   */
  async delete(id: string, blockedBy: (id: string) => string | null): Promise<void> {
    await this.folder(id);
    const reason = blockedBy(id);
    if (reason !== null) {
      throw failedPrecondition('ADAPTER_IN_USE', `adapter ${JSON.stringify(id)} ${reason}`, { adapter_id: id });
    }
    await this.unload(id);
    await this.dataRoot.removeEntry(this.dataRoot.entry('adapters', id));
    this.logger.info({ adapterId: id }, 'adapter deleted');
  }
}
