// One row validator (src/engine/rows.ts) for upload and training: the same table of good and bad rows
// goes through the upload check (src/server/jsonl-check.ts) and through training's dataset loader
// (src/engine/dataset.ts, with the real Llama 3 tokenizer), and both must agree row by row — both
// accept, or both refuse with the very same message naming the line and the field.

import { readFileSync } from 'node:fs';
import { beforeAll, describe, expect, it } from 'vitest';
import { parseDatasetText } from '../src/engine/dataset.js';
import { llama3TokenizerFiles } from '../src/engine/make-model.js';
import { LlamaTokenizer } from '../src/engine/tokenizer.js';
import { ServiceError } from '../src/server/errors.js';
import { JsonlChecker } from '../src/server/jsonl-check.js';

const VOCAB = 128256;

let tokenizer: LlamaTokenizer;
beforeAll(() => {
  const files = llama3TokenizerFiles();
  tokenizer = new LlamaTokenizer(JSON.parse(readFileSync(files.tokenizerJson, 'utf8')), JSON.parse(readFileSync(files.tokenizerConfig, 'utf8')));
}, 60_000);

const goodRows: Array<[string, string]> = [
  ['text', '{"text": "Hello world!"}'],
  ['text with a control-token string', '{"text": "literal <|eot_id|> here"}'],
  ['prompt/completion', '{"prompt": "Q: 2+2?", "completion": " 4"}'],
  ['prompt/completion with an empty prompt', '{"prompt": "", "completion": "free text"}'],
  ['messages', '{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]}'],
  ['messages ending with a user turn', '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "ok"}]}'],
  ['alpaca with input', '{"instruction": "Translate to French.", "input": "cat", "output": "chat"}'],
  ['alpaca without input', '{"instruction": "Name a colour.", "output": "Blue."}'],
  ['alpaca with an empty input', '{"instruction": "Name a colour.", "input": "", "output": "Blue."}'],
  ['sharegpt', '{"conversations": [{"from": "system", "value": "Terse."}, {"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}'],
  ['sharegpt with its export id', '{"id": "identity_7", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]}'],
  ['input_ids', '{"input_ids": [128000, 9906, 1917]}'],
  ['input_ids with labels', '{"input_ids": [128000, 9906, 1917], "labels": [-100, -100, 1917]}'],
];

