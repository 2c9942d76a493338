// Persistent job history in SQLite (better-sqlite3, WAL) under the data root: one row per job and
// every event of every job (queued, dataset report, started, each step, evals, checkpoints, the end), so a
// restart keeps each loss curve. Opening the store marks jobs that were running as interrupted.

import Database from 'better-sqlite3';
import type { DatasetReport, SchedulingPolicy, TrainSpec } from './engine-port.js';

/** Hyperparameters of a job, defaults filled in (TrainSpec without its paths). */
export type Hyperparameters = Omit<TrainSpec, 'datasetPath' | 'outDir' | 'checkpointDir' | 'initAdapterDir'>;

/** Life-cycle state of a job. */
export type JobState = 'queued' | 'running' | 'succeeded' | 'failed' | 'cancelled' | 'interrupted';

/** States a job never leaves. */
export const terminalStates: ReadonlySet<JobState> = new Set(['succeeded', 'failed', 'cancelled', 'interrupted']);

/** What a finished run measured. */
export interface TrainingMetricsRecord {
  finalLoss: number;
  evalLoss: number | null;
  steps: number;
  tokens: number;
  trainSeconds: number;
  stoppedEarly?: boolean;
  bestStep?: number | null;
  bestEvalLoss?: number | null;
  forgettingBaseLoss?: number | null;
  forgettingLoss?: number | null;
  guardInterventions?: number;
}

/** One optimizer step's progress. */
export interface StepRecord {
  step: number;
  totalSteps: number;
  epoch: number;
  loss: number;
  gradNorm: number;
  learningRate: number;
  tokensPerSecond: number;
  elapsedSeconds: number;
  etaSeconds: number;
  /** Share of the engine's busy time the job got since the previous step; absent on older records. */
  deviceShare?: number;
  generationSteps?: number;
  deferredMicroSteps?: number;
}

/** The content of a job event (the wire's JobEvent.kind, in storage form). */
export type JobEventData =
  | { kind: 'queued'; queuePosition: number }
  | { kind: 'dataset'; report: DatasetReport }
  | { kind: 'started'; totalSteps: number; trainExamples: number; evalExamples: number; schedulingPolicy?: SchedulingPolicy }
  | ({ kind: 'step' } & StepRecord)
  | { kind: 'eval'; step: number; loss: number; forgettingLoss?: number; forgettingBaseLoss?: number }
  | { kind: 'checkpoint'; step: number }
  | { kind: 'guard'; step: number; action: 'skip' | 'rollback'; reason: string; rolledBackTo: number }
  | { kind: 'warning'; code: string; message: string }
  | { kind: 'resumed'; checkpointStep: number }
  | { kind: 'completed'; adapterId: string; metrics: TrainingMetricsRecord; version?: number; contentHash?: string }
  | { kind: 'failed'; reason: string; message: string }
  | { kind: 'cancelled'; stepsCompleted: number }
  | { kind: 'interrupted'; lastStep: number; lastCheckpointStep: number };

/** A stored event. */
export interface JobEventRecord {
  jobId: string;
  /** 1, 2, 3, ... per job. */
  sequence: number;
  /** Unix milliseconds. */
  time: number;
  data: JobEventData;
}

/** A stored job. */
export interface JobRecord {
  jobId: string;
  /** Creation order across all jobs. */
  ordinal: number;
  state: JobState;
  adapterId: string;
  datasetId: string | null;
  /** Dataset file relative to the data root. */
  datasetPath: string;
  initAdapterId: string | null;
  config: Hyperparameters;
  createTime: number;
  startTime: number | null;
  endTime: number | null;
  totalSteps: number;
  lastStep: StepRecord | null;
  metrics: TrainingMetricsRecord | null;
  failureReason: string | null;
  failureMessage: string | null;
  lastCheckpointStep: number;
  lastSequence: number;
  /** The tenant of the key that submitted it. */
  tenant: string;
  /** It publishes the next version of an existing adapter (TrainRequest.new_version). */
  newVersion: boolean;
}

/** A new job's fields. */
export interface NewJob {
  jobId: string;
  tenant: string;
  newVersion?: boolean;
  adapterId: string;
  datasetId: string | null;
  datasetPath: string;
  initAdapterId: string | null;
  config: Hyperparameters;
}

