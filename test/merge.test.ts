// merge_and_unload (native/model/merge.cpp through the addon's mergeAdapter): a tiny Llama-shaped base
// in two (or three) safetensors shards and a PEFT adapter, both written here, merged and read back.
//
// Reference: W' = W + s·B·A in float64 from the exact stored values of W, A and B.
// Tolerances: the engine computes in float32 (sgemm over r products, times s, plus W), so its error is
// at most γ·(|W| + s·Σ_k |B_ik·A_kj|) with γ = (r + 2)·2⁻²⁴ (one rounding per product/sum step, Higham
// §3.1); a bf16 output then rounds to nearest with relative error ≤ 2⁻⁸ (8 significant bits). The checks
// use exactly these bounds (doubled γ for slack), and each test also checks that the delta s·B·A is far
// above the tolerance, so a merge that forgot the delta (or applied it twice) cannot pass.
import { native as loadNative } from '../src/engine/native.js';
import * as fs from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import { afterAll, beforeAll, describe, expect, it } from 'vitest';
import { rng } from './helpers/random.js';

interface TensorSpec {
  name: string;
  dtype: 'F32' | 'BF16' | 'F16';
  shape: number[];
  data: Float32Array;
}
interface MergeProgressEvent {
  tensor: string;
  index: number;
  total: number;
  merged: boolean;
}
interface MergeResult {
  files: string[];
  bytes: number;
  tensors: number;
  mergedTensors: number;
  weightMap: Record<string, string>;
}
interface NativeMerge {
  safetensorsWrite(file: string, tensors: TensorSpec[], metadata?: Record<string, string>): void;
  safetensorsHeader(file: string): {
    tensors: { name: string; dtype: string; shape: number[]; begin: number; end: number }[];
    metadata: Record<string, string>;
  };
  safetensorsReadF32(file: string, name: string): Float32Array;
  nf4Quantize(w: Float32Array, rows: number, cols: number): { dequantized: Float32Array };
  mergeAdapter(spec: unknown, onProgress?: (e: MergeProgressEvent) => void): { promise: Promise<MergeResult>; cancel(): void };
}
const native = loadNative() as unknown as NativeMerge;

// Shape letters as in native/model/config.h.
const config = {
  H: 64, I: 128, L: 2, NH: 4, NKV: 2, D: 16, V: 256,
  rmsEps: 1e-5, ropeTheta: 500000, ropeLlama3: false, ropeFactor: 8, ropeLowFreqFactor: 1,
  ropeHighFreqFactor: 4, ropeOriginalMaxPos: 8192, tied: false, maxPos: 2048,
};
const r = 4;
const alpha = 8;
const s = alpha / r;
const targets = ['q_proj', 'v_proj', 'down_proj'];
const lora = { r, alpha, dropout: 0, rslora: false, targets };
const GAMMA = (r + 2) * 2 ** -24;

const LINEAR: Record<string, [string, number, number]> = {
  // name -> [block, out, in]
  q_proj: ['self_attn', config.NH * config.D, config.H],
  k_proj: ['self_attn', config.NKV * config.D, config.H],
  v_proj: ['self_attn', config.NKV * config.D, config.H],
  o_proj: ['self_attn', config.H, config.NH * config.D],
  gate_proj: ['mlp', config.I, config.H],
  up_proj: ['mlp', config.I, config.H],
  down_proj: ['mlp', config.H, config.I],
};
const linearName = (l: number, t: string) => `model.layers.${l}.${LINEAR[t]![0]}.${t}.weight`;
const peftKey = (l: number, t: string, which: 'A' | 'B') =>
  `base_model.model.model.layers.${l}.${LINEAR[t]![0]}.${t}.lora_${which}.weight`;

function uniform(n: number, seed: number, scale: number): Float32Array {
  const u = rng(seed);
  return Float32Array.from({ length: n }, () => scale * (2 * u() - 1));
}

