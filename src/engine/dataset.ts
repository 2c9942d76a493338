// JSONL training data → token ids and labels, plus the dataset report computed before training.
// Every row is either used or reported as an error with its file, line and field; nothing is
// silently dropped (blank lines are not rows and are skipped). Rows are validated by rows.ts, the
// same code the upload check runs, so a row accepted at upload is refused here only for reasons
// that need the tokenizer or max_seq_len (the chat template refusing it, nothing left to score after
// truncation).
//
// What each row format becomes (text is always literal: tokenizer.encodeText / encodeUserContent,
// so "<|eot_id|>" in any text field is characters, never the control token):
//   text                 <|begin_of_text|> text <|end_of_text|>; loss on every token.
//   prompt/completion    <|begin_of_text|> prompt completion <|end_of_text|>; loss on the completion
//                        and the <|end_of_text|>. Prompt and completion are encoded separately, so
//                        the prompt's ids are exactly what Generate sees for the same text prompt.
//   messages, alpaca,    the model's chat template (tokenizer.encodeChat, the function Generate's
//   sharegpt             chat prompt uses); loss on the assistant turns, each with its end-of-turn
//                        token. Tokens after the last assistant turn are dropped: no loss is taken
//                        on them and, attention being causal, nothing before them sees them.
//   input_ids/labels     used exactly as given, nothing added; labels default to input_ids.
//
// Label alignment: labels[t] is the target token AT position t, the same indexing as Hugging Face
// `labels` (usually labels[t] === ids[t] or -100). The engine shifts internally: the logits at
// position t are scored against labels[t + 1], so labels[0] is never a target.

import { createReadStream } from 'node:fs';
import { EngineError } from './errors.js';
import { IGNORE_INDEX, parseRowLine, ROW_KINDS, RowError, type RowKind, type TrainingRow } from './rows.js';
import type { LlamaTokenizer } from './tokenizer.js';

export { IGNORE_INDEX, type RowKind } from './rows.js';

export interface TrainingExample {
  ids: Int32Array;
  /** Same length as ids; IGNORE_INDEX where no loss is taken (see the alignment note above). */
  labels: Int32Array;
  /** 1-based line in the source file, for messages about this example. */
  line: number;
}

/** What the rows hold, computed before training (the job streams it as its dataset_report event). */
export interface DatasetReport {
  /** Rows (non-blank lines), each one example. */
  rows: number;
  /** Blank lines skipped. */
  blankLines: number;
  rowsByKind: Record<RowKind, number>;
  /** The truncation length applied. */
  maxSeqLen: number;
  /** Tokens of all examples, after truncation. */
  tokens: number;
  /** Targets that take loss: labels other than IGNORE_INDEX, position 0 excluded. */
  scoredTokens: number;
  /** Examples longer than maxSeqLen, cut to their first maxSeqLen tokens. */
  truncatedRows: number;
  /** Tokens removed by truncation, over all rows. */
  truncatedTokens: number;
  /** The longest row before truncation. */
  longestRow: { tokens: number; line: number };
  /**
   * Loss-mask coverage: per row, scored targets / (tokens − 1), the positions that can be targets.
   * min is the lowest row's (minLine: its line), mean the mean over rows. Never 0: a row with no
   * scored target is an error.
   */
  scoredFraction: { min: number; minLine: number; mean: number };
}

export interface DatasetOptions {
  /** Longer examples keep their first maxSeqLen tokens. */
  maxSeqLen: number;
  /** The model's vocab_size: every id and label must be below it. */
  vocabSize: number;
}

export interface Dataset {
  examples: TrainingExample[];
  report: DatasetReport;
}

/** The part of LlamaTokenizer a dataset needs. */
export type DatasetTokenizer = Pick<LlamaTokenizer, 'encodeText' | 'encodeChat' | 'specialIds'>;

/** Builds examples line by line, so a file can be streamed. */
class DatasetBuilder {
  readonly examples: TrainingExample[] = [];
  private readonly report: DatasetReport;
  private fractionSum = 0;

