#!/usr/bin/python3
"""Self-consistency checks of llama_ref.py through its command line (run in-process): model files in
every dtype and layout give the same logits, the grouped attention equals a per-head loop over merged
weights, the KV cache equals the full forward, the three tasks agree with each other, accumulation
equals one full batch, AdamW/clipping/schedules equal hand formulas. Prints one line per check and a
final "self_check: PASS" / "self_check: FAIL"; exits non-zero on failure.

Tolerances: float64 paths are compared at 1e-10 (differences are summation-order rounding, ~1e-15
relative per op); float32 paths at 1e-5 relative (a few hundred float32 roundings of ~6e-8 each).
"""

import json
import math
import os
import sys
import tempfile

import numpy as np
import torch
import torch.nn.functional as F

sys.dont_write_bytecode = True  # importing llama_ref must not leave __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref as ref  # noqa: E402
from fd_check import tiny_config  # noqa: E402

FLOAT64_TOLERANCE = 1e-10
FLOAT32_RELATIVE_TOLERANCE = 1e-5

failures = []


def check(name, ok, detail=""):
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{(': ' + detail) if detail else ''}")
    if not ok:
        failures.append(name)


def max_diff(a, b):
    return float(np.max(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))))


def run_task(model_dir, adapter_dir, batch, task, dtype, work):
    batch_path = os.path.join(work, f"batch-{task}.json")
    out_path = os.path.join(work, f"out-{task}.safetensors")
    with open(batch_path, "w", encoding="utf-8") as handle:
        json.dump(batch, handle)
    argv = ["--model", model_dir, "--batch", batch_path, "--out", out_path, "--task", task, "--dtype", dtype]
    if adapter_dir:
        argv += ["--adapter", adapter_dir]
    ref.main(argv)
    return ref.read_safetensors(out_path)


def naive_logits(config, weights, adapter, input_ids):
    """Per-sequence, per-head loops over merged weights W + s·B·A with HF's repeat_kv; float64."""
    c = config
    def merged(layer, group, module):
        weight = weights[f"model.layers.{layer}.{group}.{module}.weight"]
        if (layer, module) in adapter.pairs:
            lora_a, lora_b = adapter.pairs[(layer, module)]
            weight = weight + adapter.scale * lora_b @ lora_a
        return weight
    def norm(x, w):
        return x / torch.sqrt((x * x).mean(-1, keepdim=True) + c.rms_norm_eps) * w
    inv_freq = torch.from_numpy(ref.rope_inverse_frequencies(c))
    outputs = []
    for row in input_ids:
        tokens = row.shape[0]
        x = weights["model.embed_tokens.weight"][row]                              # [T, H]
        for layer in range(c.num_hidden_layers):
            h = norm(x, weights[f"model.layers.{layer}.input_layernorm.weight"])
            q = h @ merged(layer, "self_attn", "q_proj").T
            k = h @ merged(layer, "self_attn", "k_proj").T
            v = h @ merged(layer, "self_attn", "v_proj").T
            heads = []
            for head in range(c.num_attention_heads):
                kv_head = head // (c.num_attention_heads // c.num_key_value_heads)
                qh = q[:, head * c.head_dim:(head + 1) * c.head_dim].clone()
                kh = k[:, kv_head * c.head_dim:(kv_head + 1) * c.head_dim].clone()
                vh = v[:, kv_head * c.head_dim:(kv_head + 1) * c.head_dim]
                half = c.head_dim // 2
                for t in range(tokens):                                              # rotate pairs (i, i+D/2)
                    for i in range(half):
                        angle = t * float(inv_freq[i])
                        cos_a, sin_a = math.cos(angle), math.sin(angle)
                        for m in (qh, kh):
                            a, b = float(m[t, i]), float(m[t, i + half])
                            m[t, i], m[t, i + half] = a * cos_a - b * sin_a, b * cos_a + a * sin_a
                out = torch.zeros(tokens, c.head_dim, dtype=torch.float64)
                for t in range(tokens):
                    scores = (kh[:t + 1] @ qh[t]) / math.sqrt(c.head_dim)
                    out[t] = torch.softmax(scores, 0) @ vh[:t + 1]
                heads.append(out)
            x = x + torch.cat(heads, 1) @ merged(layer, "self_attn", "o_proj").T
            h = norm(x, weights[f"model.layers.{layer}.post_attention_layernorm.weight"])
            gate = h @ merged(layer, "mlp", "gate_proj").T
            up = h @ merged(layer, "mlp", "up_proj").T
            x = x + (gate * torch.sigmoid(gate) * up) @ merged(layer, "mlp", "down_proj").T
        outputs.append(norm(x, weights["model.norm.weight"]) @ weights["lm_head.weight"].T)
    return torch.stack(outputs)


