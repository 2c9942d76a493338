// JSONL training data → token ids and labels. Every row is either used or reported as an error with
// its file and line; nothing is silently dropped (blank lines are not rows and are skipped).
//
// Row kinds and what is added (TRL conventions, made exact):
//   {"text": "..."}                      <|begin_of_text|> text <|end_of_text|>; loss on every token.
//   {"prompt": "...", "completion": "..."}  <|begin_of_text|> prompt completion <|end_of_text|>; loss on
//                                        the completion and the <|end_of_text|> only. Prompt and
//                                        completion are encoded separately, so the prompt's ids are
//                                        exactly what generation later sees for the same prompt.
//   {"messages": [{role, content}, ...]} the Llama 3 chat format (tokenizer.encodeChat); loss on the
//                                        assistant turns only, each including its closing <|eot_id|>.
//   {"input_ids": [...], "labels": [...]} used exactly as given, nothing added; labels optional
//                                        (default: a copy of input_ids), -100 = ignored.
// In "text", "prompt" and "completion" special-token strings are control tokens (the data is the
// trainer's own); chat message contents are plain text, as user input is at inference.
//
// Label alignment: labels[t] is the target token AT position t, the same indexing as Hugging Face
// `labels` (usually labels[t] === ids[t] or -100). The engine shifts internally: the logits at
// position t are scored against labels[t + 1], so labels[0] is never a target.

import { createReadStream } from 'node:fs';
import { createInterface } from 'node:readline';
import { EngineError } from './errors.js';
import type { ChatMessage, LlamaTokenizer } from './tokenizer.js';

export const IGNORE_INDEX = -100;

export interface TrainingExample {
  ids: Int32Array;
  /** Same length as ids; IGNORE_INDEX where no loss is taken (see the alignment note above). */
  labels: Int32Array;
  /** 1-based line in the source file, for messages about this example. */
  line: number;
}

export type RowKind = 'text' | 'promptCompletion' | 'messages' | 'tokenIds';

export interface DatasetStats {
  /** Examples produced (one per non-blank line). */
  examples: number;
  blankLines: number;
  /** Examples cut to maxSeqLen. */
  truncated: number;
  /** Sum of example lengths after truncation. */
  tokens: number;
  /** Labels that are scored (not IGNORE_INDEX, position 0 excluded). */
  trainableTokens: number;
  maxLength: number;
  byKind: Record<RowKind, number>;
}

export interface DatasetOptions {
  /** Longer examples keep their first maxSeqLen tokens. */
  maxSeqLen: number;
  /** The model's vocab_size: every id and label must be below it. */
  vocabSize: number;
}

export interface Dataset {
  examples: TrainingExample[];
  stats: DatasetStats;
}

/** The part of LlamaTokenizer a dataset needs. */
export type DatasetTokenizer = Pick<LlamaTokenizer, 'encode' | 'encodeChat' | 'specialIds'>;

class RowError extends Error {}