  constructor(
    private readonly name: string,
    private readonly tokenizer: DatasetTokenizer,
    private readonly options: DatasetOptions,
  ) {
    if (!Number.isSafeInteger(options.maxSeqLen) || options.maxSeqLen < 2) {
      throw new EngineError('INVALID_ARGUMENT', `maxSeqLen must be an integer ≥ 2, got ${options.maxSeqLen}`, { field: 'maxSeqLen' });
    }
    if (!Number.isSafeInteger(options.vocabSize) || options.vocabSize <= 0) {
      throw new EngineError('INVALID_ARGUMENT', `vocabSize must be a positive integer, got ${options.vocabSize}`, { field: 'vocabSize' });
    }
    this.report = {
      rows: 0,
      blankLines: 0,
      rowsByKind: Object.fromEntries(ROW_KINDS.map((kind) => [kind, 0])) as Record<RowKind, number>,
      maxSeqLen: options.maxSeqLen,
      tokens: 0,
      scoredTokens: 0,
      truncatedRows: 0,
      truncatedTokens: 0,
      longestRow: { tokens: 0, line: 0 },
      scoredFraction: { min: 1, minLine: 0, mean: 0 },
    };
  }

  addLine(rawLine: string, line: number): void {
    const text = line === 1 && rawLine.startsWith('\uFEFF') ? rawLine.slice(1) : rawLine;
    if (text.trim().length === 0) {
      this.report.blankLines++;
      return;
    }
    try {
      this.addRow(parseRowLine(text, this.options.vocabSize), line);
    } catch (error) {
      if (error instanceof RowError) {
        throw new EngineError('INVALID_DATASET', `${this.name}:${line}: ${error.message}`, { file: this.name, line, ...(error.field === null ? {} : { field: error.field }) });
      }
      throw error;
    }
  }

  finish(): Dataset {
    if (this.report.rows === 0) throw new EngineError('INVALID_DATASET', `${this.name}: no rows`, { file: this.name });
    this.report.scoredFraction.mean = this.fractionSum / this.report.rows;
    return { examples: this.examples, report: this.report };
  }

  private addRow(row: TrainingRow, line: number): void {
    const { ids, labels } = this.tokenize(row);
    const { maxSeqLen, vocabSize } = this.options;
    const length = Math.min(ids.length, maxSeqLen);
    const example: TrainingExample = { ids: Int32Array.from(ids.slice(0, length)), labels: Int32Array.from(labels.slice(0, length)), line };
    for (let t = 0; t < length; t++) {
      if (example.ids[t]! >= vocabSize) throw new RowError(null, `token id ${example.ids[t]} at position ${t} is not below vocab_size ${vocabSize}`);
    }
    let scored = 0;
    for (let t = 1; t < length; t++) if (example.labels[t] !== IGNORE_INDEX) scored++;
    if (scored === 0) {
      const after = length < ids.length ? ` after truncation to max_seq_len ${maxSeqLen} (the row has ${ids.length} tokens; its first scored one is at position ${labels.findIndex((label, t) => t > 0 && label !== IGNORE_INDEX)})` : '';
      throw new RowError(null, `no token is scored${after}: it would train on nothing`);
    }

    const report = this.report;
    this.examples.push(example);
    report.rows++;
    report.rowsByKind[row.kind]++;
    report.tokens += length;
    report.scoredTokens += scored;
    if (length < ids.length) {
      report.truncatedRows++;
      report.truncatedTokens += ids.length - length;
    }
    if (ids.length > report.longestRow.tokens) report.longestRow = { tokens: ids.length, line };
    const fraction = scored / (length - 1);
    this.fractionSum += fraction;
    if (report.scoredFraction.minLine === 0 || fraction < report.scoredFraction.min) report.scoredFraction = { ...report.scoredFraction, min: fraction, minLine: line };
  }

