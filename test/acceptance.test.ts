// Issue #2, "must show" 5: the whole engine through its command line. make-model --preset small,
// train a LoRA on the bundled 20-example memorization set until the loss is below 0.1, then greedy
// generation with the adapter reproduces every completion while the base alone does not, and the
// merged model folder reproduces them too.

import { execFile } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { promisify } from 'node:util';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';

import { Engine } from '../src/engine/engine.js';

const run = promisify(execFile);
const CLI = join(import.meta.dirname, '..', 'bin', 'tuneserve.js');
const DATA = join(import.meta.dirname, '..', 'data', 'memorize-20.jsonl');

async function cli(...args: string[]): Promise<string> {
  const { stdout } = await run(process.execPath, [CLI, ...args], { maxBuffer: 64 << 20, env: { ...process.env } });
  return stdout;
}

interface Row { prompt: string; completion: string }

describe('make-model → train → generate → merge (small preset, CPU)', () => {
  let dir: string;
  let rows: Row[];
  const trainLog: { step: number; loss: number }[] = [];

  beforeAll(async () => {
    dir = await mkdtemp(join(tmpdir(), 'tuneserve-accept-'));
    rows = (await readFile(DATA, 'utf8')).trim().split('\n').map((l) => JSON.parse(l) as Row);
    await cli('make-model', '--preset', 'small', '--out', join(dir, 'model'));
    const out = await cli('train', '--model', join(dir, 'model'), '--data', DATA, '--out', join(dir, 'adapter'),
      '--targets', 'all-linear', '--rank', '16', '--alpha', '32', '--dropout', '0', '--lr', '2e-3', '--scheduler', 'constant',
      '--epochs', '40', '--batch-size', '4', '--seed', '7', '--quant', 'nf4', '--device', 'cpu', '--json');
    // `train --json` prints {"dataset_report": …} first, then one object per optimizer step.
    const lines = out.trim().split('\n').map((line) => JSON.parse(line) as Record<string, unknown>);
    expect(Object.keys(lines[0] ?? {})).toEqual(['dataset_report']);
    for (const line of lines.slice(1)) trainLog.push(line as unknown as { step: number; loss: number });
    await cli('merge', '--model', join(dir, 'model'), '--adapter', join(dir, 'adapter'), '--out', join(dir, 'merged'), '--dtype', 'f32', '--no-fidelity');
  }, 900_000);

  afterAll(async () => {
    if (dir) await rm(dir, { recursive: true, force: true });
  });

  it('reports one JSON object per optimizer step and the loss falls below 0.1', () => {
    expect(trainLog.length).toBe(200); // 20 examples / batch 4 = 5 steps per epoch × 40 epochs
    expect(trainLog.map((s) => s.step)).toEqual(trainLog.map((_, i) => i + 1));
    expect(trainLog[0]!.loss).toBeGreaterThan(3);
    const tail = trainLog.slice(-5).map((s) => s.loss);
    expect(Math.max(...tail)).toBeLessThan(0.1);
  });

  async function completions(modelDir: string, adapterDir: string | null, quant: 'nf4' | 'none'): Promise<string[]> {
    const engine = await Engine.load(modelDir, { quant, device: 'cpu', log: () => {} });
    try {
      const adapter = adapterDir ? await engine.loadAdapter(adapterDir) : null;
      return await Promise.all(rows.map(async (row) => {
        const r = await engine.generate({ promptIds: engine.tokenizer.encode(row.prompt, { addBos: true }), adapter, maxTokens: 24 });
        return engine.tokenizer.decode(r.ids, { skipSpecialTokens: true });
      }));
    } finally {
      engine.close();
    }
  }

  it('generates every memorized completion with the adapter, and the base alone does not', async () => {
    const withAdapter = await completions(join(dir, 'model'), join(dir, 'adapter'), 'nf4');
    expect(withAdapter).toEqual(rows.map((r) => r.completion));
    const base = await completions(join(dir, 'model'), null, 'nf4');
    const baseHits = base.filter((text, i) => text === rows[i]!.completion).length;
    expect(baseHits).toBe(0);
  }, 300_000);

  it('the CLI streams the completion and ends with the ids as JSON', async () => {
    const out = await cli('generate', '--model', join(dir, 'model'), '--adapter', join(dir, 'adapter'), '--prompt', rows[0]!.prompt,
      '--max-tokens', '24', '--quant', 'nf4', '--device', 'cpu', '--json');
    const lines = out.trimEnd().split('\n');
    const last = JSON.parse(lines[lines.length - 1]!) as { ids: number[]; text: string; finish_reason: string };
    expect(last.text).toBe(rows[0]!.completion);
    expect(last.finish_reason).toBe('stop');
    expect(lines.slice(0, -1).join('\n')).toBe(rows[0]!.completion);
  }, 120_000);

  it('the merged folder (float32 weights, loaded unquantized) reproduces the completions without an adapter', async () => {
    // Merged into the original float weights: the adapter was trained against NF4(W), so a few
    // logits move by the quantization error; greedy completions still match.
    const merged = await completions(join(dir, 'merged'), null, 'none');
    expect(merged).toEqual(rows.map((r) => r.completion));
  }, 300_000);
});
