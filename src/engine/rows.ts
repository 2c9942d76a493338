// The one validator of JSONL training rows, used by the upload check (src/server/jsonl-check.ts) and
// by training (src/engine/dataset.ts): a row either parses here into a TrainingRow or is refused
// with a message naming the field, the same message on both paths. Everything that can be decided
// without the tokenizer is decided here; what needs it (truncation leaving no scored token, the chat
// template refusing a conversation) is dataset.ts's.
//
// Row formats (each row is one JSON object on one line; its keys pick the format, and a key that
// belongs to no format (other than the bookkeeping "id" / "metadata"), or keys of two formats, are
// refused):
//   text               {"text"}                              loss on every token
//   promptCompletion   {"prompt", "completion"}              loss on the completion
//   messages           {"messages": [{"role", "content"}]}   loss on the assistant turns
//   alpaca             {"instruction", "input"?, "output"}   user = instruction (+ "\n\n" + input),
//                                                            assistant = output; loss on the output
//   sharegpt           {"conversations": [{"from", "value"}]} from human/gpt/system → user/assistant/
//                                                            system; loss on the gpt turns
//   tokenIds           {"input_ids", "labels"?}              ids as given; labels default to input_ids
// Rules shared by all: the text a model learns to produce (text, completion, every assistant
// message, output, every gpt value) must not be empty — an empty answer would teach the model to
// stop at once, and is almost always a data bug; a conversation needs at least one assistant turn;
// token ids are integers below the model's vocab_size; labels are such ids or -100, and at least one
// label after position 0 is scored (position 0 is never a target).

import { CHAT_ROLES, type ChatMessage } from './chat-template.js';

export type RowKind = 'text' | 'promptCompletion' | 'messages' | 'alpaca' | 'sharegpt' | 'tokenIds';

export const ROW_KINDS: readonly RowKind[] = ['text', 'promptCompletion', 'messages', 'alpaca', 'sharegpt', 'tokenIds'];

/** A valid row; alpaca and sharegpt rows arrive already mapped to chat messages. */
export type TrainingRow =
  | { kind: 'text'; text: string }
  | { kind: 'promptCompletion'; prompt: string; completion: string }
  | { kind: 'messages' | 'alpaca' | 'sharegpt'; messages: ChatMessage[] }
  | { kind: 'tokenIds'; inputIds: number[]; labels: number[] };

/** The label that takes no loss (Hugging Face's ignore_index). */
export const IGNORE_INDEX = -100;

const SHAREGPT_ROLES: Readonly<Record<string, string>> = { human: 'user', gpt: 'assistant', system: 'system' };

/** The keys of each format: all of `required`, any of `optional`, nothing else. */
const FORMATS: ReadonlyArray<{ kind: RowKind; required: readonly string[]; optional: readonly string[] }> = [
  { kind: 'text', required: ['text'], optional: [] },
  { kind: 'promptCompletion', required: ['prompt', 'completion'], optional: [] },
  { kind: 'messages', required: ['messages'], optional: [] },
  { kind: 'alpaca', required: ['instruction', 'output'], optional: ['input'] },
  { kind: 'sharegpt', required: ['conversations'], optional: [] },
  { kind: 'tokenIds', required: ['input_ids'], optional: ['labels'] },
];

/**
 * Bookkeeping keys accepted (and ignored) beside any format: public ShareGPT and Alpaca exports carry
 * an "id" on every row. Any other unknown key is refused, since it may carry meaning (Alpaca's
 * "history", a misspelled "labels") that training would otherwise drop without a word.
 */
const METADATA_KEYS = ['id', 'metadata'];

/** The row formats in one line, for messages. */
export const ROW_FORMATS_SUMMARY =
  '{"text"}, {"prompt","completion"}, {"messages":[{"role","content"}]}, {"instruction","input"?,"output"}, ' +
  '{"conversations":[{"from","value"}]} or {"input_ids","labels"?}';

/** A row that is not a training row: `field` is the offending key path ("messages[1].content"), or null for the row as a whole. */
export class RowError extends Error {
  override readonly name = 'RowError';
  constructor(
    readonly field: string | null,
    message: string,
  ) {
    super(message);
  }
}