interface JobRow {
  job_id: string;
  ordinal: number;
  state: JobState;
  adapter_id: string;
  dataset_id: string | null;
  dataset_path: string;
  init_adapter_id: string | null;
  config_json: string;
  create_time: number;
  start_time: number | null;
  end_time: number | null;
  total_steps: number;
  last_step_json: string | null;
  metrics_json: string | null;
  failure_reason: string | null;
  failure_message: string | null;
  last_checkpoint_step: number;
  last_sequence: number;
  tenant: string;
  new_version: number;
}

interface EventRow {
  job_id: string;
  sequence: number;
  time: number;
  payload: string;
}

// 2: jobs.tenant (the tenant of the key that submitted the job; 'default' for older rows).
// 3: jobs.new_version (the job publishes the next version of an existing adapter; 0 for older rows).
const SCHEMA_VERSION = 3;

const schema = `
CREATE TABLE IF NOT EXISTS jobs (
  job_id TEXT PRIMARY KEY,
  ordinal INTEGER NOT NULL UNIQUE,
  state TEXT NOT NULL,
  adapter_id TEXT NOT NULL,
  dataset_id TEXT,
  dataset_path TEXT NOT NULL,
  init_adapter_id TEXT,
  config_json TEXT NOT NULL,
  create_time INTEGER NOT NULL,
  start_time INTEGER,
  end_time INTEGER,
  total_steps INTEGER NOT NULL DEFAULT 0,
  last_step_json TEXT,
  metrics_json TEXT,
  failure_reason TEXT,
  failure_message TEXT,
  last_checkpoint_step INTEGER NOT NULL DEFAULT 0,
  last_sequence INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state, ordinal);
CREATE TABLE IF NOT EXISTS job_events (
  job_id TEXT NOT NULL REFERENCES jobs (job_id) ON DELETE CASCADE,
  sequence INTEGER NOT NULL,
  time INTEGER NOT NULL,
  kind TEXT NOT NULL,
  payload TEXT NOT NULL,
  PRIMARY KEY (job_id, sequence)
) WITHOUT ROWID;
`;

/** The job database. All calls are synchronous (better-sqlite3) and each write is a transaction. */
export class JobStore {
  private readonly db: Database.Database;
  private readonly statements;
  /** UPDATE statements by the set of columns they write. */
  private readonly updates = new Map<string, Database.Statement>();

  /**
   * Opens (creating when missing) the database and marks jobs that were running as interrupted, or as
   * completed when `publishedBy(job)` finds that the job had already published its adapter (the process
   * died between the adapter's publish and the completion record).
   */
  constructor(
    file: string,
    now: () => number = Date.now,
    private readonly publishedBy: (job: JobRecord) => { adapterId: string; metrics: TrainingMetricsRecord; version: number; contentHash: string } | null = () => null,
  ) {
    this.db = new Database(file);
    this.db.pragma('journal_mode = WAL');
    this.db.pragma('synchronous = NORMAL');
    this.db.pragma('foreign_keys = ON');
    this.db.pragma('busy_timeout = 5000');
    const version = this.db.pragma('user_version', { simple: true }) as number;
    if (version > SCHEMA_VERSION) {
      throw new Error(`${file} has schema version ${version}; this server knows up to ${SCHEMA_VERSION}`);
    }
    this.db.exec(schema);
    const columns = this.db.prepare<[], { name: string }>('PRAGMA table_info(jobs)').all().map((c) => c.name);
    if (!columns.includes('tenant')) this.db.exec("ALTER TABLE jobs ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default'");
    if (!columns.includes('new_version')) this.db.exec('ALTER TABLE jobs ADD COLUMN new_version INTEGER NOT NULL DEFAULT 0');
    this.db.pragma(`user_version = ${SCHEMA_VERSION}`);
    this.statements = {
      insertJob: this.db.prepare(
        `INSERT INTO jobs (job_id, ordinal, state, adapter_id, dataset_id, dataset_path, init_adapter_id, config_json, create_time, tenant, new_version)
         VALUES (@job_id, (SELECT COALESCE(MAX(ordinal), 0) + 1 FROM jobs), 'queued', @adapter_id, @dataset_id, @dataset_path, @init_adapter_id, @config_json, @create_time, @tenant, @new_version)`,
      ),
      getJob: this.db.prepare<[string], JobRow>('SELECT * FROM jobs WHERE job_id = ?'),
      insertEvent: this.db.prepare(
        'INSERT INTO job_events (job_id, sequence, time, kind, payload) VALUES (?, ?, ?, ?, ?)',
      ),
      eventsAfter: this.db.prepare<[string, number, number], EventRow>(
        'SELECT job_id, sequence, time, payload FROM job_events WHERE job_id = ? AND sequence > ? ORDER BY sequence LIMIT ?',
      ),
      eventsOfKind: this.db.prepare<[string, string], EventRow>(
        'SELECT job_id, sequence, time, payload FROM job_events WHERE job_id = ? AND kind = ? ORDER BY sequence',
      ),
      jobsInState: this.db.prepare<[string], JobRow>('SELECT * FROM jobs WHERE state = ? ORDER BY ordinal'),
      setRunning: this.db.prepare("UPDATE jobs SET state = 'running', start_time = ? WHERE job_id = ? AND state = 'queued'"),
    };
    this.interruptRunningJobs(now());
  }