// The base model's tensors, split into two shards the way HF does (embeddings + layer 0, then the rest).
function baseShards(dtype: 'F32' | 'BF16', overrides: Record<string, number[]> = {}): TensorSpec[][] {
  let seed = 100;
  const t = (name: string, shape: number[], scale = 1): TensorSpec => {
    const final = overrides[name] ?? shape;
    return { name, dtype, shape: final, data: uniform(final.reduce((a, b) => a * b, 1), seed++, scale) };
  };
  const layer = (l: number): TensorSpec[] => [
    t(`model.layers.${l}.input_layernorm.weight`, [config.H]),
    ...Object.keys(LINEAR).map((name) => t(linearName(l, name), [LINEAR[name]![1], LINEAR[name]![2]])),
    t(`model.layers.${l}.post_attention_layernorm.weight`, [config.H]),
  ];
  return [
    [t('model.embed_tokens.weight', [config.V, config.H]), ...layer(0)],
    [...layer(1), t('model.norm.weight', [config.H]), t('lm_head.weight', [config.V, config.H])],
  ];
}

interface Adapter {
  A: Map<string, Float32Array>;  // key `${l}.${t}` -> (r, in)
  B: Map<string, Float32Array>;  // (out, r)
}
function writeAdapter(file: string, seed: number, badInFor?: string): Adapter {
  const A = new Map<string, Float32Array>();
  const B = new Map<string, Float32Array>();
  const tensors: TensorSpec[] = [];
  for (let l = 0; l < config.L; l++) {
    for (const t of targets) {
      const [, out, inDim] = LINEAR[t]!;
      const aIn = badInFor === t && l === 1 ? inDim + 1 : inDim;
      const a = uniform(r * aIn, seed++, 0.1);
      const b = uniform(out * r, seed++, 0.1);  // nonzero B: a trained adapter, not a fresh one
      A.set(`${l}.${t}`, a);
      B.set(`${l}.${t}`, b);
      tensors.push({ name: peftKey(l, t, 'A'), dtype: 'F32', shape: [r, aIn], data: a });
      tensors.push({ name: peftKey(l, t, 'B'), dtype: 'F32', shape: [out, r], data: b });
    }
  }
  native.safetensorsWrite(file, tensors, { format: 'pt' });
  return { A, B };
}

// Writes a shard by hand, for dtypes safetensorsWrite does not take (I64 here).
function writeRawShard(file: string, tensors: { name: string; dtype: string; shape: number[]; bytes: Uint8Array }[]) {
  const header: Record<string, unknown> = { __metadata__: { format: 'pt' } };
  let offset = 0;
  for (const t of tensors) {
    header[t.name] = { dtype: t.dtype, shape: t.shape, data_offsets: [offset, offset + t.bytes.length] };
    offset += t.bytes.length;
  }
  let json = JSON.stringify(header);
  json += ' '.repeat((8 - (json.length % 8)) % 8);
  const prefix = Buffer.alloc(8);
  prefix.writeBigUInt64LE(BigInt(json.length));
  fs.writeFileSync(file, Buffer.concat([prefix, Buffer.from(json), ...tensors.map((t) => Buffer.from(t.bytes))]));
}

// The stored bytes of one tensor.
function rawBytes(file: string, name: string): Buffer {
  const info = native.safetensorsHeader(file).tensors.find((t) => t.name === name);
  if (!info) throw new Error(`${file}: no ${name}`);
  const buf = fs.readFileSync(file);
  const start = 8 + Number(buf.readBigUInt64LE(0));
  return buf.subarray(start + info.begin, start + info.end);
}

// W + s·B·A in float64, and the float32 error scale |W| + s·Σ|B·A| per element.
function reference(W: Float32Array, a: Float32Array, b: Float32Array, out: number, inDim: number) {
  const expected = new Float64Array(out * inDim);
  const magnitude = new Float64Array(out * inDim);
  for (let i = 0; i < out; i++) {
    for (let j = 0; j < inDim; j++) {
      let sum = 0;
      let abs = 0;
      for (let k = 0; k < r; k++) {
        const p = b[i * r + k]! * a[k * inDim + j]!;
        sum += p;
        abs += Math.abs(p);
      }
      expected[i * inDim + j] = W[i * inDim + j]! + s * sum;
      magnitude[i * inDim + j] = Math.abs(W[i * inDim + j]!) + s * abs;
    }
  }
  return { expected, magnitude };
}

