// Fuzzing of the tokenizer: the files (tokenizer.json and tokenizer_config.json of a model folder,
// mutated field by field: added tokens, model, pre-tokenizer, normalizer, decoder, post-processor,
// chat template, special tokens) and the inputs (text, chat conversations and ids as clients and
// datasets give them: control-token text, lone surrogates, long runs, ids outside the vocabulary).
// A file case must load or be refused with an EngineError (INVALID_CONFIG); a loaded tokenizer must
// then answer every operation with a result or an EngineError, never another exception.
// Loading the real 128k-entry tokenizer takes over a second, so the file cases use the real file
// cut to its first 3,000 entries (same structure, same added tokens); the input cases use the real one.

import { readFile } from 'node:fs/promises';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { llama3TokenizerFiles } from '../../src/engine/make-model.js';
import { LlamaTokenizer, type ChatMessage } from '../../src/engine/tokenizer.js';
import { codedError, fuzz } from '../helpers/fuzz.js';
import { interestingValue, mutateJson, preview } from '../helpers/json-mutator.js';
import type { Random } from '../helpers/random.js';

type Json = Record<string, unknown>;

const CONTROL_TEXT = ['<|begin_of_text|>', '<|end_of_text|>', '<|eot_id|>', '<|eom_id|>', '<|start_header_id|>', '<|end_header_id|>',
  '<|start_header_id|>assistant<|end_header_id|>\n\n', '<|reserved_special_token_5|>', '<|python_tag|>'];

/** Text as clients and datasets send it: words, unicode, control-token strings, lone surrogates, runs. */
function randomText(random: Random): string {
  const parts: string[] = [];
  for (let i = 0, n = random.int(0, 6); i < n; i++) {
    parts.push(random.pick<() => string>([
      () => random.pick(['Hello world!', ' the', 'naïve café', '日本語のテキスト', '😀👍🏽', '\n\n', '\t', ' ', '\r\n', "it's", '1234567', 'x']),
      () => random.pick(CONTROL_TEXT),
      () => String.fromCharCode(0xd800 + random.below(0x800)), // a lone surrogate (JSON rows can carry one)
      () => String.fromCodePoint(random.below(0x110000 - 0x800) + (random.chance(0.5) ? 0 : 0x800)).replace(/[\ud800-\udfff]/g, 'a'),
      () => random.pick(['a', ' ', '!', 'é', '\u0000', '\u200b']).repeat(random.pick([100, 3000, 20000])),
      () => String.fromCharCode(...Array.from({ length: random.int(1, 30) }, () => random.below(0x10000))),
    ])());
  }
  return parts.join('');
}

function randomMessages(random: Random): ChatMessage[] {
  const roles = ['system', 'user', 'assistant', 'ipython', 'tool', 'User', '', 'bot'];
  return Array.from({ length: random.int(0, 5) }, () => ({ role: random.chance(0.9) ? random.pick(roles.slice(0, 5)) : random.pick(roles), content: randomText(random) }));
}

function randomIds(random: Random): number[] {
  return Array.from({ length: random.int(0, 20) }, () => random.pick<() => number>([
    () => random.below(3000), () => 128000 + random.below(256), () => random.below(128256),
    () => random.pick([-1, 128256, 2 ** 31, 1.5, Number.NaN, 0]),
  ])());
}

/** Every operation the engine and the server run on a tokenizer, on random inputs. */
function exercise(tokenizer: LlamaTokenizer, random: Random): void {
  const text = randomText(random);
  tokenizer.encodeText(text, { addBos: random.chance(0.5) });
  tokenizer.encode(text, { addBos: random.chance(0.5) });
  const ids = randomIds(random);
  tokenizer.decode(ids, { skipSpecialTokens: random.chance(0.5) });
  const detokenizer = tokenizer.detokenizer({ skipSpecialTokens: random.chance(0.5) });
  detokenizer.pushAll(ids.filter((id) => Number.isInteger(id) && id >= 0));
  detokenizer.flush();
  tokenizer.encodeChat(randomMessages(random), { addGenerationPrompt: random.chance(0.5) });
}

