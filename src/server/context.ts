// What the RPC handlers share: the engine, the stores under the data root, the training queue,
// telemetry, the logger and the server's limits.

import type { AdapterRegistry } from './adapter-registry.js';
import type { DataRoot } from './data-root.js';
import type { DatasetStore } from './datasets.js';
import type { EnginePort } from './engine-port.js';
import type { JobQueue } from './job-queue.js';
import type { JobStore } from './job-store.js';
import type { Logger } from './logger.js';
import type { Telemetry } from './telemetry.js';

/** Limits a server enforces (GetModelInfo reports them). */
export interface ServerLimits {
  /** Training jobs waiting at once. */
  maxQueuedJobs: number;
  /** Generations served at once. */
  maxConcurrentGenerations: number;
  /** Largest dataset upload, bytes. */
  maxDatasetBytes: number;
  /** Largest inline dataset in a TrainRequest, bytes. */
  maxInlineDatasetBytes: number;
  /** Largest adapter_model.safetensors accepted by ImportAdapter, bytes. */
  maxAdapterBytes: number;
}

/** Defaults of ServerLimits. */
export const defaultLimits: ServerLimits = {
  maxQueuedJobs: 16,
  maxConcurrentGenerations: 64,
  maxDatasetBytes: 1024 ** 3,
  maxInlineDatasetBytes: 1024 ** 2,
  maxAdapterBytes: 4 * 1024 ** 3,
};

/** Largest chunk of a file stream, bytes. */
export const MAX_CHUNK_BYTES = 2 * 1024 * 1024;

/** The merge in progress, if any (one at a time). */
export interface MergeInProgress {
  outputName: string;
  startedAt: number;
  tensorsDone: number;
  tensorCount: number;
}

/** Shared by every handler. */
export interface ServiceContext {
  /** The engine; handlers run only once it is ready. */
  engine(): EnginePort;
  dataRoot: DataRoot;
  store: JobStore;
  queue: JobQueue;
  datasets: DatasetStore;
  adapters: AdapterRegistry;
  telemetry: Telemetry;
  logger: Logger;
  limits: ServerLimits;
  /** Generations in progress. */
  generations: { active: number };
  /** The merge in progress. */
  merge: { current: MergeInProgress | null };
  /** Version string reported by GetModelInfo. */
  serverVersion: string;
}
