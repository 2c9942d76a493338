#!/usr/bin/python3
"""Checks llama_ref.py against hand-computed facts and its LoRA gradients against central finite
differences in float64, on tiny random configs built here. Prints one line per check and a final
"fd_check: PASS ..." / "fd_check: FAIL ..." line; exits non-zero on failure.

Why the tolerances: in float64 a central difference with step h has truncation error ~h²·|f'''|
and rounding error ~eps·|L|/h; with h = 1e-5 and |L| ≈ 4 both are ~1e-10, so the estimate agrees
with autograd to about 1e-9 absolute. We allow |fd - autograd| <= 1e-7 + 1e-5·|autograd|, far above
that noise and far below any real bug (a wrong scale, a missing term or a transposed factor moves
gradients by O(1) relative).
"""

import math
import os
import sys

import numpy as np
import torch

sys.dont_write_bytecode = True  # importing llama_ref must not leave __pycache__ in the tree
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import llama_ref as ref  # noqa: E402

STEP = 1e-5
ABSOLUTE_TOLERANCE = 1e-7
RELATIVE_TOLERANCE = 1e-5
COORDINATES_PER_TENSOR = 2


def tiny_config(tied):
    """hidden 16, 2 layers, GQA 4/2 heads with head_dim 8 (so q_proj is 16 -> 32), vocab 64, llama3
    rope scaling whose three bands each hold a frequency (see check_rope_scaling)."""
    return ref.LlamaConfig({
        "hidden_size": 16, "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "head_dim": 8, "vocab_size": 64, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": tied,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 128},
    })