  /** Inserts a queued job and its first event, atomically. */
  insert(job: NewJob, queuePosition: number, time: number): JobRecord {
    this.db.transaction(() => {
      this.statements.insertJob.run({
        job_id: job.jobId,
        adapter_id: job.adapterId,
        dataset_id: job.datasetId,
        dataset_path: job.datasetPath,
        init_adapter_id: job.initAdapterId,
        config_json: JSON.stringify(job.config),
        create_time: time,
        tenant: job.tenant,
        new_version: job.newVersion ? 1 : 0,
      });
      this.appendInTransaction(job.jobId, { kind: 'queued', queuePosition }, time);
    })();
    return this.require(job.jobId);
  }

  /** Moves a queued job to running. */
  markRunning(jobId: string, time: number): void {
    this.statements.setRunning.run(time, jobId);
  }

  /**
   * Puts an ended job (interrupted, cancelled or failed) back in the queue with a resumed event, in
   * one transaction; its end time and failure are cleared. Returns null when the job is not in one
   * of those states.
   */
  resume(jobId: string, checkpointStep: number, time: number): JobEventRecord | null {
    return this.db.transaction(() => {
      const row = this.statements.getJob.get(jobId);
      if (!row || !['interrupted', 'cancelled', 'failed'].includes(row.state)) return null;
      this.db
        .prepare("UPDATE jobs SET state = 'queued', end_time = NULL, failure_reason = NULL, failure_message = NULL WHERE job_id = ?")
        .run(jobId);
      return this.appendInTransaction(jobId, { kind: 'resumed', checkpointStep }, time);
    })();
  }

  /**
   * Appends an event and updates the job row to match, atomically. Returns null (and stores
   * nothing) when the job has already ended: late events of a stopped run are dropped.
   */
  append(jobId: string, data: JobEventData, time: number): JobEventRecord | null {
    return this.db.transaction(() => this.appendInTransaction(jobId, data, time))();
  }

  /** A job, or null. */
  get(jobId: string): JobRecord | null {
    const row = this.statements.getJob.get(jobId);
    return row ? fromRow(row) : null;
  }

  /** Jobs in creation order (newest first), optionally filtered by state, after an ordinal cursor. */
  list(options: { states: JobState[]; limit: number; beforeOrdinal: number | null; tenant?: string }): JobRecord[] {
    const clauses: string[] = [];
    const parameters: (string | number)[] = [];
    if (options.tenant !== undefined) {
      clauses.push('tenant = ?');
      parameters.push(options.tenant);
    }
    if (options.states.length > 0) {
      clauses.push(`state IN (${options.states.map(() => '?').join(', ')})`);
      parameters.push(...options.states);
    }
    if (options.beforeOrdinal !== null) {
      clauses.push('ordinal < ?');
      parameters.push(options.beforeOrdinal);
    }
    const where = clauses.length > 0 ? `WHERE ${clauses.join(' AND ')}` : '';
    const rows = this.db
      .prepare<(string | number)[], JobRow>(`SELECT * FROM jobs ${where} ORDER BY ordinal DESC LIMIT ?`)
      .all(...parameters, options.limit);
    return rows.map(fromRow);
  }

  /** Jobs in one state, oldest first. */
  inState(state: JobState): JobRecord[] {
    return this.statements.jobsInState.all(state).map(fromRow);
  }

  /** Up to `limit` events with sequence > afterSequence, in order. */
  eventsAfter(jobId: string, afterSequence: number, limit: number): JobEventRecord[] {
    return this.statements.eventsAfter.all(jobId, afterSequence, limit).map(eventFromRow);
  }