const quoted = (names: readonly string[]) => names.map((name) => JSON.stringify(name)).join(', ');

/** Parses one non-blank JSONL line into a row; throws RowError. */
export function parseRowLine(line: string, vocabSize: number): TrainingRow {
  // A CR is legal JSON whitespace, but line readers disagree on whether it ends a line (readline does):
  // found by test/reliability/rows-fuzz.test.ts, refused here, where every reader of rows asks.
  const cr = line.indexOf('\r');
  if (cr !== -1) throw new RowError(null, `has a carriage return (CR) at character ${cr + 1} that does not end the line; rows end with LF or CRLF and hold no other CR (write it as \\r inside strings)`);
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch (error) {
    throw new RowError(null, `is not valid JSON (${(error as Error).message})`);
  }
  return parseRow(value, vocabSize);
}

/** Checks a parsed row and returns it typed; throws RowError. */
export function parseRow(value: unknown, vocabSize: number): TrainingRow {
  if (value === null || typeof value !== 'object' || Array.isArray(value)) throw new RowError(null, `is not a JSON object; rows are ${ROW_FORMATS_SUMMARY}`);
  const row = value as Record<string, unknown>;
  const keys = Object.keys(row);
  const claimed = FORMATS.filter((format) => keys.some((key) => format.required.includes(key) || format.optional.includes(key)));
  if (claimed.length === 0) throw new RowError(null, `has none of the row fields (it has ${quoted(keys) || 'no keys'}); rows are ${ROW_FORMATS_SUMMARY}`);
  if (claimed.length > 1) {
    const fields = claimed.map((format) => quoted(keys.filter((key) => format.required.includes(key) || format.optional.includes(key))));
    throw new RowError(null, `mixes the fields of two row formats (${fields.join(' and ')}); a row is one format`);
  }
  const format = claimed[0]!;
  const allowed = [...format.required, ...format.optional, ...METADATA_KEYS];
  const unknown = keys.find((key) => !allowed.includes(key));
  if (unknown !== undefined) throw new RowError(unknown, `${JSON.stringify(unknown)} is not a field of a ${quoted(format.required)} row (its fields are ${quoted(allowed)})`);
  const missing = format.required.find((key) => !(key in row));
  if (missing !== undefined) throw new RowError(missing, `${JSON.stringify(missing)} is missing (a ${quoted(format.required)} row needs ${format.required.length > 1 ? 'all of them' : 'it'})`);

  switch (format.kind) {
    case 'text':
      return { kind: 'text', text: answerText(row, 'text') };
    case 'promptCompletion':
      return { kind: 'promptCompletion', prompt: stringField(row, 'prompt'), completion: answerText(row, 'completion') };
    case 'messages':
      return { kind: 'messages', messages: chatMessages(row.messages, 'messages', ['role', 'content'], (m, field) => {
        const role = m.role;
        if (typeof role !== 'string' || !(CHAT_ROLES as readonly string[]).includes(role)) {
          throw new RowError(`${field}.role`, `${field}.role must be one of ${CHAT_ROLES.join(', ')}, got ${JSON.stringify(role)}`);
        }
        return { role, content: role === 'assistant' ? answerText(m, 'content', field) : stringField(m, 'content', field) };
      }) };
    case 'alpaca': {
      const instruction = nonEmptyText(row, 'instruction');
      const input = 'input' in row ? stringField(row, 'input') : '';
      const output = answerText(row, 'output');
      const user = input.trim() === '' ? instruction : `${instruction}\n\n${input}`;
      return { kind: 'alpaca', messages: [{ role: 'user', content: user }, { role: 'assistant', content: output }] };
    }
    case 'sharegpt':
      return { kind: 'sharegpt', messages: chatMessages(row.conversations, 'conversations', ['from', 'value'], (m, field) => {
        const from = m.from;
        const role = typeof from === 'string' ? SHAREGPT_ROLES[from] : undefined;
        if (role === undefined) throw new RowError(`${field}.from`, `${field}.from must be one of ${Object.keys(SHAREGPT_ROLES).join(', ')}, got ${JSON.stringify(from)}`);
        return { role, content: role === 'assistant' ? answerText(m, 'value', field) : stringField(m, 'value', field) };
      }) };
    case 'tokenIds':
      return tokenIdRow(row, vocabSize);
  }
}