def check_rope_scaling():
    """Hand-computed llama3 frequencies (REFERENCE.md rule)."""
    failures = []
    # Tiny config: D 8, theta 1e4 -> inv_freq = [1, 0.1, 0.01, 0.001], wavelen = 2π/f =
    # [6.28, 62.8, 628, 6283]. orig 128, low 1, high 4: keep below 128/4 = 32, divide by 8 above
    # 128/1 = 128, blend in between. f1: s = (128/(20π) - 1)/3 = 0.34572775719208..., f = (1-s)·0.1/8 +
    # s·0.1 = 0.0125 + 0.0875·s = 0.04275117875430759.
    expected = [1.0, 0.04275117875430759, 0.01 / 8, 0.001 / 8]
    got = ref.rope_inverse_frequencies(tiny_config(True))
    for i, (want, have) in enumerate(zip(expected, got)):
        if abs(want - have) > 1e-15 * max(1.0, abs(want)) + 1e-18:
            failures.append(f"tiny inv_freq[{i}] = {have!r}, hand value {want!r}")
    # Llama 3.1 8B: D 128, theta 5e5, factor 8, low 1, high 4, orig 8192, so keep below wavelen 2048,
    # divide above 8192. inv_freq[i] = 5e5^(-2i/128) = 5e5^(-i/64):
    #   i = 20: f = 0.016560440080994446, wavelen 379.4 < 2048 -> kept;
    #   i = 30: f = 0.0021311195369119653, wavelen 2948.3026167007256 in [2048, 8192] -> blended with
    #           s = (8192/2948.3026167007256 - 1)/3: f' = (1-s)·f/8 + s·f = 0.0013718935677611381;
    #   i = 40: wavelen 22910.6 > 8192 -> f/8 = 3.428102195952591e-05.
    llama31 = ref.LlamaConfig({
        "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 128256, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
        "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    })
    got = ref.rope_inverse_frequencies(llama31)
    for i, want in ((20, 0.016560440080994446), (30, 0.0013718935677611381), (40, 3.428102195952591e-05)):
        if abs(got[i] - want) > 1e-13 * want:
            failures.append(f"llama3.1 inv_freq[{i}] = {got[i]!r}, hand value {want!r}")
    # rotate_half: dimension i pairs with i + D/2 and rotates by position·f_i.
    config = tiny_config(True)
    rotary = ref.RotaryTable(config, torch.float64)
    cos, sin = rotary.get(5, 1)
    x = torch.arange(1.0, 9.0, dtype=torch.float64).view(1, 1, 1, 8)
    y = ref.apply_rope(x, cos, sin).flatten()
    angle = 5 * 0.04275117875430759
    want_1 = 2.0 * math.cos(angle) - 6.0 * math.sin(angle)   # x1·cos - x5·sin
    want_5 = 6.0 * math.cos(angle) + 2.0 * math.sin(angle)   # x5·cos + x1·sin
    if abs(y[1] - want_1) > 1e-12 or abs(y[5] - want_5) > 1e-12:
        failures.append(f"rotate_half pair (1, 5) at position 5: {float(y[1])}, {float(y[5])} vs {want_1}, {want_5}")
    return failures


def check_loss_definition(model, input_ids, labels):
    """Mean CE over non-ignored shifted targets, computed by a plain loop."""
    with torch.no_grad():
        logits = model.logits(input_ids)
        total, count = 0.0, 0
        for b in range(input_ids.shape[0]):
            for t in range(input_ids.shape[1] - 1):
                target = int(labels[b, t + 1])
                if target == ref.IGNORE_INDEX:
                    continue
                row = logits[b, t]
                total += float(torch.logsumexp(row, 0) - row[target])
                count += 1
        loss_sum, loss_count = ref.cross_entropy_sum(logits, labels)
    if count != loss_count or abs(total / count - float(loss_sum) / loss_count) > 1e-12:
        return [f"loss {float(loss_sum) / loss_count} != loop {total / count} (counts {loss_count}, {count})"]
    return []


def check_gradients(tied, use_rslora, seed):
    generator = torch.Generator().manual_seed(seed)
    config = tiny_config(tied)
    tensors = ref.random_model_tensors(config, generator, std=0.3)
    weights = ref.LlamaWeights(config, tensors, torch.float64)
    adapter = ref.random_adapter(config, rank=4, alpha=8.0, use_rslora=use_rslora, targets=ref.LORA_TARGETS,
                                 dtype=torch.float64, generator=generator, b_std=0.3)
    model = ref.LlamaReference(config, weights, adapter, torch.float64)
    input_ids = torch.randint(0, config.vocab_size, (2, 9), generator=generator)
    labels = input_ids.clone()
    labels[0, 2] = labels[0, 5] = ref.IGNORE_INDEX
    labels[1, :4] = ref.IGNORE_INDEX
    failures = check_loss_definition(model, input_ids, labels)

    params = adapter.parameters()
    for p in params:
        p.requires_grad_(True)
    loss = ref.accumulated_loss_backward(model, input_ids, labels, [[0, 1]])
    grads = {key: tensor.grad.clone() for key, tensor in adapter.named_tensors()}
    for p in params:
        p.requires_grad_(False)

    def loss_at():
        with torch.no_grad():
            loss_sum, count = ref.cross_entropy_sum(model.logits(input_ids), labels)
            return float(loss_sum) / count

    worst = 0.0
    checked = 0
    for key, tensor in adapter.named_tensors():
        if float(grads[key].norm()) == 0.0:
            failures.append(f"{key}: gradient is exactly zero")
        for _ in range(COORDINATES_PER_TENSOR):
            index = tuple(int(torch.randint(0, dim, (1,), generator=generator)) for dim in tensor.shape)
            original = float(tensor[index])
            tensor[index] = original + STEP
            plus = loss_at()
            tensor[index] = original - STEP
            minus = loss_at()
            tensor[index] = original
            estimate = (plus - minus) / (2 * STEP)
            exact = float(grads[key][index])
            error = abs(estimate - exact)
            worst = max(worst, error / (ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * abs(exact)))
            checked += 1
            if error > ABSOLUTE_TOLERANCE + RELATIVE_TOLERANCE * abs(exact):
                failures.append(f"{key}{list(index)}: autograd {exact:.12g} vs finite difference {estimate:.12g}")
    label = f"tied={tied} rslora={use_rslora}"
    print(f"  gradients {label}: loss {loss:.6f}, {checked} coordinates over {len(grads)} LoRA tensors, "
          f"worst error {worst:.3g} of tolerance")
    return failures


def main():
    torch.set_num_threads(1)
    failures = []
    rope_failures = check_rope_scaling()
    print(f"  rope llama3 scaling and rotate_half vs hand values: {'ok' if not rope_failures else 'FAIL'}")
    failures += rope_failures
    failures += check_gradients(tied=True, use_rslora=False, seed=1)
    failures += check_gradients(tied=False, use_rslora=True, seed=2)
    for failure in failures:
        print(f"  FAIL {failure}")
    if failures:
        print(f"fd_check: FAIL ({len(failures)} problems)")
        return 1
    print("fd_check: PASS (rope hand values; float64 central differences match autograd LoRA gradients)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
