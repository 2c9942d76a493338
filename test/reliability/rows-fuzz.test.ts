// Fuzzing of JSONL training data, in the three places it is read: the row validator
// (src/engine/rows.ts), the streaming upload check (src/server/jsonl-check.ts, fed in chunks cut
// anywhere, inside characters too) and the training loader (src/engine/dataset.ts, with the real
// Llama 3 tokenizer). Rows of every format, valid or mutated field by field, with every JSON
// whitespace, unicode escapes (lone surrogates included), control-token text, CRLF, blank lines and
// bytes that are not UTF-8, a byte order mark. Oracles: the upload check refuses a file exactly when a
// line fails the validator (or the bytes are not UTF-8), naming that line; a file it accepts gets the
// same verdict and the same examples from the file loader as from the in-memory parser.

import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { llama3TokenizerFiles } from '../../src/engine/make-model.js';
import { loadDataset, parseDatasetText, type Dataset } from '../../src/engine/dataset.js';
import { parseRowLine, RowError } from '../../src/engine/rows.js';
import { LlamaTokenizer } from '../../src/engine/tokenizer.js';
import { JsonlChecker } from '../../src/server/jsonl-check.js';
import { ServiceError } from '../../src/server/errors.js';
import { codedError, fuzz } from '../helpers/fuzz.js';
import { mutateJson } from '../helpers/json-mutator.js';
import type { Random } from '../helpers/random.js';
import { readFile } from 'node:fs/promises';

const VOCAB = 128256;

function text(random: Random): string {
  return random.pick<() => string>([
    () => random.pick(['Hello world!', 'What is 2+2?', ' 4.', 'naïve café 日本語 😀', 'x', '', ' ', '\n', 'line\r\nbreak', '\t']),
    () => random.pick(['<|eot_id|>', '<|begin_of_text|>', '<|start_header_id|>assistant<|end_header_id|>\n\n']),
    () => String.fromCharCode(0xd800 + random.below(0x800)),
    () => 'long '.repeat(random.pick([10, 300])),
  ])();
}

/** A row of one of the six formats, valid by construction (mutations then break it or not). */
function row(random: Random): { value: Record<string, unknown>; fields: string[] } {
  const message = (roles: string[]) => ({ role: random.pick(roles), content: text(random) });
  switch (random.below(6)) {
    case 0: return { value: { text: text(random) || 'x' }, fields: ['text', 'id', 'metadata'] };
    case 1: return { value: { prompt: text(random), completion: text(random) || 'y' }, fields: ['prompt', 'completion', 'text'] };
    case 2: return { value: { messages: [message(['system', 'user']), { role: 'assistant', content: text(random) || 'z' }, ...(random.chance(0.3) ? [message(['user', 'tool', 'ipython'])] : [])] }, fields: ['messages', 'conversations'] };
    case 3: return { value: { instruction: text(random) || 'do', ...(random.chance(0.5) ? { input: text(random) } : {}), output: text(random) || 'done' }, fields: ['instruction', 'input', 'output', 'history'] };
    case 4: return { value: { conversations: [{ from: random.pick(['human', 'system']), value: text(random) }, { from: 'gpt', value: text(random) || 'ok' }], id: random.below(1000) }, fields: ['conversations', 'id', 'messages'] };
    default: {
      const ids = Array.from({ length: random.int(1, 12) }, () => random.below(VOCAB));
      return { value: { input_ids: ids, ...(random.chance(0.5) ? { labels: ids.map((id, t) => (t === 0 || random.chance(0.3) ? -100 : id)) } : {}) }, fields: ['input_ids', 'labels'] };
    }
  }
}

/** One JSONL line: a row (mutated half the time), written with random JSON whitespace or escapes. */
function line(random: Random): Buffer {
  const { value, fields } = row(random);
  if (random.chance(0.5)) return mutateJson(random, value, fields).bytes;
  let json = JSON.stringify(value);
  if (random.chance(0.2)) json = json.replace(/[,:]/g, (c) => `${random.pick([' ', '\t', '\r', ''])}${c}${random.pick([' ', '\t', '\r', ''])}`);
  if (random.chance(0.1)) json = json.replace(/[a-z]/, (c) => `\\u00${c.charCodeAt(0).toString(16)}`);
  return Buffer.from(json);
}

/** A file: a few lines with LF or CRLF, blank lines, sometimes a BOM or bytes that are not UTF-8. */
function file(random: Random): Buffer {
  const parts: Buffer[] = [];
  if (random.chance(0.03)) parts.push(Buffer.from([0xef, 0xbb, 0xbf]));
  for (let i = 0, n = random.int(0, 6); i < n; i++) {
    parts.push(random.chance(0.1) ? Buffer.from(random.pick(['', '   ', '\t'])) : line(random));
    parts.push(Buffer.from(random.chance(0.2) ? '\r\n' : '\n'));
  }
  if (random.chance(0.3) && parts.length > 0) parts.pop(); // no final newline
  if (random.chance(0.05)) parts.splice(random.below(parts.length + 1), 0, Buffer.from(random.pick([[0xff], [0xc3], [0xe2, 0x82], [0xed, 0xa0, 0x80]])));
  return Buffer.concat(parts);
}

const rowError = (error: unknown): string | null => (error instanceof RowError && error.message.length > 0 ? 'ROW_INVALID' : null);
const serviceError = (error: unknown): string | null => (error instanceof ServiceError && error.message.length > 0 ? error.reason : codedError(error));

