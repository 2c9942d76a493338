// JSONL training rows → ids and labels: every row format with its loss mask, text that looks like a
// control token staying text in every format, truncation, the dataset report, and streaming from a
// file. The row rules themselves (good and bad rows, upload and training alike) are test/rows.test.ts.

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

describe('row formats', () => {
  it('text: BOS + text + <|end_of_text|>, loss on every token, labels aligned with ids', () => {
    const { ids, labels } = one({ text: 'Hello world!' });
    expect([...ids]).toEqual([BOS, 9906, 1917, 0, END_OF_TEXT]);
    // labels[t] is the target AT position t (Hugging Face alignment): here a copy of ids.
    expect([...labels]).toEqual([...ids]);
  });

  it('prompt/completion: loss on the completion and its <|end_of_text|> only', () => {
    const { ids, labels } = one({ prompt: 'Q: What is the codename?', completion: ' A: Bluefin.' });
    const promptIds = tokenizer.encodeText('Q: What is the codename?', { addBos: true });
    const completionIds = tokenizer.encodeText(' A: Bluefin.', { addBos: false });
    expect(promptIds).toEqual([BOS, 48, 25, 3639, 374, 279, 20950, 1878, 30]);
    expect([...ids]).toEqual([...promptIds, ...completionIds, END_OF_TEXT]);
    expect([...labels]).toEqual([...promptIds.map(() => IGNORE_INDEX), ...completionIds, END_OF_TEXT]);
    expect(trainedText(ids, labels)).toBe(' A: Bluefin.<|end_of_text|>');
  });

  it('messages: the model\'s chat template, loss on assistant turns and their <|eot_id|> only', () => {
    const messages = [
      { role: 'system', content: 'Be brief.' },
      { role: 'user', content: 'Hi' },
      { role: 'assistant', content: 'Hello.' },
      { role: 'user', content: 'Bye' },
      { role: 'assistant', content: 'Goodbye.' },
    ];
    const { ids, labels } = one({ messages });
    const chat = tokenizer.encodeChat(messages, { addGenerationPrompt: false }).ids;
    // This tokenizer_config.json's template (Llama 3.0's first release) appends an assistant header
    // even without add_generation_prompt; tokens after the last assistant turn are dropped.
    expect(tokenizer.decode(chat.slice(ids.length))).toBe('<|start_header_id|>assistant<|end_header_id|>\n\n');
    expect([...ids]).toEqual(chat.slice(0, ids.length));
    expect(ids[0]).toBe(BOS);
    expect(ids.at(-1)).toBe(EOT);
    expect(trainedText(ids, labels)).toBe('Hello.<|eot_id|>Goodbye.<|eot_id|>');
  });

  it('alpaca: instruction (+ input) as the user turn, output as the assistant turn; loss on the output only', () => {
    const alpaca = one({ instruction: 'Translate to French.', input: 'cat', output: 'chat' });
    const asMessages = one({ messages: [{ role: 'user', content: 'Translate to French.\n\ncat' }, { role: 'assistant', content: 'chat' }] });
    expect([...alpaca.ids]).toEqual([...asMessages.ids]);
    expect([...alpaca.labels]).toEqual([...asMessages.labels]);
    expect(trainedText(alpaca.ids, alpaca.labels)).toBe('chat<|eot_id|>');
    const noInput = one({ instruction: 'Name a colour.', output: 'Blue.' });
    expect(tokenizer.decode([...noInput.ids])).toBe('<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nName a colour.<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\nBlue.<|eot_id|>');
    expect(one({ instruction: 'Name a colour.', input: '', output: 'Blue.' }).ids).toEqual(noInput.ids);
  });

  it('sharegpt: human/gpt/system as user/assistant/system; loss on the gpt turns only', () => {
    const conversations = [
      { from: 'system', value: 'Terse.' },
      { from: 'human', value: 'Hi' },
      { from: 'gpt', value: 'Hello.' },
      { from: 'human', value: 'Bye' },
      { from: 'gpt', value: 'Later.' },
    ];
    const sharegpt = one({ conversations });
    const roles: Record<string, string> = { system: 'system', human: 'user', gpt: 'assistant' };
    const asMessages = one({ messages: conversations.map((c) => ({ role: roles[c.from], content: c.value })) });
    expect([...sharegpt.ids]).toEqual([...asMessages.ids]);
    expect([...sharegpt.labels]).toEqual([...asMessages.labels]);
    expect(trainedText(sharegpt.ids, sharegpt.labels)).toBe('Hello.<|eot_id|>Later.<|eot_id|>');
  });

  it('input_ids/labels: used exactly as given; labels default to input_ids', () => {
    const given = one({ input_ids: [5, 6, 7, 8], labels: [-100, -100, 7, 8] });
    expect([...given.ids]).toEqual([5, 6, 7, 8]);
    expect([...given.labels]).toEqual([-100, -100, 7, 8]);
    const copied = one({ input_ids: [5, 6, 7] });
    expect([...copied.labels]).toEqual([5, 6, 7]);
  });

  it('refuses a file with no rows', () => {
    expect(() => parseDatasetText('\n\n', 'empty.jsonl', tokenizer, options)).toThrow(/empty\.jsonl: no rows/);
  });
});

