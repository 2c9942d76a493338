// Found by test/reliability/rows-fuzz.test.ts, left to the owner of src/engine/dataset.ts (issue 11's
// report): loadDataset reads lines with node:readline, which also ends a line at a lone CR, while
// parseDatasetText and the upload check end lines at LF (CRLF) only. A CR between JSON tokens is legal
// JSON whitespace, so such a row loads from memory and is refused from a file (line 1 "is not valid
// JSON"). The upload check now refuses these rows, so uploaded datasets cannot meet it; a dataset file
// given to `tuneserve train` still can. This test fails until the loaders agree.

import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { loadDataset, parseDatasetText } from '../src/engine/dataset.js';
import { llama3TokenizerFiles } from '../src/engine/make-model.js';
import { LlamaTokenizer } from '../src/engine/tokenizer.js';

describe('dataset loaders agree on line ends', () => {
  let dir: string;
  let tokenizer: LlamaTokenizer;
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-dataset-lines-'));
    const files = llama3TokenizerFiles();
    tokenizer = new LlamaTokenizer(JSON.parse(await readFile(files.tokenizerJson, 'utf8')) as object, JSON.parse(await readFile(files.tokenizerConfig, 'utf8')) as Record<string, unknown>);
  }, 120_000);
  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('a lone CR between JSON tokens: the file loader reads what the in-memory parser reads', async () => {
    const text = '{"prompt":\r"Q: 2+2?",\r"completion":" 4"}\n';
    const options = { maxSeqLen: 64, vocabSize: 128256 };
    const fromMemory = parseDatasetText(text, 'rows.jsonl', tokenizer, options);
    await writeFile(join(dir, 'rows.jsonl'), text);
    const fromFile = await loadDataset(join(dir, 'rows.jsonl'), tokenizer, options);
    expect(fromFile.examples.map((e) => Array.from(e.ids))).toEqual(fromMemory.examples.map((e) => Array.from(e.ids)));
  }, 60_000);
});
