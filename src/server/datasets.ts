// Stored training datasets: chunked uploads checked against a size limit, a SHA-256 and the JSONL
// row shapes while they stream, written to a temp folder and published with one atomic rename
// (datasets/<id>/{data.jsonl,dataset.json}); a failed upload leaves nothing behind.

import * as fs from 'node:fs/promises';
import * as path from 'node:path';
import { publishFolder, writeFileAtomic } from '../engine/atomic-file.js';
import { DataRoot } from './data-root.js';
import { alreadyExists, failedPrecondition, invalidArgument, notFound } from './errors.js';
import { IncomingFile, isSha256Hex } from './incoming-file.js';
import { JsonlChecker } from './jsonl-check.js';
import type { Logger } from './logger.js';

/** The JSONL file inside a dataset folder. */
export const DATASET_FILE = 'data.jsonl';
const METADATA_FILE = 'dataset.json';

/** A stored dataset. */
export interface DatasetRecord {
  datasetId: string;
  sizeBytes: number;
  sha256: string;
  rowCount: number;
  /** Unix milliseconds. */
  createTime: number;
  /** The owning tenant; absent on datasets stored before tenants existed (the default tenant). */
  tenant?: string;
  /** Whether every tenant may see it and train on it. */
  shared?: boolean;
}

/** The header of an upload, ids already validated. */
export interface UploadHeader {
  datasetId: string;
  sizeBytes: number;
  sha256: string;
  /** Owner of the new dataset. */
  tenant?: string;
  shared?: boolean;
}

/** Datasets under <data root>/datasets. */
export class DatasetStore {
  /** Ids with an upload in progress. */
  private readonly uploading = new Set<string>();

  constructor(
    private readonly dataRoot: DataRoot,
    private readonly maxDatasetBytes: number,
    private readonly logger: Logger,
  ) {}

  /** Validates an upload header: INVALID_ARGUMENT naming the field. */
  checkHeader(header: UploadHeader): void {
    if (header.sizeBytes <= 0) throw invalidArgument('header.size_bytes', 'must be at least 1');
    if (header.sizeBytes > this.maxDatasetBytes) {
      throw invalidArgument(
        'header.size_bytes',
        `is ${header.sizeBytes}, above the server's limit of ${this.maxDatasetBytes} bytes`,
        'DATASET_TOO_LARGE',
      );
    }
    if (!isSha256Hex(header.sha256)) throw invalidArgument('header.sha256', 'must be 64 lowercase hexadecimal characters');
  }

  /**
   * Receives an upload. The dataset exists only when every byte arrived and checked out;
   * ALREADY_EXISTS when the id is taken (or being uploaded), INVALID_ARGUMENT for bad content.
   */
  async upload(header: UploadHeader, chunks: AsyncIterable<Uint8Array>, vocabSize: number): Promise<DatasetRecord> {
    this.checkHeader(header);
    const id = header.datasetId;
    const destination = this.dataRoot.entry('datasets', id);
    if (this.uploading.has(id) || (await this.dataRoot.realExisting(destination)) !== null) {
      throw alreadyExists('dataset', id);
    }
    this.uploading.add(id);
    const folder = await this.dataRoot.tempFolder('dataset');
    try {
      const file = await IncomingFile.create(path.join(folder, DATASET_FILE), {
        sizeBytes: header.sizeBytes,
        sha256: header.sha256,
        dataField: 'chunk',
        sizeField: 'header.size_bytes',
        shaField: 'header.sha256',
      });
      const checker = new JsonlChecker('chunk', vocabSize);
      try {
        for await (const chunk of chunks) {
          await file.write(chunk);
          checker.push(chunk);
        }
        await file.finish();
      } catch (error) {
        await file.discard();
        throw error;
      }
      const record: DatasetRecord = {
        datasetId: id,
        sizeBytes: header.sizeBytes,
        sha256: header.sha256,
        rowCount: checker.finish(),
        createTime: Date.now(),
        ...(header.tenant === undefined ? {} : { tenant: header.tenant }),
        shared: header.shared === true,
      };
      await writeFileAtomic(path.join(folder, METADATA_FILE), JSON.stringify(record, null, 2));
      try {
        await publishFolder(folder, destination);
      } catch (error) {
        if ((error as NodeJS.ErrnoException).code === 'EEXIST') throw alreadyExists('dataset', id);
        throw error;
      }
      this.logger.info({ datasetId: id, sizeBytes: record.sizeBytes, rows: record.rowCount }, 'dataset stored');
      return record;
    } finally {
      this.uploading.delete(id);
      await fs.rm(folder, { recursive: true, force: true });
    }
  }

  /** A dataset; NOT_FOUND when absent. */
  async get(id: string): Promise<DatasetRecord> {
    const folder = this.dataRoot.entry('datasets', id);
    const real = await this.dataRoot.realExisting(folder);
    if (real === null) throw notFound('dataset', id);
    try {
      return JSON.parse(await fs.readFile(this.dataRoot.file(real, METADATA_FILE), 'utf8')) as DatasetRecord;
    } catch (error) {
      if ((error as NodeJS.ErrnoException).code === 'ENOENT') throw notFound('dataset', id);
      throw error;
    }
  }

  /** The JSONL file of a dataset that exists (NOT_FOUND otherwise), as a real path. */
  async dataFile(id: string): Promise<string> {
    await this.get(id);
    const real = await this.dataRoot.realExisting(this.dataRoot.file(this.dataRoot.entry('datasets', id), DATASET_FILE));
    if (real === null) throw notFound('dataset', id);
    return real;
  }

  /** Every dataset, in id order. */
  async list(): Promise<DatasetRecord[]> {
    const ids = (await fs.readdir(this.dataRoot.folder('datasets'))).sort();
    const records: DatasetRecord[] = [];
    for (const id of ids) {
      try {
        records.push(await this.get(id));
      } catch (error) {
        this.logger.warn({ datasetId: id, error: String(error) }, 'skipping unreadable dataset folder');
      }
    }
    return records;
  }

  /** Deletes a dataset; FAILED_PRECONDITION while `inUse(id)` (a queued or running job reads it). */
  async delete(id: string, inUse: (id: string) => boolean): Promise<void> {
    await this.get(id);
    if (inUse(id)) {
      throw failedPrecondition('DATASET_IN_USE', `dataset ${JSON.stringify(id)} is read by a queued or running job`, {
        dataset_id: id,
      });
    }
    await this.dataRoot.removeEntry(this.dataRoot.entry('datasets', id));
    this.logger.info({ datasetId: id }, 'dataset deleted');
  }
}