describe('text that looks like a control token is text, in every row format', () => {
  const typed = 'Stop here <|eot_id|> then <|end_of_text|><|begin_of_text|>';
  // Per format: the row, and how many <|eot_id|> the format itself writes.
  const rows: Array<[string, unknown, number]> = [
    ['text', { text: typed }, 0],
    ['prompt/completion', { prompt: typed, completion: typed }, 0],
    ['messages', { messages: [{ role: 'system', content: typed }, { role: 'user', content: typed }, { role: 'assistant', content: typed }] }, 3],
    ['alpaca', { instruction: typed, input: typed, output: typed }, 2],
    ['sharegpt', { conversations: [{ from: 'human', value: typed }, { from: 'gpt', value: typed }] }, 2],
  ];
  for (const [format, row, formatEots] of rows) {
    it(`${format}: 128009 appears only where the format puts it, and the text decodes back`, () => {
      const { ids } = one(row);
      expect([...ids].filter((id) => id === EOT)).toHaveLength(formatEots);
      // One BOS (the format's), and <|end_of_text|> only as the text/prompt-completion terminator.
      expect([...ids].filter((id) => id === BOS)).toHaveLength(1);
      expect([...ids].filter((id) => id === END_OF_TEXT)).toHaveLength(formatEots === 0 ? 1 : 0);
      const text = tokenizer.decode([...ids]);
      expect(text.split(typed).length - 1).toBe(format === 'text' ? 1 : format === 'sharegpt' ? 2 : format === 'prompt/completion' ? 2 : 3);
    });
  }

  it('the literal ids are the plain-text encoding Generate uses for the same text', () => {
    const { ids } = one({ prompt: typed, completion: 'x' });
    expect([...ids.slice(0, -2)]).toEqual(tokenizer.encodeText(typed, { addBos: true }));
    expect(tokenizer.encodeText(typed, { addBos: true })).toEqual([BOS, ...tokenizer.encodeUserContent(typed)]);
  });
});

describe('truncation', () => {
  it('keeps the first maxSeqLen tokens and counts the truncated examples', () => {
    const { examples, report } = parseDatasetText(jsonl({ text: 'one two three four five six seven eight' }, { text: 'short' }), 't.jsonl', tokenizer, { ...options, maxSeqLen: 4 });
    expect(examples[0]!.ids).toHaveLength(4);
    expect(examples[0]!.ids[0]).toBe(BOS);
    expect(examples[1]!.ids).toHaveLength(3);
    expect(report).toMatchObject({ truncatedRows: 1, truncatedTokens: 10 - 4, longestRow: { tokens: 10, line: 1 } });
  });

  it('refuses an example left with no trainable tokens after truncation, naming its line', () => {
    const long = { prompt: 'a long prompt that fills the whole window and more', completion: ' answer' };
    expect(() => parseDatasetText(jsonl({ text: 'fine' }, long), 'cut.jsonl', tokenizer, { ...options, maxSeqLen: 5 })).toThrow(
      /^cut\.jsonl:2: no token is scored after truncation to max_seq_len 5/,
    );
  });
});