function stringField(object: Record<string, unknown>, key: string, parent?: string): string {
  const field = parent === undefined ? key : `${parent}.${key}`;
  const value = object[key];
  if (value === undefined) throw new RowError(field, `${JSON.stringify(field)} is missing`);
  if (typeof value !== 'string') throw new RowError(field, `${JSON.stringify(field)} must be a string, got ${JSON.stringify(value)}`);
  return value;
}

/** A string that must say something: not empty and not only whitespace. */
function nonEmptyText(object: Record<string, unknown>, key: string, parent?: string, why = ''): string {
  const value = stringField(object, key, parent);
  const field = parent === undefined ? key : `${parent}.${key}`;
  if (value.trim() === '') throw new RowError(field, `${JSON.stringify(field)} is ${value === '' ? 'empty' : 'only whitespace'}${why}`);
  return value;
}

/** A string the model learns to produce. */
function answerText(object: Record<string, unknown>, key: string, parent?: string): string {
  return nonEmptyText(object, key, parent, '; it is what the model learns to write (an empty answer would teach it to stop at once): fill it in or drop the row');
}

function chatMessages(
  value: unknown,
  key: string,
  keys: readonly [string, string],
  toMessage: (message: Record<string, unknown>, field: string) => ChatMessage,
): ChatMessage[] {
  if (!Array.isArray(value) || value.length === 0) throw new RowError(key, `${JSON.stringify(key)} must be a non-empty list of {${quoted(keys)}}`);
  const messages = value.map((item: unknown, index) => {
    const field = `${key}[${index}]`;
    if (item === null || typeof item !== 'object' || Array.isArray(item)) throw new RowError(field, `${field} must be an object {${quoted(keys)}}`);
    const unknown = Object.keys(item).find((name) => !keys.includes(name));
    if (unknown !== undefined) throw new RowError(`${field}.${unknown}`, `${field} has ${JSON.stringify(unknown)}, which is not one of ${quoted(keys)}`);
    return toMessage(item as Record<string, unknown>, field);
  });
  if (!messages.some((message) => message.role === 'assistant')) throw new RowError(key, `${JSON.stringify(key)} has no assistant turn to learn from`);
  return messages;
}

function tokenIdRow(row: Record<string, unknown>, vocabSize: number): TrainingRow {
  const ids = row.input_ids;
  if (!Array.isArray(ids) || ids.length === 0) throw new RowError('input_ids', '"input_ids" must be a non-empty list of token ids');
  ids.forEach((id: unknown, t) => {
    if (!Number.isSafeInteger(id) || (id as number) < 0 || (id as number) >= vocabSize) {
      throw new RowError(`input_ids[${t}]`, `input_ids[${t}] is ${JSON.stringify(id)}, not a token id below vocab_size ${vocabSize}`);
    }
  });
  const labels = row.labels ?? ids;
  if (!Array.isArray(labels)) throw new RowError('labels', '"labels" must be a list of token ids or -100');
  if (labels.length !== ids.length) throw new RowError('labels', `"labels" has ${labels.length} entries but "input_ids" has ${ids.length}`);
  labels.forEach((label: unknown, t) => {
    if (label !== IGNORE_INDEX && (!Number.isSafeInteger(label) || (label as number) < 0 || (label as number) >= vocabSize)) {
      throw new RowError(`labels[${t}]`, `labels[${t}] is ${JSON.stringify(label)}, neither -100 nor a token id below vocab_size ${vocabSize}`);
    }
  });
  if (!labels.some((label, t) => t > 0 && label !== IGNORE_INDEX)) {
    throw new RowError('labels', 'no label is scored: every label after position 0 is -100 (position 0 is never a target, so a row needs at least 2 tokens)');
  }
  return { kind: 'tokenIds', inputIds: ids as number[], labels: labels as number[] };
}
