// JSONL training rows → ids and labels: every row kind with its loss mask, truncation, streaming from
// a file, and each kind of bad row reported with its line number.

import { readFileSync } from 'node:fs';
import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { IGNORE_INDEX, loadDataset, parseDatasetText, type DatasetOptions } from '../src/engine/dataset.js';
import { llama3TokenizerFiles } from '../src/engine/make-model.js';
import { LlamaTokenizer } from '../src/engine/tokenizer.js';

const BOS = 128000;
const END_OF_TEXT = 128001;
const EOT = 128009;
const options: DatasetOptions = { maxSeqLen: 512, vocabSize: 128256 };

let tokenizer: LlamaTokenizer;
let dir: string;
beforeAll(async () => {
  const files = llama3TokenizerFiles();
  tokenizer = new LlamaTokenizer(JSON.parse(readFileSync(files.tokenizerJson, 'utf8')), JSON.parse(readFileSync(files.tokenizerConfig, 'utf8')));
  dir = await mkdtemp(join(tmpdir(), 'tuneserve-dataset-'));
}, 60_000);
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const jsonl = (...rows: unknown[]) => rows.map((row) => (typeof row === 'string' ? row : JSON.stringify(row))).join('\n') + '\n';
const one = (row: unknown, opts: DatasetOptions = options) => parseDatasetText(jsonl(row), 'train.jsonl', tokenizer, opts).examples[0]!;
/** The ids whose label is kept, as text. */
const trainedText = (ids: Int32Array, labels: Int32Array) => tokenizer.decode([...labels].filter((label, t) => t > 0 && label !== IGNORE_INDEX && label === ids[t]));

describe('row kinds', () => {
  it('text: BOS + text + <|end_of_text|>, loss on every token, labels aligned with ids', () => {
    const { ids, labels } = one({ text: 'Hello world!' });
    expect([...ids]).toEqual([BOS, 9906, 1917, 0, END_OF_TEXT]);
    // labels[t] is the target AT position t (Hugging Face alignment): here a copy of ids.
    expect([...labels]).toEqual([...ids]);
  });

  it('text already ending with <|end_of_text|> gets no second one', () => {
    expect([...one({ text: 'Hi<|end_of_text|>' }).ids]).toEqual([BOS, 13347, END_OF_TEXT]);
  });

  it('prompt/completion: loss on the completion and its <|end_of_text|> only', () => {
    const { ids, labels } = one({ prompt: 'Q: What is the codename?', completion: ' A: Bluefin.' });
    const promptIds = tokenizer.encode('Q: What is the codename?', { addBos: true });
    const completionIds = tokenizer.encode(' A: Bluefin.', { addBos: false });
    expect([...ids]).toEqual([...promptIds, ...completionIds, END_OF_TEXT]);
    expect([...labels]).toEqual([...promptIds.map(() => IGNORE_INDEX), ...completionIds, END_OF_TEXT]);
    expect(trainedText(ids, labels)).toBe(' A: Bluefin.<|end_of_text|>');
  });

  it('messages: the Llama 3 chat format, loss on assistant turns and their <|eot_id|> only', () => {
    const messages = [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'Hi <|eot_id|>' },
      { role: 'assistant', content: 'Hello.' },
      { role: 'user', content: 'Bye' },
      { role: 'assistant', content: 'Goodbye.' },
    ];
    const { ids, labels } = one({ messages });
    expect([...ids]).toEqual(tokenizer.encodeChat(messages, { addGenerationPrompt: false }).ids);
    expect(ids[0]).toBe(BOS);
    expect(ids.at(-1)).toBe(EOT);
    // User text "<|eot_id|>" is text: the only 128009s are the five turn ends.
    expect([...ids].filter((id) => id === EOT)).toHaveLength(5);
    expect(trainedText(ids, labels)).toBe('Hello.<|eot_id|>Goodbye.<|eot_id|>');
  });

  it('input_ids/labels: used exactly as given; labels default to input_ids', () => {
    const given = one({ input_ids: [5, 6, 7, 8], labels: [-100, -100, 7, 8] });
    expect([...given.ids]).toEqual([5, 6, 7, 8]);
    expect([...given.labels]).toEqual([-100, -100, 7, 8]);
    const copied = one({ input_ids: [5, 6, 7] });
    expect([...copied.labels]).toEqual([5, 6, 7]);
  });

  it('extra fields are ignored, CRLF and blank lines are fine, stats add up', () => {
    const text = '{"text": "a", "id": 1}\r\n\r\n{"prompt": "b", "completion": "c"}\r\n   \n{"input_ids": [1, 2, 3]}\n';
    const { examples, stats } = parseDatasetText(text, 'mixed.jsonl', tokenizer, options);
    expect(examples.map((e) => e.line)).toEqual([1, 3, 5]);
    expect(stats).toMatchObject({ examples: 3, blankLines: 2, truncated: 0, byKind: { text: 1, promptCompletion: 1, messages: 0, tokenIds: 1 } });
    expect(stats.tokens).toBe(examples.reduce((sum, e) => sum + e.ids.length, 0));
    // Position 0 is never a target, so trainable counts from position 1.
    expect(stats.trainableTokens).toBe((3 - 1) + 2 + (3 - 1));
  });
});

