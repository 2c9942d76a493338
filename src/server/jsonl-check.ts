// Streaming check of a JSONL training file as it arrives: UTF-8, one JSON object per line, each a
// training row by src/engine/rows.ts (the validator training itself runs, so a row that passes here
// fails at training only for reasons that need the tokenizer or max_seq_len). Catches a bad row at
// upload time, with its line number and field, instead of when the job runs.

import { parseRowLine, RowError } from '../engine/rows.js';
import { invalidArgument } from './errors.js';

/** Longest line accepted, in bytes (a row is one example; 16 MiB is far beyond any context). */
export const MAX_LINE_BYTES = 16 * 1024 * 1024;

/** Checks rows as bytes arrive; throws INVALID_ARGUMENT (reason INVALID_DATASET) naming `field`. */
export class JsonlChecker {
  // A byte order mark is dropped here, as training's reader (dataset.ts) drops it.
  private readonly decoder = new TextDecoder('utf-8', { fatal: true });
  private partial = '';
  private partialBytes = 0;
  private line = 0;
  /** Non-empty rows seen so far. */
  rows = 0;

  constructor(
    private readonly field: string,
    /** Token ids of pre-tokenized rows must be below this. */
    private readonly vocabSize: number,
  ) {}

  /** Feeds the next bytes. */
  push(bytes: Uint8Array): void {
    let text: string;
    try {
      text = this.decoder.decode(bytes, { stream: true });
    } catch {
      throw this.fail(this.line + 1, 'is not valid UTF-8');
    }
    let start = 0;
    for (let newline = text.indexOf('\n'); newline !== -1; newline = text.indexOf('\n', start)) {
      this.completeLine(this.partial + text.slice(start, newline));
      this.partial = '';
      this.partialBytes = 0;
      start = newline + 1;
    }
    const rest = text.slice(start);
    this.partial += rest;
    this.partialBytes += Buffer.byteLength(rest);
    if (this.partialBytes > MAX_LINE_BYTES) throw this.fail(this.line + 1, `is longer than ${MAX_LINE_BYTES} bytes`);
  }

  /** Ends the input; returns the number of rows. Throws when there are none. */
  finish(): number {
    try {
      this.partial += this.decoder.decode();
    } catch {
      throw this.fail(this.line + 1, 'ends inside a UTF-8 character');
    }
    if (this.partial !== '') this.completeLine(this.partial);
    this.partial = '';
    if (this.rows === 0) throw invalidArgument(this.field, 'contains no rows', 'INVALID_DATASET');
    return this.rows;
  }

  private completeLine(raw: string): void {
    this.line += 1;
    const text = raw.endsWith('\r') ? raw.slice(0, -1) : raw;
    if (text.trim() === '') return;
    try {
      parseRowLine(text, this.vocabSize);
    } catch (error) {
      if (error instanceof RowError) throw this.fail(this.line, error.message, error.field);
      throw error;
    }
    this.rows += 1;
  }

  /**
   * INVALID_DATASET naming the request field; the description reads "line N: <what rows.ts said>",
   * and ErrorInfo metadata carries the line and the row's own field (row_field, e.g. "completion").
   */
  private fail(line: number, problem: string, rowField: string | null = null): Error {
    const error = invalidArgument(this.field, `line ${line}: ${problem}`, 'INVALID_DATASET');
    Object.assign(error.details.metadata!, { line: String(line), ...(rowField === null ? {} : { row_field: rowField }) });
    return error;
  }
}
