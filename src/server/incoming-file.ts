// One file arriving in chunks from a client stream: written to a temp path, counted against its
// declared size as it comes (so an oversize upload stops at the first extra byte) and hashed, then
// checked against the declared SHA-256 and fsynced.

import { createHash, type Hash } from 'node:crypto';
import * as fs from 'node:fs/promises';
import { invalidArgument } from './errors.js';

/** The declared identity of a file and the request fields that declared it (for errors). */
export interface DeclaredFile {
  sizeBytes: number;
  sha256: string;
  /** Field path of the chunk data, e.g. "chunk" or "chunk.data". */
  dataField: string;
  /** Field path of the declared size, e.g. "header.size_bytes". */
  sizeField: string;
  /** Field path of the declared checksum, e.g. "header.sha256". */
  shaField: string;
}

/** Whether `value` is 64 lowercase hexadecimal characters. */
export function isSha256Hex(value: string): boolean {
  return /^[0-9a-f]{64}$/.test(value);
}

/** A file being received. */
export class IncomingFile {
  private readonly hash: Hash = createHash('sha256');
  private received = 0;

  private constructor(
    readonly path: string,
    private readonly declared: DeclaredFile,
    private handle: fs.FileHandle | null,
  ) {}

  /** Creates the file (it must not exist). */
  static async create(path: string, declared: DeclaredFile): Promise<IncomingFile> {
    return new IncomingFile(path, declared, await fs.open(path, 'wx', 0o644));
  }

  /** Bytes received so far. */
  get receivedBytes(): number {
    return this.received;
  }

  /** Appends a chunk; INVALID_ARGUMENT when it would pass the declared size. */
  async write(data: Uint8Array): Promise<void> {
    if (!this.handle) throw new Error('file already finished');
    if (this.received + data.length > this.declared.sizeBytes) {
      throw invalidArgument(
        this.declared.dataField,
        `carries more bytes than the declared ${this.declared.sizeField} (${this.declared.sizeBytes})`,
        'SIZE_MISMATCH',
      );
    }
    this.hash.update(data);
    this.received += data.length;
    await this.handle.write(data);
  }

  /** Checks size and checksum, fsyncs and closes; INVALID_ARGUMENT on a mismatch. */
  async finish(): Promise<void> {
    if (!this.handle) throw new Error('file already finished');
    if (this.received !== this.declared.sizeBytes) {
      throw invalidArgument(
        this.declared.sizeField,
        `declared ${this.declared.sizeBytes} bytes but the stream carried ${this.received}`,
        'SIZE_MISMATCH',
      );
    }
    const digest = this.hash.digest('hex');
    if (digest !== this.declared.sha256) {
      throw invalidArgument(
        this.declared.shaField,
        `does not match the received bytes (declared ${this.declared.sha256}, received ${digest})`,
        'CHECKSUM_MISMATCH',
      );
    }
    await this.handle.sync();
    await this.handle.close();
    this.handle = null;
  }

  /** Closes and deletes the partial file. */
  async discard(): Promise<void> {
    const handle = this.handle;
    this.handle = null;
    await handle?.close().catch(() => {});
    await fs.rm(this.path, { force: true });
  }
}