def hand_adamw(params, grads, lr, betas, eps, weight_decay, max_grad_norm):
    """One torch.optim.AdamW step (step 1) after clip_grad_norm_, written out."""
    norm = math.sqrt(sum(float((g * g).sum()) for g in grads.values()))
    clip = min(1.0, max_grad_norm / (norm + 1e-6)) if max_grad_norm > 0 else 1.0
    out = {}
    for key, p in params.items():
        g = grads[key] * clip
        p = p * (1 - lr * weight_decay)
        m = (1 - betas[0]) * g
        v = (1 - betas[1]) * g * g
        m_hat_step = lr / (1 - betas[0])
        denom = np.sqrt(v) / math.sqrt(1 - betas[1]) + eps
        out[key] = p - m_hat_step * m / denom
    return out, norm


def main():
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(7)
    config = tiny_config(tied=False)
    tensors = ref.random_model_tensors(config, generator, std=0.3)
    # Round the weights to bfloat16 values so F32, F16-free BF16 and sharded copies hold the same numbers.
    tensors = {name: ref.bf16_bits_to_float32(ref.float32_to_bf16_bits(a)) for name, a in tensors.items()}
    adapter = ref.random_adapter(config, 4, 8.0, False, ref.LORA_TARGETS, torch.float64, generator, b_std=0.3)
    input_ids = torch.randint(0, config.vocab_size, (2, 10), generator=generator)
    labels = input_ids.clone()
    labels[0, 3] = ref.IGNORE_INDEX
    labels[1, :7] = ref.IGNORE_INDEX          # row 1 has 2 targets, row 0 has 8: mean-of-means would differ
    batch = {"input_ids": input_ids.tolist(), "labels": labels.tolist()}

    with tempfile.TemporaryDirectory(prefix="llama-ref-") as work:
        model_f32 = os.path.join(work, "model-f32")
        model_bf16 = os.path.join(work, "model-bf16-sharded")
        adapter_dir = os.path.join(work, "adapter")
        ref.write_model_folder(model_f32, config, tensors, "F32")
        ref.write_model_folder(model_bf16, config, tensors, "BF16", shards=3)
        ref.save_adapter(adapter_dir, adapter, dtype="F64")

        # Files: the same numbers through F32 single-file and BF16 sharded folders.
        logits_f32 = run_task(model_f32, adapter_dir, batch, "logits", "float32", work)["logits"]
        logits_bf16 = run_task(model_bf16, adapter_dir, batch, "logits", "float32", work)["logits"]
        check("F32 single file and BF16 3-shard folder give identical logits", max_diff(logits_f32, logits_bf16) == 0.0)
        logits_64 = run_task(model_f32, adapter_dir, batch, "logits", "float64", work)["logits"]
        check("logits shape [B,T,V]", list(logits_64.shape) == [2, 10, config.vocab_size], str(list(logits_64.shape)))
        relative = max_diff(logits_f32, logits_64) / float(np.max(np.abs(logits_64)))
        check("float32 logits vs float64 logits", relative < FLOAT32_RELATIVE_TOLERANCE, f"{relative:.2e} relative")

        # Forward independently: per-head loops over merged weights.
        _, weights = ref.load_model(model_f32, torch.float64)
        loaded = ref.load_adapter(adapter_dir, config, torch.float64)
        naive = naive_logits(config, weights, loaded, input_ids).numpy()
        check("grouped attention + LoRA equals per-head loop over W + s·B·A", max_diff(naive, logits_64) < FLOAT64_TOLERANCE,
              f"max diff {max_diff(naive, logits_64):.2e}")

        # KV cache: prefill 4 tokens, then one token at a time, equals the full forward.
        model = ref.LlamaReference(config, weights, loaded, torch.float64)
        with torch.no_grad():
            cache = ref.KVCache(config, 2, 16, torch.float64)
            pieces = [model.logits(input_ids[:, :4], cache)]
            for t in range(4, 10):
                pieces.append(model.logits(input_ids[:, t:t + 1], cache))
        cached = torch.cat(pieces, 1).numpy()
        check("KV-cache prefill + single-token steps equal the full forward", max_diff(cached, logits_64) < FLOAT64_TOLERANCE,
              f"max diff {max_diff(cached, logits_64):.2e}")
        with torch.no_grad():
            alone = model.logits(input_ids[1:2]).numpy()
        check("a row's logits do not depend on the other rows", max_diff(alone, logits_64[1:2]) < FLOAT64_TOLERANCE)

        # loss_grads agrees with logits.
        grads_out = run_task(model_f32, adapter_dir, batch, "loss_grads", "float64", work)
        logits_t = torch.from_numpy(np.array(logits_64))
        loss_sum, count = ref.cross_entropy_sum(logits_t, labels)
        check("loss_grads loss equals CE of the logits task output", abs(float(grads_out["loss"][0]) - float(loss_sum) / count) < FLOAT64_TOLERANCE,
              f"{float(grads_out['loss'][0]):.10f}")
        keys = [key for key, _ in loaded.named_tensors()]
        check("loss_grads writes a .grad for every LoRA tensor", all(key + ".grad" in grads_out for key in keys),
              f"{len(keys)} tensors")
        grad_norm = math.sqrt(sum(float((grads_out[key + '.grad'] ** 2).sum()) for key in keys))

        # train: one step at lr 0 changes nothing and reports the same loss and norm.
        train_batch = dict(batch, train={"steps": 1, "lr": 0.0, "scheduler": "constant", "max_grad_norm": 1.0})
        trained = run_task(model_f32, adapter_dir, train_batch, "train", "float64", work)
        initial = dict(loaded.named_tensors())
        check("train 1 step at lr 0 leaves every LoRA tensor unchanged",
              all(max_diff(trained[key], initial[key]) == 0.0 for key in keys))
        check("train losses[0] equals loss_grads loss", abs(float(trained["losses"][0]) - float(grads_out["loss"][0])) < FLOAT64_TOLERANCE)
        check("train grad_norms[0] equals the norm of loss_grads gradients", abs(float(trained["grad_norms"][0]) - grad_norm) < FLOAT64_TOLERANCE,
              f"{grad_norm:.6f}")

        # One real step equals AdamW written by hand (weight decay, clipping active: norm > 0.05).
        options = {"steps": 1, "lr": 1e-2, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1,
                   "max_grad_norm": 0.05, "scheduler": "constant"}
        trained = run_task(model_f32, adapter_dir, dict(batch, train=options), "train", "float64", work)
        expected, _ = hand_adamw({k: initial[k].numpy() for k in keys}, {k: grads_out[k + ".grad"] for k in keys},
                                 1e-2, (0.9, 0.95), 1e-8, 0.1, 0.05)
        worst = max(max_diff(trained[key], expected[key]) for key in keys)
        check("one AdamW step (decoupled decay, clip 0.05) equals the hand formula", worst < FLOAT64_TOLERANCE and grad_norm > 0.05,
              f"max diff {worst:.2e}, pre-clip norm {grad_norm:.4f}")

        # Accumulation: 2 micro-batches (rows 0 | 1, 8 and 2 targets) equal one full batch over 3 steps.
        options = {"steps": 3, "lr": 1e-2, "weight_decay": 0.01, "max_grad_norm": 1.0, "scheduler": "linear",
                   "warmup_steps": 1, "total_steps": 3}
        full = run_task(model_f32, adapter_dir, dict(batch, train=dict(options, grad_accum=1)), "train", "float64", work)
        split = run_task(model_f32, adapter_dir, dict(batch, train=dict(options, grad_accum=2)), "train", "float64", work)
        listed = run_task(model_f32, adapter_dir, dict(batch, train=dict(options, grad_accum=2, micro_batches=[[1], [0]])),
                          "train", "float64", work)
        worst = max(max_diff(full[key], other[key]) for key in keys + ["losses", "grad_norms", "lrs"] for other in (split, listed))
        check("grad_accum 2 (default split and listed micro_batches) equals one full batch, 3 steps", worst < FLOAT64_TOLERANCE,
              f"max diff {worst:.2e}, losses {np.round(full['losses'], 6).tolist()}")
        moved = max(max_diff(full[key], initial[key]) for key in keys)
        check("training moved the LoRA tensors", moved > 1e-4, f"max change {moved:.3g}")

        # Accumulation over different data: step k reads micro_batches[(2k + j) % 4]; equals training
        # on the concatenated rows of each step.
        rows4 = torch.randint(0, config.vocab_size, (4, 10), generator=generator)
        labels4 = rows4.clone()
        labels4[2, :6] = ref.IGNORE_INDEX
        four = {"input_ids": rows4.tolist(), "labels": labels4.tolist()}
        cycled = run_task(model_f32, adapter_dir, dict(four, train=dict(options, steps=2, grad_accum=2,
                          micro_batches=[[0], [1], [2], [3]])), "train", "float64", work)
        step_losses = []
        for rows in ([0, 1], [2, 3]):
            result = run_task(model_f32, adapter_dir, {"input_ids": rows4[rows].tolist(), "labels": labels4[rows].tolist()},
                              "loss_grads", "float64", work)
            step_losses.append(float(result["loss"][0]))
        check("cycled micro_batches: step 0 loss is the loss of rows 0+1", abs(float(cycled["losses"][0]) - step_losses[0]) < FLOAT64_TOLERANCE)

        # Schedules: transformers' lambdas.
        cases = {
            ("linear", 2, 5): [0.0, 0.5, 1.0, 2 / 3, 1 / 3],
            ("cosine", 1, 4): [0.0, 1.0, 0.75, 0.25],
            ("constant", 2, 4): [0.0, 0.5, 1.0, 1.0],
            ("constant", 0, 3): [1.0, 1.0, 1.0],
        }
        for (scheduler, warmup, total), multipliers in cases.items():
            got = [ref.lr_multiplier(scheduler, k, warmup, total) for k in range(total)]
            check(f"{scheduler} schedule, warmup {warmup}, {total} steps", max_diff(got, multipliers) < 1e-15, str(np.round(got, 4).tolist()))
        scheduled = run_task(model_f32, adapter_dir, dict(batch, train={"steps": 5, "lr": 1e-3, "scheduler": "linear",
                             "warmup_steps": 2, "total_steps": 5}), "train", "float32", work)
        check("train lrs follow the schedule", max_diff(scheduled["lrs"], [0, 5e-4, 1e-3, 2e-3 / 3, 1e-3 / 3]) < 1e-9,
              str(scheduled["lrs"].tolist()))

        # Malformed files are clear errors.
        broken = os.path.join(work, "broken.safetensors")
        with open(os.path.join(model_f32, "model.safetensors"), "rb") as handle:
            blob = handle.read()
        for label, data in (("truncated", blob[:-3]), ("short", blob[:5]), ("garbled header", blob[:8] + b"\xff" * 16 + blob[24:])):
            with open(broken, "wb") as handle:
                handle.write(data)
            try:
                ref.read_safetensors(broken)
                check(f"{label} safetensors is rejected", False)
            except ref.ReferenceInputError as error:
                check(f"{label} safetensors is rejected", "broken.safetensors" in str(error), str(error)[:90])

    if failures:
        print(f"self_check: FAIL ({len(failures)} checks)")
        return 1
    print("self_check: PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