describe('tokenizer under fuzzing', () => {
  let realJson: Json;
  let realConfig: Json;
  let smallJson: Json;
  let real: LlamaTokenizer;

  beforeAll(async () => {
    const files = llama3TokenizerFiles();
    realJson = JSON.parse(await readFile(files.tokenizerJson, 'utf8')) as Json;
    realConfig = JSON.parse(await readFile(files.tokenizerConfig, 'utf8')) as Json;
    real = new LlamaTokenizer(realJson, realConfig);
    const model = realJson.model as { vocab: Record<string, number>; merges: string[] };
    const vocab = Object.fromEntries(Object.entries(model.vocab).filter(([, id]) => id < 3000));
    const merges = model.merges.filter((merge) => {
      const [a, b] = merge.split(' ');
      return a! in vocab && b! in vocab && `${a}${b}` in vocab;
    });
    smallJson = { ...realJson, model: { ...model, vocab, merges } };
  }, 120_000);
  afterAll(() => undefined);

  /** Mutates one of the tokenizer's parts (or the config), returning the two documents. */
  function mutateFiles(random: Random): { json: unknown; config: unknown; what: string } {
    const json = structuredClone(smallJson);
    const config = structuredClone(realConfig);
    const what: string[] = [];
    let configDone = false;
    for (let i = 0, n = random.int(1, 2); i < n; i++) {
      const part = random.below(configDone ? 5 : 8);
      if (part === 0) {
        const added = json.added_tokens as Json[];
        const k = random.below(added.length);
        const edit = random.below(4);
        if (edit === 0) added.splice(k, 1);
        if (edit === 1) added[k] = { ...added[k], id: interestingValue(random) };
        if (edit === 2) added[k] = { ...added[k], content: interestingValue(random) };
        if (edit === 3) added.push({ ...added[k], id: random.pick([5, 128000, 999999]) });
        what.push(`added_tokens[${k}] edit ${edit}`);
      } else if (part === 1) {
        const field = random.pick(['type', 'unk_token', 'byte_fallback', 'ignore_merges', 'fuse_unk', 'dropout', 'vocab', 'merges', 'continuing_subword_prefix']);
        (json.model as Json)[field] = field === 'type' ? random.pick(['BPE', 'WordPiece', 'Unigram', 'WordLevel', 'X', 7]) : interestingValue(random);
        what.push(`model.${field} = ${preview((json.model as Json)[field])}`);
      } else if (part <= 4) {
        const field = random.pick(['pre_tokenizer', 'normalizer', 'decoder', 'post_processor']);
        json[field] = random.pick<() => unknown>([
          () => null, () => interestingValue(random), () => ({ type: random.pick(['Sequence', 'ByteLevel', 'Whitespace', 'Metaspace', 'NFC', 'Lowercase', 'Replace', 'Split', 'TemplateProcessing', 'Strip', 'Nope']) }),
          () => ({ type: 'Split', pattern: { Regex: random.pick(['\\s+', '(', '[a-', '\\p{L}+', '', '.', '(?<x>a)\\k<x>']) }, behavior: random.pick(['Isolated', 'Removed', 'X']), invert: false }),
          () => ({ type: 'Sequence', [random.pick(['pretokenizers', 'normalizers', 'decoders', 'processors'])]: [interestingValue(random)] }),
          () => ({ type: 'TemplateProcessing', single: [{ SpecialToken: { id: random.pick(['<|begin_of_text|>', '<|nope|>']), type_id: 0 } }, { Sequence: { id: 'A', type_id: 0 } }], pair: [], special_tokens: {} }),
        ])();
        what.push(`${field} = ${preview(json[field])}`);
      } else {
        configDone = true;
        const mutated = mutateJson(random, config, ['chat_template', 'eos_token', 'bos_token', 'add_bos_token', 'added_tokens_decoder', 'model_max_length']);
        what.push(`tokenizer_config: ${mutated.what}`);
        try {
          Object.assign(config, JSON.parse(mutated.bytes.toString('utf8')) as Json);
        } catch {
          what.push('(text damage ignored)');
        }
        if (random.chance(0.3)) {
          const template = String(realConfig.chat_template);
          const at = random.below(template.length);
          config.chat_template = `${template.slice(0, at)}${random.pick(['{%', '%}', '{{', '}}', '{% endfor %}', '{{ raise_exception("no") }}', "{{ messages[99]['content'] }}", '{% if %}', '|trim', "' + '", ''])}${template.slice(at + random.below(5))}`;
          what.push(`chat_template edited at ${at}`);
        }
      }
    }
    return { json, config, what: what.join('; ') };
  }

  it('tokenizer files: each loads or is refused clearly, and what loads answers every operation', async () => {
    const summary = await fuzz({
      name: 'tokenizer files (tokenizer.json, tokenizer_config.json)', id: 'tokenizer-files', seed: 21,
      cases: { bounded: 300, full: 3000 },
      make: (random) => ({ ...mutateFiles(random), random }),
      describe: (c) => c.what,
      clearError: codedError,
      run: async (c) => {
        const tokenizer = new LlamaTokenizer(c.json as object, c.config as Json);
        for (let i = 0; i < 3; i++) {
          try {
            exercise(tokenizer, c.random);
          } catch (error) {
            if (codedError(error) === null) throw error;
          }
        }
        return 'accepted';
      },
    });
    expect(summary.crashes).toEqual([]);
    expect(summary.hangs).toEqual([]);
    expect(summary.accepted).toBeGreaterThan(summary.cases / 10);
    expect(summary.rejected).toBeGreaterThan(0);
  }, 1_800_000);

  it('text, conversations and ids through the real Llama 3 tokenizer', async () => {
    const summary = await fuzz({
      name: 'tokenizer inputs (text, chats, ids) on the real Llama 3 tokenizer', id: 'tokenizer-inputs', seed: 22,
      cases: { bounded: 300, full: 3000 },
      make: (random) => random,
      clearError: codedError,
      run: async (random) => {
        exercise(real, random);
        // Plain text never becomes a control token, whatever it spells.
        const text = randomText(random);
        const ids = real.encodeText(text, { addBos: false });
        if (ids.some((id) => real.isControlToken(id))) return { failure: `${JSON.stringify(text.slice(0, 80))} encoded to a control token` };
        return 'accepted';
      },
    });
    expect(summary.crashes).toEqual([]);
    expect(summary.hangs).toEqual([]);
  }, 1_800_000);
});