// Checks got ≈ expected within the float32 bound, plus bf16 rounding when `bf16`; returns the smallest
// |delta| / tolerance ratio seen over the median, to show the delta is resolvable.
function expectMerged(got: Float32Array, W: Float32Array, ref: ReturnType<typeof reference>, bf16: boolean) {
  let resolvable = 0;
  for (let i = 0; i < got.length; i++) {
    const e = ref.expected[i]!;
    const tol = 2 * GAMMA * ref.magnitude[i]! + (bf16 ? 2 ** -8 * Math.abs(e) : 0);
    const err = Math.abs(got[i]! - e);
    if (!(err <= tol)) throw new Error(`element ${i}: got ${got[i]}, expected ${e} (error ${err} > tolerance ${tol})`);
    if (Math.abs(e - W[i]!) > 4 * tol) resolvable++;
  }
  // Most deltas are several tolerances wide: a missing or doubled delta would fail above.
  expect(resolvable / got.length).toBeGreaterThan(0.5);
}

let root: string;
const tmp = (name: string) => {
  const dir = path.join(root, name);
  fs.mkdirSync(dir, { recursive: true });
  return dir;
};

function writeModel(dir: string, shards: TensorSpec[][]): string[] {
  return shards.map((tensors, i) => {
    const file = path.join(dir, `model-0000${i + 1}-of-0000${shards.length}.safetensors`);
    native.safetensorsWrite(file, tensors, { format: 'pt' });
    return file;
  });
}

function spec(shards: string[], outDir: string, adapterFile: string, dtype: string, into: string) {
  return { config, shards, outDir, adapterFile, lora, dtype, into };
}

beforeAll(() => {
  root = fs.mkdtempSync(path.join(os.tmpdir(), 'tuneserve-merge-'));
});
afterAll(() => {
  fs.rmSync(root, { recursive: true, force: true });
});

