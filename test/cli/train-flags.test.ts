// `tuneserve train` checks its flags before any weight is loaded: --max-seq-len against the model's
// max_position_embeddings, --targets against the modules the model's layers have, and the optimizer
// flags the engine would only refuse after the load. The model folder here holds config.json and
// nothing else, so any error that is not about a flag would be about missing weights.

import { mkdtemp, rm, writeFile } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { trainCommand } from '../../src/cli/engine-commands.js';
import { presetConfigJson } from '../../src/engine/make-model.js';

let dir: string;
let args: string[];
beforeAll(async () => {
  dir = await mkdtemp(join(tmpdir(), 'tuneserve-train-flags-'));
  await writeFile(join(dir, 'config.json'), JSON.stringify({ ...presetConfigJson('tiny'), max_position_embeddings: 16384 }));
  await writeFile(join(dir, 'train.jsonl'), '{"text": "hello"}\n');
  args = ['--model', dir, '--data', join(dir, 'train.jsonl'), '--out', join(dir, 'adapter')];
});
afterAll(async () => {
  await rm(dir, { recursive: true, force: true });
});

const refusal = (...flags: string[]) => trainCommand([...args, ...flags]).then(() => null, (error: unknown) => error);

describe('tuneserve train flags', () => {
  const cases: Array<[string[], string, RegExp]> = [
    [['--max-seq-len', '16385'], 'max-seq-len', /^--max-seq-len is 16385, above the model's max_position_embeddings \(16384\)$/],
    [['--max-seq-len', '1'], 'max-seq-len', /^--max-seq-len is 1; a training sequence needs at least 2 tokens/],
    [['--targets', 'q_proj,lm_head'], 'targets', /^--targets: target_modules: "lm_head" is not one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj \(or all-linear\)$/],
    [['--rank', '0'], 'rank', /^--rank: rank r must be a positive integer, got 0$/],
    [['--batch-size', '0'], 'batch-size', /^--batch-size must be at least 1, got 0$/],
    [['--grad-accum', '0'], 'grad-accum', /^--grad-accum must be at least 1, got 0$/],
    [['--lr', '0'], 'lr', /^--lr must be above 0, got 0$/],
    [['--data', join(tmpdir(), 'no-such-file.jsonl')], 'data', /^--data: cannot read /],
  ];
  for (const [flags, field, message] of cases) {
    it(`${flags.join(' ')} is refused naming --${field}, before the model loads`, async () => {
      const error = await refusal(...flags);
      expect(error).toMatchObject({ code: field === 'data' ? 'NOT_FOUND' : 'INVALID_ARGUMENT', details: { field } });
      expect((error as Error).message).toMatch(message);
    });
  }

  it('with good flags it gets as far as loading the weights (and finds none here)', async () => {
    const error = await refusal('--max-seq-len', '16384', '--targets', 'all-linear');
    expect(error).toMatchObject({ code: 'NOT_FOUND', message: expect.stringMatching(/no model\.safetensors or model\.safetensors\.index\.json/) });
  });
});