/** [name, row, the exact message rows.ts gives, the field it names (null: the row as a whole)]. */
const badRows: Array<[string, string, string, string | null]> = [
  ['not JSON', '{"text": "unterminated', 'is not valid JSON', null],
  ['not an object', '["text"]', 'is not a JSON object; rows are', null],
  ['no known field', '{"content": "x"}', 'has none of the row fields (it has "content"); rows are', null],
  ['no field at all', '{}', 'has none of the row fields (it has no keys)', null],
  ['text and prompt/completion', '{"text": "x", "prompt": "y", "completion": "z"}', 'mixes the fields of two row formats ("text" and "prompt", "completion"); a row is one format', null],
  ['input_ids and text (issue 9)', '{"input_ids": [1, 2], "text": "hi"}', 'mixes the fields of two row formats ("text" and "input_ids")', null],
  ['an unknown key', '{"text": "x", "source": 7}', '"source" is not a field of a "text" row (its fields are "text", "id", "metadata")', 'source'],
  ['text not a string', '{"text": 5}', '"text" must be a string, got 5', 'text'],
  ['empty text', '{"text": ""}', '"text" is empty; it is what the model learns to write', 'text'],
  ['whitespace text', '{"text": " \\n "}', '"text" is only whitespace', 'text'],
  ['prompt without completion', '{"prompt": "x"}', '"completion" is missing (a "prompt", "completion" row needs all of them)', 'completion'],
  ['completion without prompt', '{"completion": "x"}', '"prompt" is missing', 'prompt'],
  ['empty completion (issue 9)', '{"prompt": "q", "completion": ""}', '"completion" is empty; it is what the model learns to write (an empty answer would teach it to stop at once): fill it in or drop the row', 'completion'],
  ['completion not a string', '{"prompt": "x", "completion": ["y"]}', '"completion" must be a string, got ["y"]', 'completion'],
  ['messages not a list', '{"messages": "hi"}', '"messages" must be a non-empty list of {"role", "content"}', 'messages'],
  ['empty messages', '{"messages": []}', '"messages" must be a non-empty list', 'messages'],
  ['a message that is not an object', '{"messages": ["hi"]}', 'messages[0] must be an object {"role", "content"}', 'messages[0]'],
  ['a message with an extra key', '{"messages": [{"role": "user", "content": "x", "name": "bob"}]}', 'messages[0] has "name", which is not one of "role", "content"', 'messages[0].name'],
  ['unknown role', '{"messages": [{"role": "bot", "content": "x"}]}', 'messages[0].role must be one of system, user, assistant, ipython, tool, got "bot"', 'messages[0].role'],
  ['content not a string', '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null}]}', '"messages[1].content" must be a string, got null', 'messages[1].content'],
  ['no assistant turn', '{"messages": [{"role": "user", "content": "x"}]}', '"messages" has no assistant turn to learn from', 'messages'],
  ['empty assistant turn', '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "  "}]}', '"messages[1].content" is only whitespace; it is what the model learns to write', 'messages[1].content'],
  ['alpaca without output', '{"instruction": "x"}', '"output" is missing', 'output'],
  ['alpaca with an empty output', '{"instruction": "x", "output": ""}', '"output" is empty', 'output'],
  ['alpaca with an empty instruction', '{"instruction": "", "output": "y"}', '"instruction" is empty', 'instruction'],
  ['alpaca input not a string', '{"instruction": "x", "input": 3, "output": "y"}', '"input" must be a string, got 3', 'input'],
  ['alpaca with a foreign key', '{"instruction": "x", "output": "y", "history": []}', '"history" is not a field of a "instruction", "output" row (its fields are "instruction", "output", "input", "id", "metadata")', 'history'],
  ['sharegpt unknown speaker', '{"conversations": [{"from": "bot", "value": "x"}]}', 'conversations[0].from must be one of human, gpt, system, got "bot"', 'conversations[0].from'],
  ['sharegpt role/content keys', '{"conversations": [{"role": "user", "content": "x"}]}', 'conversations[0] has "role", which is not one of "from", "value"', 'conversations[0].role'],
  ['sharegpt without a gpt turn', '{"conversations": [{"from": "human", "value": "x"}]}', '"conversations" has no assistant turn to learn from', 'conversations'],
  ['sharegpt empty gpt value', '{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt", "value": ""}]}', '"conversations[1].value" is empty', 'conversations[1].value'],
  ['labels without input_ids', '{"labels": [1, 2]}', '"input_ids" is missing', 'input_ids'],
  ['empty input_ids', '{"input_ids": []}', '"input_ids" must be a non-empty list of token ids', 'input_ids'],
  ['negative id', '{"input_ids": [1, -2, 3]}', 'input_ids[1] is -2, not a token id below vocab_size 128256', 'input_ids[1]'],
  ['fractional id', '{"input_ids": [1, 2.5]}', 'input_ids[1] is 2.5, not a token id', 'input_ids[1]'],
  ['id beyond the vocabulary', '{"input_ids": [1, 128256]}', 'input_ids[1] is 128256, not a token id below vocab_size 128256', 'input_ids[1]'],
  ['labels of another length', '{"input_ids": [1, 2, 3], "labels": [1, 2]}', '"labels" has 2 entries but "input_ids" has 3', 'labels'],
  ['a bad label', '{"input_ids": [1, 2, 3], "labels": [-100, -1, 3]}', 'labels[1] is -1, neither -100 nor a token id below vocab_size 128256', 'labels[1]'],
  ['a label beyond the vocabulary', '{"input_ids": [1, 2], "labels": [-100, 999999]}', 'labels[1] is 999999, neither -100 nor a token id', 'labels[1]'],
  ['every label ignored', '{"input_ids": [1, 2, 3], "labels": [1, -100, -100]}', 'no label is scored: every label after position 0 is -100', 'labels'],
  ['a single token', '{"input_ids": [5]}', 'no label is scored', 'labels'],
];