describe('mergeAdapter into the original weights', () => {
  it('bf16: merged = W + s·B·A within bf16 rounding, other tensors bit-identical, HF folder layout', async () => {
    const modelDir = tmp('bf16-model');
    const outDir = tmp('bf16-out');
    const shards = writeModel(modelDir, baseShards('BF16'));
    // A third shard with an integer tensor: copied byte for byte, never converted.
    const ids = new BigInt64Array([1n, 2n, 3n, -4n, 1n << 40n]);
    const extra = path.join(modelDir, 'extra.safetensors');
    writeRawShard(extra, [{ name: 'model.extra_ids', dtype: 'I64', shape: [5], bytes: new Uint8Array(ids.buffer) }]);
    shards.push(extra);
    const adapterFile = path.join(modelDir, 'adapter_model.safetensors');
    const adapter = writeAdapter(adapterFile, 7);

    const events: MergeProgressEvent[] = [];
    const { promise } = native.mergeAdapter(spec(shards, outDir, adapterFile, 'bf16', 'original'), (e) => events.push(e));
    const result = await promise;

    const names = shards.map((f) => path.basename(f));
    expect(result.files).toEqual(names);
    expect(fs.readdirSync(outDir).sort()).toEqual([...names].sort());  // nothing else (no temp files)
    const allTensors = shards.flatMap((f) => native.safetensorsHeader(f).tensors.map((t) => [t.name, path.basename(f)]));
    expect(result.tensors).toBe(allTensors.length);
    expect(result.mergedTensors).toBe(config.L * targets.length);
    expect(result.weightMap).toEqual(Object.fromEntries(allTensors));
    expect(result.bytes).toBe(names.reduce((sum, n) => sum + fs.statSync(path.join(outDir, n)).size, 0));
    // Progress: coalesced, but in order and always ending with the last tensor.
    expect(events.length).toBeGreaterThan(0);
    expect(events.at(-1)).toMatchObject({ index: result.tensors, total: result.tensors });
    for (let i = 1; i < events.length; i++) expect(events[i]!.index).toBeGreaterThan(events[i - 1]!.index);

    for (const file of shards) {
      const outFile = path.join(outDir, path.basename(file));
      const header = native.safetensorsHeader(outFile);
      expect(header.metadata).toEqual({ format: 'pt' });
      const source = native.safetensorsHeader(file);
      expect(header.tensors.map((t) => [t.name, t.shape])).toEqual(source.tensors.map((t) => [t.name, t.shape]));
      for (const t of header.tensors) {
        const [, l, block, module] = /^model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.weight$/.exec(t.name) ?? [];
        if (t.name === 'model.extra_ids') {
          expect(t.dtype).toBe('I64');
          expect(rawBytes(outFile, t.name).equals(rawBytes(file, t.name))).toBe(true);
          continue;
        }
        expect(t.dtype).toBe('BF16');
        if (block && module && targets.includes(module)) {
          const [, out, inDim] = LINEAR[module]!;
          const W = native.safetensorsReadF32(file, t.name);
          const key = `${l}.${module}`;
          const ref = reference(W, adapter.A.get(key)!, adapter.B.get(key)!, out, inDim);
          expectMerged(native.safetensorsReadF32(outFile, t.name), W, ref, true);
        } else {
          expect(rawBytes(outFile, t.name).equals(rawBytes(file, t.name))).toBe(true);
        }
      }
    }
  });

  it('f32: merged within the float32 bound, non-targeted tensors bitwise unchanged', async () => {
    const modelDir = tmp('f32-model');
    const outDir = tmp('f32-out');
    const shards = writeModel(modelDir, baseShards('F32'));
    const adapterFile = path.join(modelDir, 'adapter_model.safetensors');
    const adapter = writeAdapter(adapterFile, 11);
    const result = await native.mergeAdapter(spec(shards, outDir, adapterFile, 'f32', 'original')).promise;
    expect(result.mergedTensors).toBe(config.L * targets.length);
    for (const file of shards) {
      const outFile = path.join(outDir, path.basename(file));
      for (const t of native.safetensorsHeader(outFile).tensors) {
        expect(t.dtype).toBe('F32');
        const match = /^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$/.exec(t.name);
        if (match && targets.includes(match[2]!)) {
          const [, out, inDim] = LINEAR[match[2]!]!;
          const W = native.safetensorsReadF32(file, t.name);
          const key = `${match[1]}.${match[2]}`;
          expectMerged(native.safetensorsReadF32(outFile, t.name), W, reference(W, adapter.A.get(key)!, adapter.B.get(key)!, out, inDim), false);
        } else {
          expect(rawBytes(outFile, t.name).equals(rawBytes(file, t.name))).toBe(true);
        }
      }
    }
  });
});

describe('mergeAdapter into the dequantized NF4 weights', () => {
  it('every block linear weight becomes dequant(nf4(W)) (+ s·B·A where targeted); the rest is unchanged', async () => {
    const modelDir = tmp('dq-model');
    const outDir = tmp('dq-out');
    const shards = writeModel(modelDir, baseShards('F32'));
    const adapterFile = path.join(modelDir, 'adapter_model.safetensors');
    const adapter = writeAdapter(adapterFile, 13);
    const result = await native.mergeAdapter(spec(shards, outDir, adapterFile, 'f32', 'dequantized')).promise;
    expect(result.mergedTensors).toBe(config.L * targets.length);
    let quantizedSeen = 0;
    for (const file of shards) {
      const outFile = path.join(outDir, path.basename(file));
      for (const t of native.safetensorsHeader(outFile).tensors) {
        const match = /^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$/.exec(t.name);
        if (!match) {
          // Embeddings, norms and lm_head are not quantized by the engine, so not here either.
          expect(rawBytes(outFile, t.name).equals(rawBytes(file, t.name))).toBe(true);
          continue;
        }
        quantizedSeen++;
        const [, out, inDim] = LINEAR[match[2]!]!;
        const W = native.safetensorsReadF32(file, t.name);
        // The engine's own NF4 round trip (checked against the QLoRA algorithm in the NF4 tests).
        const dq = native.nf4Quantize(W, out, inDim).dequantized;
        const got = native.safetensorsReadF32(outFile, t.name);
        if (targets.includes(match[2]!)) {
          const key = `${match[1]}.${match[2]}`;
          expectMerged(got, dq, reference(dq, adapter.A.get(key)!, adapter.B.get(key)!, out, inDim), false);
        } else {
          expect(Buffer.from(got.buffer).equals(Buffer.from(dq.buffer))).toBe(true);
          expect(Buffer.from(got.buffer).equals(Buffer.from(W.buffer))).toBe(false);  // NF4 did change it
        }
      }
    }
    expect(quantizedSeen).toBe(config.L * Object.keys(LINEAR).length);
  });
});