/** Builds examples line by line, so a file can be streamed. */
class DatasetBuilder {
  readonly examples: TrainingExample[] = [];
  readonly stats: DatasetStats = {
    examples: 0,
    blankLines: 0,
    truncated: 0,
    tokens: 0,
    trainableTokens: 0,
    maxLength: 0,
    byKind: { text: 0, promptCompletion: 0, messages: 0, tokenIds: 0 },
  };

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
  }

  addLine(rawLine: string, line: number): void {
    const text = line === 1 && rawLine.startsWith('\uFEFF') ? rawLine.slice(1) : rawLine;
    if (text.trim().length === 0) {
      this.stats.blankLines++;
      return;
    }
    try {
      this.addRow(text, line);
    } catch (error) {
      if (error instanceof RowError) {
        throw new EngineError('INVALID_DATASET', `${this.name}:${line}: ${error.message}`, { file: this.name, line });
      }
      throw error;
    }
  }

  finish(): Dataset {
    if (this.stats.examples === 0) throw new EngineError('INVALID_DATASET', `${this.name}: no rows`, { file: this.name });
    return { examples: this.examples, stats: this.stats };
  }

  private addRow(text: string, line: number): void {
    let row: unknown;
    try {
      row = JSON.parse(text);
    } catch (error) {
      throw new RowError(`not valid JSON (${(error as Error).message})`);
    }
    if (row === null || typeof row !== 'object' || Array.isArray(row)) throw new RowError('a row must be a JSON object');
    const fields = row as Record<string, unknown>;

    const kinds: RowKind[] = [];
    if ('input_ids' in fields || 'labels' in fields) kinds.push('tokenIds');
    if ('messages' in fields) kinds.push('messages');
    if ('prompt' in fields || 'completion' in fields) kinds.push('promptCompletion');
    if ('text' in fields) kinds.push('text');
    if (kinds.length === 0) throw new RowError('expected "text", "prompt" + "completion", "messages" or "input_ids"');
    if (kinds.length > 1) throw new RowError(`a row must be one kind, this one mixes ${kinds.map(kindFields).join(' and ')}`);
    const kind = kinds[0]!;

    const { ids, labels } = this.tokenize(kind, fields);
    let length = ids.length;
    if (length > this.options.maxSeqLen) {
      length = this.options.maxSeqLen;
      this.stats.truncated++;
    }
    const example: TrainingExample = { ids: Int32Array.from(ids.slice(0, length)), labels: Int32Array.from(labels.slice(0, length)), line };
    for (let t = 0; t < length; t++) {
      if (example.ids[t]! >= this.options.vocabSize) throw new RowError(`token id ${example.ids[t]} at position ${t} is not below vocab_size ${this.options.vocabSize}`);
      const label = example.labels[t]!;
      if (label !== IGNORE_INDEX && label >= this.options.vocabSize) throw new RowError(`label ${label} at position ${t} is not below vocab_size ${this.options.vocabSize}`);
    }
    let trainable = 0;
    for (let t = 1; t < length; t++) if (example.labels[t] !== IGNORE_INDEX) trainable++;
    if (trainable === 0) {
      const after = length < ids.length ? ` after truncation to ${this.options.maxSeqLen} tokens` : '';
      throw new RowError(`no trainable tokens${after} (every label is -100, or only position 0 has one, which is never a target)`);
    }

    this.examples.push(example);
    this.stats.examples++;
    this.stats.byKind[kind]++;
    this.stats.tokens += length;
    this.stats.trainableTokens += trainable;
    this.stats.maxLength = Math.max(this.stats.maxLength, length);
  }

  private tokenize(kind: RowKind, fields: Record<string, unknown>): { ids: number[]; labels: number[] } {
    const { endOfText } = this.tokenizer.specialIds;
    switch (kind) {
      case 'text': {
        const text = fields.text;
        if (typeof text !== 'string') throw new RowError('"text" must be a string');
        if (text.length === 0) throw new RowError('"text" is empty');
        const ids = this.tokenizer.encode(text, { addBos: true });
        if (ids[ids.length - 1] !== endOfText) ids.push(endOfText);
        return { ids, labels: [...ids] };
      }
      case 'promptCompletion': {
        const { prompt, completion } = fields;
        if (prompt === undefined) throw new RowError('"completion" without "prompt"');
        if (completion === undefined) throw new RowError('"prompt" without "completion"');
        if (typeof prompt !== 'string') throw new RowError('"prompt" must be a string');
        if (typeof completion !== 'string') throw new RowError('"completion" must be a string');
        if (completion.length === 0) throw new RowError('"completion" is empty');
        const promptIds = this.tokenizer.encode(prompt, { addBos: true });
        const completionIds = this.tokenizer.encode(completion, { addBos: false });
        if (completionIds[completionIds.length - 1] !== endOfText) completionIds.push(endOfText);
        return {
          ids: [...promptIds, ...completionIds],
          labels: [...promptIds.map(() => IGNORE_INDEX), ...completionIds],
        };
      }
      case 'messages': {
        const messages = fields.messages;
        if (!Array.isArray(messages) || messages.length === 0) throw new RowError('"messages" must be a non-empty list of {role, content}');
        let encoding;
        try {
          encoding = this.tokenizer.encodeChat(messages as ChatMessage[], { addGenerationPrompt: false });
        } catch (error) {
          if (error instanceof EngineError && error.code === 'INVALID_ARGUMENT') throw new RowError(error.message);
          throw error;
        }
        return { ids: encoding.ids, labels: encoding.ids.map((id, t) => (encoding.assistantMask[t] ? id : IGNORE_INDEX)) };
      }
      case 'tokenIds': {
        const ids = fields.input_ids;
        if (ids === undefined) throw new RowError('"labels" without "input_ids"');
        if (!Array.isArray(ids) || ids.length === 0) throw new RowError('"input_ids" must be a non-empty list of token ids');
        ids.forEach((id, t) => {
          if (!Number.isSafeInteger(id) || id < 0) throw new RowError(`input_ids[${t}] is ${JSON.stringify(id)}, not a token id`);
        });
        const labels = fields.labels ?? ids;
        if (!Array.isArray(labels)) throw new RowError('"labels" must be a list');
        if (labels.length !== ids.length) throw new RowError(`"labels" has ${labels.length} entries but "input_ids" has ${ids.length}`);
        labels.forEach((label, t) => {
          if (!Number.isSafeInteger(label) || (label < 0 && label !== IGNORE_INDEX)) throw new RowError(`labels[${t}] is ${JSON.stringify(label)}, not a token id or -100`);
        });
        return { ids: ids as number[], labels: labels as number[] };
      }
    }
  }
}

function kindFields(kind: RowKind): string {
  return { text: '"text"', promptCompletion: '"prompt"/"completion"', messages: '"messages"', tokenIds: '"input_ids"/"labels"' }[kind];
}

/** Parses JSONL held in memory; `name` is used in messages ("<name>:<line>: ..."). */
export function parseDatasetText(text: string, name: string, tokenizer: DatasetTokenizer, options: DatasetOptions): Dataset {
  const builder = new DatasetBuilder(name, tokenizer, options);
  const lines = text.split('\n');
  // A final newline ends the last row; it does not start a blank one.
  if (lines[lines.length - 1] === '') lines.pop();
  lines.forEach((line, index) => builder.addLine(line.endsWith('\r') ? line.slice(0, -1) : line, index + 1));
  return builder.finish();
}

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
  const lines = createInterface({ input: stream, crlfDelay: Infinity });
  let lineNumber = 0;
  try {
    for await (const line of lines) builder.addLine(line, ++lineNumber);
  } catch (error) {
    if (error instanceof EngineError) throw error;
    throw new EngineError('IO_ERROR', `cannot read dataset ${path}: ${(error as Error).message}`, { file: path }, { cause: error });
  } finally {
    lines.close();
    stream.destroy();
  }
  return builder.finish();
}
