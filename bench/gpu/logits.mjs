// Writes the engine's logits (T × V float32, row-major) for a prompt, with an optional adapter, and
// compares them with a reference file when one is given. Used by bench/gpu/peft_roundtrip.sh.
//   node bench/gpu/logits.mjs MODEL_DIR ADAPTER_DIR|- IDS(comma) OUT.f32 [REFERENCE.f32]
import { readFileSync, writeFileSync } from 'node:fs';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const { Engine } = await import(join(root, 'dist', 'engine', 'engine.js'));
const [model, adapterDir, idsArg, out, reference] = process.argv.slice(2);
const engine = await Engine.load(model, { quant: 'none', device: 'cpu', log: () => {} });
try {
  const adapter = adapterDir && adapterDir !== '-' ? await engine.loadAdapter(adapterDir) : null;
  const logits = await engine.logits(idsArg.split(',').map(Number), adapter);
  writeFileSync(out, Buffer.from(logits.buffer, logits.byteOffset, logits.byteLength));
  if (reference) {
    const ref = new Float32Array(readFileSync(reference).buffer.slice(0));
    let num = 0, den = 0;
    for (let i = 0; i < ref.length; i++) { num += (logits[i] - ref[i]) ** 2; den += ref[i] ** 2; }
    console.log(JSON.stringify({ check: 'engine logits with a PEFT-made adapter vs PEFT', relative_l2: Math.sqrt(num / den), n: ref.length }));
  }
} finally {
  engine.close();
}
