// Writes the engine's logits (T × V float32, row-major) for a prompt, with an optional adapter, and
// compares them with a reference file when one is given (relative L2 and top-1 agreement per position).
// Used by bench/gpu/peft_roundtrip.sh and bench/gpu/check.sh.
//   node bench/gpu/logits.mjs MODEL_DIR ADAPTER_DIR|- IDS(comma) OUT.f32 [REFERENCE.f32]
//        [--device cpu|cuda] [--quant none|nf4] [--cuda-compute bf16|f32] [--label TEXT]
import { readFileSync, writeFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import { parseArgs } from 'node:util';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const { Engine } = await import(join(root, 'dist', 'engine', 'engine.js'));
const { values, positionals } = parseArgs({
  allowPositionals: true,
  options: { device: { type: 'string' }, quant: { type: 'string' }, 'cuda-compute': { type: 'string' }, label: { type: 'string' } },
});
const [model, adapterDir, idsArg, out, reference] = positionals;
const engine = await Engine.load(model, {
  quant: values.quant ?? 'none', device: values.device ?? 'cpu', cudaCompute: values['cuda-compute'] ?? 'bf16', log: () => {},
});
try {
  const adapter = adapterDir && adapterDir !== '-' ? await engine.loadAdapter(adapterDir) : null;
  const logits = await engine.logits(idsArg.split(',').map(Number), adapter);
  writeFileSync(out, Buffer.from(logits.buffer, logits.byteOffset, logits.byteLength));
  if (reference) {
    const ref = new Float32Array(readFileSync(reference).buffer.slice(0));
    const V = engine.config.vocabSize;
    let num = 0, den = 0, agree = 0;
    for (let i = 0; i < ref.length; i++) { num += (logits[i] - ref[i]) ** 2; den += ref[i] ** 2; }
    for (let t = 0; t < ref.length / V; t++) {
      let a = 0, b = 0;
      for (let v = 1; v < V; v++) {
        if (logits[t * V + v] > logits[t * V + a]) a = v;
        if (ref[t * V + v] > ref[t * V + b]) b = v;
      }
      agree += a === b ? 1 : 0;
    }
    console.log(JSON.stringify({
      check: values.label ?? 'engine logits vs reference', device: engine.device, relative_l2: Math.sqrt(num / den),
      top1_agreement: agree / (ref.length / V), n: ref.length,
    }));
  }
} finally {
  engine.close();
}