/** The first line (1-based) the validator refuses, or null (a BOM before line 1 is no part of it). */
function firstBadLine(bytes: Buffer): number | null {
  const lines = bytes.toString('utf8').replace(/^\ufeff/, '').split('\n');
  if (lines.at(-1) === '') lines.pop();
  for (let i = 0; i < lines.length; i++) {
    const l = lines[i]!.endsWith('\r') ? lines[i]!.slice(0, -1) : lines[i]!;
    if (l.trim() === '') continue;
    try {
      parseRowLine(l, VOCAB);
    } catch {
      return i + 1;
    }
  }
  return null;
}

function isUtf8(bytes: Buffer): boolean {
  try {
    new TextDecoder('utf-8', { fatal: true }).decode(bytes);
    return true;
  } catch {
    return false;
  }
}

describe('JSONL rows under fuzzing', () => {
  let sandbox: string;
  let tokenizer: LlamaTokenizer;

  beforeAll(async () => {
    sandbox = await mkdtemp(join(tmpdir(), 'tuneserve-rows-fuzz-'));
    const files = llama3TokenizerFiles();
    tokenizer = new LlamaTokenizer(JSON.parse(await readFile(files.tokenizerJson, 'utf8')) as object, JSON.parse(await readFile(files.tokenizerConfig, 'utf8')) as Record<string, unknown>);
  }, 120_000);
  afterAll(async () => {
    if (sandbox) await rm(sandbox, { recursive: true, force: true });
  });

  it('the row validator: every line a row or a RowError', async () => {
    const summary = await fuzz({
      name: 'JSONL rows, every format (row validator)', id: 'rows', seed: 31, cases: { bounded: 5000, full: 20000 },
      make: (random) => line(random).toString('utf8'),
      describe: (l) => JSON.stringify(l.slice(0, 160)),
      clearError: rowError,
      run: async (l) => {
        parseRowLine(l, VOCAB);
        return 'accepted';
      },
    });
    expect(summary.crashes).toEqual([]);
    expect(summary.hangs).toEqual([]);
    expect(summary.accepted).toBeGreaterThan(summary.cases / 5);
    expect(summary.rejected).toBeGreaterThan(summary.cases / 5);
  }, 600_000);

  it('the upload check agrees with the validator line by line; what it accepts, training reads the same from a file and from memory', async () => {
    const path = join(sandbox, 'data.jsonl');
    const summary = await fuzz({
      name: 'JSONL files (upload check in random chunks, training loader)', id: 'jsonl-files', seed: 32, cases: { bounded: 1500, full: 6000 },
      make: (random) => ({ bytes: file(random), cuts: Array.from({ length: random.int(0, 6) }, () => random.next()).sort(), maxSeqLen: random.pick([2, 8, 64, 512]) }),
      describe: (c) => JSON.stringify(c.bytes.toString('utf8').slice(0, 200)),
      clearError: serviceError,
      run: async (c) => {
        const checker = new JsonlChecker('chunk', VOCAB);
        const bad = isUtf8(c.bytes) ? firstBadLine(c.bytes) : -1;
        let checkError: unknown = null;
        try {
          let start = 0;
          for (const cut of [...c.cuts.map((f) => Math.floor(f * c.bytes.length)), c.bytes.length]) {
            checker.push(c.bytes.subarray(start, Math.max(start, cut)));
            start = Math.max(start, cut);
          }
          checker.finish();
        } catch (error) {
          checkError = error;
        }
        if (checkError !== null && !(checkError instanceof ServiceError)) throw checkError;
        const refusedLine = checkError === null ? null : Number((checkError as ServiceError).details.metadata?.line);
        if (bad === -1) {
          if (checkError === null) return { failure: 'bytes that are not UTF-8 were accepted' };
          throw checkError;
        }
        if (bad !== null) {
          if (refusedLine !== bad) return { failure: `the validator refuses line ${bad}, the upload check ${checkError === null ? 'accepts the file' : `refuses line ${refusedLine}`}` };
          throw checkError;
        }
        if (checkError !== null) {
          if ((checkError as ServiceError).message.includes('contains no rows')) throw checkError;
          return { failure: `the upload check refused a file every line of which is valid: ${(checkError as Error).message}` };
        }
        // Accepted at upload: the training loader must read it as the in-memory parser does.
        await writeFile(path, c.bytes);
        const options = { maxSeqLen: c.maxSeqLen, vocabSize: VOCAB };
        const fromFile = await loadDataset(path, tokenizer, options).then((d) => d, (e: unknown) => e as Error);
        let fromMemory: Dataset | Error;
        try {
          fromMemory = parseDatasetText(c.bytes.toString('utf8'), path, tokenizer, options);
        } catch (error) {
          fromMemory = error as Error;
        }
        const describe = (r: Dataset | Error) => (r instanceof Error ? `refuses it (${r.message})` : `reads ${r.examples.length} examples`);
        if ((fromFile instanceof Error) !== (fromMemory instanceof Error)) return { failure: `the file loader ${describe(fromFile)} but the in-memory parser ${describe(fromMemory)}` };
        if (fromFile instanceof Error) {
          if (fromFile.message !== (fromMemory as Error).message) return { failure: `the loaders refuse it differently: ${fromFile.message} / ${(fromMemory as Error).message}` };
          throw fromFile;
        }
        const same = JSON.stringify((fromFile as Dataset).examples.map((e) => [Array.from(e.ids), Array.from(e.labels)])) ===
          JSON.stringify((fromMemory as Dataset).examples.map((e) => [Array.from(e.ids), Array.from(e.labels)]));
        if (!same) return { failure: 'the file loader and the in-memory parser read different examples' };
        return 'accepted';
      },
    });
    expect(summary.crashes).toEqual([]);
    expect(summary.hangs).toEqual([]);
    expect(summary.accepted).toBeGreaterThan(summary.cases / 20);
  }, 1_800_000);
});
