// Line ends, read the same by every reader of rows (found by test/reliability/rows-fuzz.test.ts): the
// file loader once split rows at a lone CR (node:readline) where the in-memory parser and the upload
// check did not, so a row that uploaded fine was refused at training. Now one splitter (dataset.ts)
// ends lines at LF / CRLF, drops a BOM before line 1, and the row validator (rows.ts) refuses a CR
// inside a row with its place, on every path alike.

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
  const options = { maxSeqLen: 64, vocabSize: 128256 };
  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-dataset-lines-'));
    const files = llama3TokenizerFiles();
    tokenizer = new LlamaTokenizer(JSON.parse(await readFile(files.tokenizerJson, 'utf8')) as object, JSON.parse(await readFile(files.tokenizerConfig, 'utf8')) as Record<string, unknown>);
  }, 120_000);
  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  /** The verdict of the file loader and of the in-memory parser on the same text. */
  async function both(text: string): Promise<[string, string]> {
    await writeFile(join(dir, 'rows.jsonl'), text);
    const describe = (r: { examples: { ids: Int32Array }[] }) => JSON.stringify(r.examples.map((e) => Array.from(e.ids)));
    const fromFile = await loadDataset(join(dir, 'rows.jsonl'), tokenizer, options).then(describe, (e: Error) => e.message.replace(join(dir, 'rows.jsonl'), 'rows'));
    let fromMemory: string;
    try {
      fromMemory = describe(parseDatasetText(text, 'rows', tokenizer, options));
    } catch (error) {
      fromMemory = (error as Error).message;
    }
    return [fromFile, fromMemory];
  }

  it('a lone CR between JSON tokens: refused on both paths, naming the line and the character', async () => {
    const [fromFile, fromMemory] = await both('{"prompt":"Q: 2+2?","completion":" 4"}\n{"prompt":\r"Q: 2+2?",\r"completion":" 4"}\n');
    expect(fromFile).toBe(fromMemory);
    expect(fromFile).toMatch(/^rows:2: has a carriage return \(CR\) at character 11 that does not end the line/);
  }, 60_000);

  it('CRLF line ends and a BOM before line 1: the same examples on both paths', async () => {
    const [fromFile, fromMemory] = await both('\ufeff{"text":"one"}\r\n{"text":"two"}\r\n');
    expect(fromFile).toBe(fromMemory);
    expect(JSON.parse(fromFile)).toHaveLength(2);
  }, 60_000);
});
