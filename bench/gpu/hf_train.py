#!/usr/bin/env python3
"""The peer of bench-training (bench/gpu/bench_training.cpp), measured in the same device call by
bench/gpu/check.sh's training phase: Hugging Face transformers + PEFT LoRA training on a randomly
initialised Llama 3 of the same shape (no downloads are possible on the GPU machine), with what that
stack offers for memory and speed: bf16 base, SDPA attention, gradient checkpointing (non-reentrant),
float32 LoRA weights, AdamW on them, clipping at 1.0 — and the same batch, sequence, rank, alpha,
targets and LoRA dropout as the engine's run. The base is bf16, not NF4: bitsandbytes is not
installed there (QLoRA in HF would be slower still, dequantizing in Python-launched kernels).

Prints one JSON object per measurement. With --engine-log (bench-training's output) it also prints
the engine against the peer: tokens/s ratio, peak memory, model FLOPs utilisation with one formula
for both (bench_training.cpp's header: 6 N_blocks + 4 V H + attention, forward + recompute + backward)
over the bf16 matrix peak measured here.

  python3 bench/gpu/hf_train.py --preset llama3-8b --batch 2 --seq 2048 --rank 16 --engine-log bench-training.log
  python3 bench/gpu/hf_train.py --preset tiny --steps 2      # a quick smoke test
"""
import argparse
import json
import math

import torch

PRESETS = {
    # hidden, intermediate, layers, heads, kv heads, head dim, vocab: bench_training.cpp's shapes.
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=8, head_dim=128, vocab_size=128256),
    "tiny": dict(hidden_size=256, intermediate_size=768, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=4, head_dim=32, vocab_size=2048),
}
TARGETS = {"qkvo": ["q_proj", "k_proj", "v_proj", "o_proj"],
           "all": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}


def emit(**kv):
    print(json.dumps(kv), flush=True)
    return kv


def timed(fn, reps):
    """Median seconds of fn() over reps runs after one warm-up, timed with CUDA events."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        fn()
        t1.record()
        torch.cuda.synchronize()
        times.append(t0.elapsed_time(t1) / 1e3)
    return sorted(times)[len(times) // 2]


def matmul_peak(n):
    # Random operands (never all-zero data), bf16 in and out, as the engine's measurement.
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    secs = timed(lambda: a @ b.t(), 10)
    del a, b
    return 2 * n ** 3 / secs


def flops_per_token(p, seq):
    h, i, layers, nh, nkv, d, v = (p[k] for k in ("hidden_size", "intermediate_size", "num_hidden_layers",
                                                  "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size"))
    n_blocks = layers * (h * nh * d + 2 * h * nkv * d + nh * d * h + 3 * h * i)
    return 6 * n_blocks + 4 * v * h + layers * 4 * 2 * nh * d * (seq + 1)


def build_model(preset, attn):
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(**PRESETS[preset], rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072,
                      tie_word_embeddings=False,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg._attn_implementation = attn
    torch.manual_seed(0)
    prev = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("cuda"):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(prev)
    with torch.no_grad():
        for p in model.parameters():
            torch.nn.init.normal_(p, std=0.02) if p.dim() > 1 else torch.nn.init.ones_(p)
    return model


def add_lora(model, rank, alpha, dropout, targets):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                             bias="none", task_type="CAUSAL_LM"))
    for p in model.parameters():  # LoRA master weights in float32, as the engine keeps them
        if p.requires_grad:
            p.data = p.data.float()
    return model


def train(model, a, vocab):
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    g = torch.Generator(device="cuda").manual_seed(1)
    ids = torch.randint(0, vocab, (a.warmup + a.steps, a.batch, a.seq), device="cuda", generator=g)
    torch.cuda.reset_peak_memory_stats()
    losses, times = [], []
    for i in range(a.warmup + a.steps):
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        t0.record()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(input_ids=ids[i], labels=ids[i])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1.record()
        losses.append(out.loss.item())  # synchronizes
        if i >= a.warmup:
            times.append(t0.elapsed_time(t1) / 1e3)
    step = sorted(times)[len(times) // 2]
    return dict(tokens_per_s=a.batch * a.seq / step, step_s=step, peak_GiB=torch.cuda.max_memory_allocated() / 2 ** 30,
                first_loss=losses[0], last_loss=losses[-1])


def engine_metrics(path):
    """bench-training's {"metric": ..., "value": ...} lines."""
    out = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line.startswith('{"metric"'):
                m = json.loads(line)
                out[m["metric"]] = m["value"]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=None, help="default 2048 (tiny: 64)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=int, default=None, help="default 2 x rank")
    ap.add_argument("--targets", default="qkvo", choices=sorted(TARGETS))
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--attn", default="sdpa")
    ap.add_argument("--engine-log", default=None, help="bench-training's output, to compare with")
    a = ap.parse_args()
    a.seq = a.seq or (64 if a.preset == "tiny" else 2048)
    a.alpha = a.alpha or 2 * a.rank
    import peft
    import transformers
    emit(kind="env", gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
         peft=peft.__version__, preset=a.preset, batch=a.batch, seq=a.seq, rank=a.rank, alpha=a.alpha, targets=a.targets,
         dropout=a.dropout, attn=a.attn)
    peak = matmul_peak(256 if a.preset == "tiny" else 8192)
    emit(kind="ceiling", bf16_matmul_TFLOPs=round(peak / 1e12, 1))
    p = PRESETS[a.preset]
    model = add_lora(build_model(a.preset, a.attn), a.rank, a.alpha, a.dropout, TARGETS[a.targets])
    r = train(model, a, p["vocab_size"])
    fpt = flops_per_token(p, a.seq)
    r["mfu"] = r["tokens_per_s"] * fpt / peak
    emit(kind="train", **{k: round(v, 4) for k, v in r.items()})
    if not (math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"])):
        raise SystemExit("hf_train: non-finite loss")
    if a.engine_log:
        e = engine_metrics(a.engine_log)
        if "train_tokens_per_s" not in e:
            raise SystemExit(f"hf_train: no train_tokens_per_s in {a.engine_log} (did bench-training run?)")
        ratio = e["train_tokens_per_s"] / r["tokens_per_s"]
        emit(kind="engine_vs_peer", tokens_per_s_ratio=round(ratio, 3), engine_tokens_per_s=round(e["train_tokens_per_s"], 1),
             peer_tokens_per_s=round(r["tokens_per_s"], 1), engine_peak_GiB=round(e.get("peak_device_memory", float("nan")), 2),
             peer_peak_GiB=round(r["peak_GiB"], 2), engine_mfu=round(e.get("mfu", float("nan")), 3), peer_mfu=round(r["mfu"], 3),
             goal="tokens/s ratio >= 1.3, engine peak <= 8 GiB")
        print(f"\nengine vs HF + PEFT ({a.preset}, batch {a.batch} x {a.seq}, r {a.rank} {a.targets}): "
              f"{ratio:.2f}x tokens/s ({e['train_tokens_per_s']:.0f} vs {r['tokens_per_s']:.0f}), "
              f"peak {e.get('peak_device_memory', float('nan')):.2f} vs {r['peak_GiB']:.2f} GiB, "
              f"MFU {e.get('mfu', float('nan')):.3f} vs {r['mfu']:.3f}")


if __name__ == "__main__":
    main()