  /** Every event of one kind (e.g. the step history), in order. */
  eventsOfKind<K extends JobEventData['kind']>(jobId: string, kind: K): (JobEventRecord & { data: Extract<JobEventData, { kind: K }> })[] {
    return this.statements.eventsOfKind.all(jobId, kind).map(eventFromRow) as (JobEventRecord & {
      data: Extract<JobEventData, { kind: K }>;
    })[];
  }

  /** Closes the database (checkpointing the WAL). */
  close(): void {
    if (this.db.open) this.db.close();
  }

  private require(jobId: string): JobRecord {
    const job = this.get(jobId);
    if (!job) throw new Error(`job ${jobId} vanished`);
    return job;
  }

  private interruptRunningJobs(time: number): void {
    for (const job of this.inState('running')) {
      const published = this.publishedBy(job);
      if (published !== null) {
        this.append(job.jobId, { kind: 'completed', ...published }, time);
        continue;
      }
      this.append(
        job.jobId,
        { kind: 'interrupted', lastStep: job.lastStep?.step ?? 0, lastCheckpointStep: job.lastCheckpointStep },
        time,
      );
    }
  }

  private appendInTransaction(jobId: string, data: JobEventData, time: number): JobEventRecord | null {
    const row = this.statements.getJob.get(jobId);
    if (!row) throw new Error(`no job ${jobId}`);
    if (terminalStates.has(row.state)) return null;
    const sequence = row.last_sequence + 1;
    this.statements.insertEvent.run(jobId, sequence, time, data.kind, JSON.stringify(data));
    const update: Record<string, string | number | null> = { last_sequence: sequence };
    switch (data.kind) {
      case 'queued':
      case 'dataset':
      case 'eval':
      case 'guard':
      case 'warning':
        break;
      case 'resumed':
        update.last_checkpoint_step = data.checkpointStep;
        break;
      case 'started':
        update.total_steps = data.totalSteps;
        break;
      case 'step': {
        const { kind: _kind, ...step } = data;
        update.last_step_json = JSON.stringify(step);
        update.total_steps = data.totalSteps;
        break;
      }
      case 'checkpoint':
        update.last_checkpoint_step = data.step;
        break;
      case 'completed':
        update.state = 'succeeded';
        update.end_time = time;
        update.metrics_json = JSON.stringify(data.metrics);
        break;
      case 'failed':
        update.state = 'failed';
        update.end_time = time;
        update.failure_reason = data.reason;
        update.failure_message = data.message;
        break;
      case 'cancelled':
        update.state = 'cancelled';
        update.end_time = time;
        break;
      case 'interrupted':
        update.state = 'interrupted';
        update.end_time = time;
        break;
    }
    const columns = Object.keys(update).join(',');
    let statement = this.updates.get(columns);
    if (!statement) {
      const assignments = Object.keys(update).map((c) => `${c} = @${c}`);
      statement = this.db.prepare(`UPDATE jobs SET ${assignments.join(', ')} WHERE job_id = @job_id`);
      this.updates.set(columns, statement);
    }
    statement.run({ ...update, job_id: jobId });
    return { jobId, sequence, time, data };
  }
}

function fromRow(row: JobRow): JobRecord {
  return {
    jobId: row.job_id,
    ordinal: row.ordinal,
    state: row.state,
    adapterId: row.adapter_id,
    datasetId: row.dataset_id,
    datasetPath: row.dataset_path,
    initAdapterId: row.init_adapter_id,
    config: JSON.parse(row.config_json) as Hyperparameters,
    createTime: row.create_time,
    startTime: row.start_time,
    endTime: row.end_time,
    totalSteps: row.total_steps,
    lastStep: row.last_step_json === null ? null : (JSON.parse(row.last_step_json) as StepRecord),
    metrics: row.metrics_json === null ? null : (JSON.parse(row.metrics_json) as TrainingMetricsRecord),
    failureReason: row.failure_reason,
    failureMessage: row.failure_message,
    lastCheckpointStep: row.last_checkpoint_step,
    lastSequence: row.last_sequence,
    tenant: row.tenant,
    newVersion: row.new_version === 1,
  };
}

function eventFromRow(row: EventRow): JobEventRecord {
  return { jobId: row.job_id, sequence: row.sequence, time: row.time, data: JSON.parse(row.payload) as JobEventData };
}