  private tokenize(row: TrainingRow): { ids: number[]; labels: number[] } {
    const { endOfText } = this.tokenizer.specialIds;
    switch (row.kind) {
      case 'text': {
        const ids = [...this.tokenizer.encodeText(row.text, { addBos: true }), endOfText];
        return { ids, labels: [...ids] };
      }
      case 'promptCompletion': {
        const promptIds = this.tokenizer.encodeText(row.prompt, { addBos: true });
        const completionIds = [...this.tokenizer.encodeText(row.completion, { addBos: false }), endOfText];
        return { ids: [...promptIds, ...completionIds], labels: [...promptIds.map(() => IGNORE_INDEX), ...completionIds] };
      }
      case 'messages':
      case 'alpaca':
      case 'sharegpt': {
        let encoding;
        try {
          encoding = this.tokenizer.encodeChat(row.messages, { addGenerationPrompt: false });
        } catch (error) {
          if (error instanceof EngineError && error.code === 'INVALID_ARGUMENT') throw new RowError(row.kind === 'sharegpt' ? 'conversations' : 'messages', error.message);
          throw error;
        }
        const end = encoding.assistantMask.lastIndexOf(true) + 1;
        const ids = encoding.ids.slice(0, end);
        return { ids, labels: ids.map((id, t) => (encoding.assistantMask[t] ? id : IGNORE_INDEX)) };
      }
      case 'tokenIds':
        return { ids: row.inputIds, labels: row.labels };
    }
  }
}

/** Parses JSONL held in memory; `name` is used in messages ("<name>:<line>: ..."). */
export function parseDatasetText(text: string, name: string, tokenizer: DatasetTokenizer, options: DatasetOptions): Dataset {
  const builder = new DatasetBuilder(name, tokenizer, options);
  const lines = new JsonlLines();
  let lineNumber = 0;
  for (const line of [...lines.push(text), ...lines.end()]) builder.addLine(line, ++lineNumber);
  return builder.finish();
}

/**
 * Splits JSONL text given in pieces into rows: lines end at '\n' (a '\r' before it is dropped; a lone
 * '\r' stays in its line, where the row validator refuses it, as the upload check does), and a final
 * newline ends the last row without starting a blank one. The one splitter of files and in-memory text.
 */
class JsonlLines {
  private pending = '';

  /** The lines completed by `piece`. */
  push(piece: string): string[] {
    const parts = (this.pending + piece).split('\n');
    this.pending = parts.pop()!;
    return parts.map(stripCr);
  }

  /** The last line, when the text does not end with a newline. */
  end(): string[] {
    return this.pending === '' ? [] : [stripCr(this.pending)];
  }
}

const stripCr = (line: string): string => (line.endsWith('\r') ? line.slice(0, -1) : line);

/** Streams a JSONL file line by line (files larger than memory-friendly strings are fine). */
export async function loadDataset(path: string, tokenizer: DatasetTokenizer, options: DatasetOptions): Promise<Dataset> {
  const builder = new DatasetBuilder(path, tokenizer, options);
  const stream = createReadStream(path, { encoding: 'utf8' });
  const opened = new Promise<void>((resolve, reject) => {
    stream.once('open', () => resolve());
    stream.once('error', reject);
  });
  try {
    await opened;
  } catch (error) {
    const missing = (error as { code?: string }).code === 'ENOENT';
    throw new EngineError(missing ? 'NOT_FOUND' : 'IO_ERROR', `cannot read dataset ${path}: ${(error as Error).message}`, { file: path }, { cause: error });
  }
  const lines = new JsonlLines();
  let lineNumber = 0;
  try {
    for await (const chunk of stream) for (const line of lines.push(chunk as string)) builder.addLine(line, ++lineNumber);
  } catch (error) {
    if (error instanceof EngineError) throw error;
    throw new EngineError('IO_ERROR', `cannot read dataset ${path}: ${(error as Error).message}`, { file: path }, { cause: error });
  } finally {
    stream.destroy();
  }
  for (const line of lines.end()) builder.addLine(line, ++lineNumber);
  return builder.finish();
}