/** The upload path: rows fed in 5-byte chunks, as a client stream would split them. */
function upload(text: string): { rows: number } | { message: string; metadata: Record<string, string> } {
  const checker = new JsonlChecker('chunk', VOCAB);
  try {
    const bytes = Buffer.from(text);
    for (let i = 0; i < bytes.length; i += 5) checker.push(bytes.subarray(i, i + 5));
    return { rows: checker.finish() };
  } catch (error) {
    expect(error).toBeInstanceOf(ServiceError);
    const e = error as ServiceError;
    expect(e.reason).toBe('INVALID_DATASET');
    return { message: e.details.fieldViolations![0]!.description, metadata: e.details.metadata! };
  }
}

/** The training path, with the real tokenizer. */
function train(text: string): { rows: number } | { message: string; details: Record<string, unknown> } {
  try {
    return { rows: parseDatasetText(text, 'data.jsonl', tokenizer, { maxSeqLen: 512, vocabSize: VOCAB }).report.rows };
  } catch (error) {
    const e = error as Error & { code: string; details: Record<string, unknown> };
    expect(e.code).toBe('INVALID_DATASET');
    return { message: e.message, details: e.details };
  }
}

describe('good rows pass upload and training alike', () => {
  for (const [name, row] of goodRows) {
    it(name, () => {
      const text = `{"text": "first"}\n${row}\n`;
      expect(upload(text)).toEqual({ rows: 2 });
      expect(train(text)).toEqual({ rows: 2 });
    });
  }
});

describe('bad rows fail upload and training alike, with the same message, line and field', () => {
  for (const [name, row, message, field] of badRows) {
    it(name, () => {
      // The bad row sits on line 3, after a good row and a blank line, so the line number is real.
      const text = `{"text": "good row"}\n\n${row}\n{"text": "never reached"}\n`;
      const uploaded = upload(text) as { message: string; metadata: Record<string, string> };
      const trained = train(text) as { message: string; details: Record<string, unknown> };
      expect(uploaded.message).toMatch(/^line 3: /);
      expect(trained.message).toMatch(/^data\.jsonl:3: /);
      const problem = uploaded.message.slice('line 3: '.length);
      expect(trained.message.slice('data.jsonl:3: '.length)).toBe(problem);
      expect(problem.startsWith(message)).toBe(true);
      expect(uploaded.metadata).toMatchObject({ field: 'chunk', line: '3' });
      expect(uploaded.metadata.row_field ?? null).toBe(field);
      expect(trained.details).toMatchObject({ file: 'data.jsonl', line: 3 });
      expect(trained.details.field ?? null).toBe(field);
    });
  }
});

describe('what only training can tell', () => {
  it('a row left with nothing to score after truncation passes upload but fails training, naming its line', () => {
    const row = JSON.stringify({ prompt: 'a long prompt that fills the whole window and then some more', completion: ' answer' });
    const text = `{"text": "fine"}\n${row}\n`;
    expect(upload(text)).toEqual({ rows: 2 });
    const result = parseDatasetText.bind(null, text, 'cut.jsonl', tokenizer, { maxSeqLen: 5, vocabSize: VOCAB });
    expect(result).toThrow(/^cut\.jsonl:2: no token is scored after truncation to max_seq_len 5 \(the row has 15 tokens; its first scored one is at position 13\): it would train on nothing$/);
  });
});