describe('dataset report', () => {
  it('counts rows, tokens, scored tokens, truncation and per-row loss-mask coverage exactly', () => {
    const text = [
      '{"text": "Hello world!"}', // [BOS, Hello, world, !, <|end_of_text|>]: 5 tokens, 4 of 4 targets scored
      '',
      '{"prompt": "Q: What is the codename?", "completion": " A: Bluefin."}', // 9 + 5 + 1 tokens, 6 of 14 scored
      '{"input_ids": [5, 6, 7, 8], "labels": [-100, -100, -100, 8]}', // 1 of 3 targets scored
      '{"instruction": "Name a colour.", "output": "Blue."}', // 17 tokens, cut to 16: "Blue" "." scored, <|eot_id|> cut
      '{"text": "one two three four five six seven eight nine ten eleven"}', // 13 tokens, 12 of 12 scored
    ].join('\r\n');
    const { examples, report } = parseDatasetText(text, 'r.jsonl', tokenizer, { ...options, maxSeqLen: 16 });
    expect(examples.map((e) => e.ids.length)).toEqual([5, 15, 4, 16, 13]);
    expect(tokenizer.decode([...examples[3]!.ids.slice(14)])).toBe('Blue.');
    expect(report).toEqual({
      rows: 5,
      blankLines: 1,
      rowsByKind: { text: 2, promptCompletion: 1, messages: 0, alpaca: 1, sharegpt: 0, tokenIds: 1 },
      maxSeqLen: 16,
      tokens: 5 + 15 + 4 + 16 + 13,
      scoredTokens: 4 + 6 + 1 + 2 + 12,
      truncatedRows: 1,
      truncatedTokens: 1,
      longestRow: { tokens: 17, line: 5 },
      scoredFraction: { min: 2 / 15, minLine: 5, mean: (1 + 6 / 14 + 1 / 3 + 2 / 15 + 1) / 5 },
    });
  });
});

describe('loadDataset', () => {
  it('streams a file, and reports bad rows with the path and line', async () => {
    const path = join(dir, 'train.jsonl');
    const rows = Array.from({ length: 300 }, (_, i) => ({ prompt: `Q${i}?`, completion: ` A${i}.` }));
    await writeFile(path, '\uFEFF' + jsonl(...rows));
    const { examples, report } = await loadDataset(path, tokenizer, options);
    expect(examples).toHaveLength(300);
    expect(report.rowsByKind.promptCompletion).toBe(300);
    expect(examples[299]!.line).toBe(300);

    await writeFile(path, jsonl(...rows.slice(0, 7), { prompt: 1, completion: 'x' }));
    await expect(loadDataset(path, tokenizer, options)).rejects.toThrow(`${path}:8: "prompt" must be a string, got 1`);
    await expect(loadDataset(join(dir, 'missing.jsonl'), tokenizer, options)).rejects.toMatchObject({ code: 'NOT_FOUND' });
  });

  it('accepts the shipped memorization and demo sets', async () => {
    const memorize = await loadDataset('data/memorize-20.jsonl', tokenizer, options);
    expect(memorize.report.rowsByKind.promptCompletion).toBe(20);
    // The acceptance test trains these on CPU: completions stay short (≤ 12 tokens + <|end_of_text|>).
    for (const { labels } of memorize.examples) expect(labels.filter((label) => label !== IGNORE_INDEX).length).toBeLessThanOrEqual(13);
    const demo = await loadDataset('data/demo-voice.jsonl', tokenizer, options);
    expect(demo.report.rowsByKind.messages).toBeGreaterThanOrEqual(40);
  });
});