describe('truncation', () => {
  it('keeps the first maxSeqLen tokens and counts the truncated examples', () => {
    const { examples, stats } = parseDatasetText(jsonl({ text: 'one two three four five six seven eight' }, { text: 'short' }), 't.jsonl', tokenizer, { ...options, maxSeqLen: 4 });
    expect(examples[0]!.ids).toHaveLength(4);
    expect(examples[0]!.ids[0]).toBe(BOS);
    expect(examples[1]!.ids).toHaveLength(3);
    expect(stats.truncated).toBe(1);
    expect(stats.maxLength).toBe(4);
  });

  it('refuses an example left with no trainable tokens after truncation, naming its line', () => {
    const long = { prompt: 'a long prompt that fills the whole window and more', completion: ' answer' };
    expect(() => parseDatasetText(jsonl({ text: 'fine' }, long), 'cut.jsonl', tokenizer, { ...options, maxSeqLen: 5 })).toThrow(
      /^cut\.jsonl:2: no trainable tokens after truncation to 5 tokens/,
    );
  });
});

describe('bad rows', () => {
  const badRows: Array<[string, string, RegExp]> = [
    ['not JSON', '{"text": "unterminated', /not valid JSON/],
    ['not an object', '["text"]', /a row must be a JSON object/],
    ['no known field', '{"content": "x"}', /expected "text", "prompt" \+ "completion", "messages" or "input_ids"/],
    ['two kinds', '{"text": "x", "prompt": "y", "completion": "z"}', /mixes "prompt"\/"completion" and "text"/],
    ['text not a string', '{"text": 5}', /"text" must be a string/],
    ['empty text', '{"text": ""}', /"text" is empty/],
    ['prompt without completion', '{"prompt": "x"}', /"prompt" without "completion"/],
    ['completion without prompt', '{"completion": "x"}', /"completion" without "prompt"/],
    ['completion not a string', '{"prompt": "x", "completion": ["y"]}', /"completion" must be a string/],
    ['empty completion', '{"prompt": "x", "completion": ""}', /"completion" is empty/],
    ['messages not a list', '{"messages": "hi"}', /"messages" must be a non-empty list/],
    ['empty messages', '{"messages": []}', /"messages" must be a non-empty list/],
    ['unknown role', '{"messages": [{"role": "bot", "content": "x"}]}', /messages\[0\]\.role must be one of/],
    ['content not a string', '{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": null}]}', /messages\[1\]\.content must be a string/],
    ['no assistant turn', '{"messages": [{"role": "user", "content": "x"}]}', /no trainable tokens/],
    ['labels without input_ids', '{"labels": [1, 2]}', /"labels" without "input_ids"/],
    ['empty input_ids', '{"input_ids": []}', /"input_ids" must be a non-empty list/],
    ['negative id', '{"input_ids": [1, -2, 3]}', /input_ids\[1\] is -2, not a token id/],
    ['fractional id', '{"input_ids": [1, 2.5]}', /input_ids\[1\] is 2\.5/],
    ['id beyond the vocabulary', '{"input_ids": [1, 128256]}', /token id 128256 at position 1 is not below vocab_size 128256/],
    ['length mismatch', '{"input_ids": [1, 2, 3], "labels": [1, 2]}', /"labels" has 2 entries but "input_ids" has 3/],
    ['bad label', '{"input_ids": [1, 2, 3], "labels": [-100, -1, 3]}', /labels\[1\] is -1, not a token id or -100/],
    ['label beyond the vocabulary', '{"input_ids": [1, 2], "labels": [-100, 999999]}', /label 999999 at position 1 is not below vocab_size/],
    ['all labels ignored', '{"input_ids": [1, 2, 3], "labels": [1, -100, -100]}', /no trainable tokens/],
  ];
  for (const [label, row, message] of badRows) {
    it(`${label} → INVALID_DATASET with file and line`, () => {
      // The bad row sits on line 3, after a good row and a blank line, so the line number is real.
      const text = `{"text": "good row"}\n\n${row}\n{"text": "never reached"}\n`;
      let error: unknown;
      try {
        parseDatasetText(text, 'data/train.jsonl', tokenizer, options);
      } catch (e) {
        error = e;
      }
      expect(error).toMatchObject({ code: 'INVALID_DATASET', details: { file: 'data/train.jsonl', line: 3 } });
      expect((error as Error).message).toMatch(/^data\/train\.jsonl:3: /);
      expect((error as Error).message).toMatch(message);
    });
  }

  it('refuses a file with no rows', () => {
    expect(() => parseDatasetText('\n\n', 'empty.jsonl', tokenizer, options)).toThrow(/empty\.jsonl: no rows/);
  });
});

describe('loadDataset', () => {
  it('streams a file, and reports bad rows with the path and line', async () => {
    const path = join(dir, 'train.jsonl');
    const rows = Array.from({ length: 300 }, (_, i) => ({ prompt: `Q${i}?`, completion: ` A${i}.` }));
    await writeFile(path, '\uFEFF' + jsonl(...rows));
    const { examples, stats } = await loadDataset(path, tokenizer, options);
    expect(examples).toHaveLength(300);
    expect(stats.byKind.promptCompletion).toBe(300);
    expect(examples[299]!.line).toBe(300);

    await writeFile(path, jsonl(...rows.slice(0, 7), { prompt: 1, completion: 'x' }));
    await expect(loadDataset(path, tokenizer, options)).rejects.toThrow(`${path}:8: "prompt" must be a string`);
    await expect(loadDataset(join(dir, 'missing.jsonl'), tokenizer, options)).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  it('accepts the shipped memorization and demo sets', async () => {
    const memorize = await loadDataset('data/memorize-20.jsonl', tokenizer, options);
    expect(memorize.stats.byKind.promptCompletion).toBe(20);
    // The acceptance test trains these on CPU: completions stay short (≤ 12 tokens + <|end_of_text|>).
    for (const { labels } of memorize.examples) expect(labels.filter((label) => label !== IGNORE_INDEX).length).toBeLessThanOrEqual(13);
    const demo = await loadDataset('data/demo-voice.jsonl', tokenizer, options);
    expect(demo.stats.byKind.messages).toBeGreaterThanOrEqual(40);
  });
});
