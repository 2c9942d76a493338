// Streaming check of a JSONL training file as it arrives: UTF-8, one JSON object per line, each in
// one of the row shapes the engine trains on. Catches a bad row at upload time, with its line
// number, instead of when the job runs.

import { invalidArgument } from './errors.js';

/** Longest line accepted, in bytes (a row is one example; 16 MiB is far beyond any context). */
export const MAX_LINE_BYTES = 16 * 1024 * 1024;

const ROW_SHAPES = '{"text"}, {"prompt","completion"}, {"messages":[{"role","content"}]} or {"input_ids"[,"labels"]}';

/** Checks rows as bytes arrive; throws INVALID_ARGUMENT (reason INVALID_DATASET) naming `field`. */
export class JsonlChecker {
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
    let value: unknown;
    try {
      value = JSON.parse(text);
    } catch (error) {
      throw this.fail(this.line, `is not JSON (${(error as Error).message})`);
    }
    const problem = rowProblem(value, this.vocabSize);
    if (problem !== null) throw this.fail(this.line, problem);
    this.rows += 1;
  }

  private fail(line: number, problem: string): Error {
    return invalidArgument(this.field, `line ${line} ${problem}`, 'INVALID_DATASET');
  }
}

const isString = (value: unknown): value is string => typeof value === 'string';
const isTokenId = (value: unknown, vocabSize: number): boolean =>
  Number.isInteger(value) && (value as number) >= 0 && (value as number) < vocabSize;

/** Why a parsed row is not a training row, or null when it is one. */
export function rowProblem(value: unknown, vocabSize: number): string | null {
  if (typeof value !== 'object' || value === null || Array.isArray(value)) return `is not a JSON object; rows are ${ROW_SHAPES}`;
  const row = value as Record<string, unknown>;
  if ('input_ids' in row) {
    const ids = row.input_ids;
    if (!Array.isArray(ids) || ids.length === 0) return 'has "input_ids" that is not a non-empty array';
    const bad = ids.findIndex((id) => !isTokenId(id, vocabSize));
    if (bad !== -1) return `has input_ids[${bad}] that is not a token id below ${vocabSize}`;
    if ('labels' in row) {
      const labels = row.labels;
      if (!Array.isArray(labels) || labels.length !== ids.length) return 'has "labels" that is not an array as long as "input_ids"';
      const badLabel = labels.findIndex((label) => label !== -100 && !isTokenId(label, vocabSize));
      if (badLabel !== -1) return `has labels[${badLabel}] that is neither -100 nor a token id below ${vocabSize}`;
    }
    return null;
  }
  if ('messages' in row) {
    const messages = row.messages;
    if (!Array.isArray(messages) || messages.length === 0) return 'has "messages" that is not a non-empty array';
    const bad = messages.findIndex(
      (m) => typeof m !== 'object' || m === null || !isString((m as Record<string, unknown>).role) || !isString((m as Record<string, unknown>).content),
    );
    if (bad !== -1) return `has messages[${bad}] without string "role" and "content"`;
    if (!messages.some((m) => (m as { role: string }).role === 'assistant')) return 'has no assistant message to learn from';
    return null;
  }
  if ('prompt' in row || 'completion' in row) {
    if (!isString(row.prompt) || !isString(row.completion)) return 'needs both "prompt" and "completion" as strings';
    return null;
  }
  if ('text' in row) {
    if (!isString(row.text) || row.text === '') return 'has "text" that is not a non-empty string';
    return null;
  }
  return `has none of the row fields; rows are ${ROW_SHAPES}`;
}