describe('mergeAdapter failures leave nothing behind', () => {
  it('cancel() rejects with CANCELLED and no shard (partial or final) remains', async () => {
    const modelDir = tmp('cancel-model');
    const outDir = tmp('cancel-out');
    // A 16 MiB embedding keeps the merge busy for many milliseconds, far longer than the synchronous
    // cancel() below takes to land.
    const shards = writeModel(modelDir, baseShards('F32', { 'model.embed_tokens.weight': [65536, config.H] }));
    const adapterFile = path.join(modelDir, 'adapter_model.safetensors');
    writeAdapter(adapterFile, 17);
    const job = native.mergeAdapter(spec(shards, outDir, adapterFile, 'bf16', 'original'));
    job.cancel();
    await expect(job.promise).rejects.toMatchObject({ code: 'CANCELLED' });
    expect(fs.readdirSync(outDir)).toEqual([]);
    job.cancel();  // after the end: harmless
  });

  it('a throwing onProgress rejects the merge with what it threw, leaving no shard', async () => {
    const modelDir = tmp('throw-model');
    const outDir = tmp('throw-out');
    const shards = writeModel(modelDir, baseShards('F32'));
    const adapterFile = path.join(modelDir, 'adapter_model.safetensors');
    writeAdapter(adapterFile, 29);
    const job = native.mergeAdapter(spec(shards, outDir, adapterFile, 'bf16', 'original'), () => {
      throw new Error('listener failed');
    });
    await expect(job.promise).rejects.toThrow('listener failed');
    expect(fs.readdirSync(outDir)).toEqual([]);
  });

  it('an adapter whose shapes do not fit the base is rejected with ADAPTER_MISMATCH', async () => {
    const modelDir = tmp('mismatch-model');
    const outDir = tmp('mismatch-out');
    const shards = writeModel(modelDir, baseShards('BF16'));
    const adapterFile = path.join(modelDir, 'adapter_model.safetensors');
    writeAdapter(adapterFile, 19, 'down_proj');  // layer 1's down_proj lora_A is [r, I + 1]
    await expect(native.mergeAdapter(spec(shards, outDir, adapterFile, 'bf16', 'original')).promise).rejects.toMatchObject({
      code: 'ADAPTER_MISMATCH',
    });
    expect(fs.readdirSync(outDir)).toEqual([]);
  });

  it('a base tensor that does not fit the adapter (config and weights disagree) is rejected with ADAPTER_MISMATCH', async () => {
    const modelDir = tmp('mismatch-base');
    const outDir = tmp('mismatch-base-out');
    // Layer 1's q_proj is stored as [32, H] while the config (and the adapter) say [NH·D, H] = [64, H].
    const shards = writeModel(modelDir, baseShards('BF16', { [linearName(1, 'q_proj')]: [32, config.H] }));
    const adapterFile = path.join(modelDir, 'adapter_model.safetensors');
    writeAdapter(adapterFile, 23);
    const error = await native.mergeAdapter(spec(shards, outDir, adapterFile, 'bf16', 'original')).promise.catch((e: unknown) => e);
    expect(error).toMatchObject({ code: 'ADAPTER_MISMATCH' });
    expect(String((error as Error).message)).toContain(linearName(1, 'q_proj'));
    expect(fs.readdirSync(outDir)).toEqual([]);
  });

  it('a bad spec throws synchronously with INVALID_ARGUMENT', () => {
    expect(() => native.mergeAdapter({ ...spec([], root, 'x', 'f8', 'original') })).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
    );
    expect(() => native.mergeAdapter({ ...spec([], root, 'x', 'bf16', 'original'), lora: { ...lora, targets: ['qkv'] } })).toThrow(
      expect.objectContaining({ code: 'INVALID_ARGUMENT' }),
    );
  });
});
