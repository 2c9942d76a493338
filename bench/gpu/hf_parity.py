#!/usr/bin/env python3
"""Hugging Face side of the NF4 + PEFT logits parity (issue 6, "must show" 6), run on the GPU machine
by bench/gpu/check.sh, which compares the engine's logits (CUDA, NF4 base, this adapter) with these.

  hf_parity.py MODEL_DIR DEQUANT_DIR ADAPTER_OUT IDS OUT_PREFIX

1. DEQUANT_DIR: MODEL_DIR's model with every block linear weight replaced by dequant(NF4(W)), computed
   by test/reference/nf4_ref.py (bit for bit the engine's quantization; test/nf4.test.ts holds it to
   that): the exact weights the engine computes with, in float32.
2. ADAPTER_OUT: a LoRA made by PEFT on that base (r 8, alpha 16, q/k/v/o/gate/up/down, B ~ N(0, 0.05)
   so it changes the output), saved with save_pretrained.
3. OUT_PREFIX.hf_f32.f32 and OUT_PREFIX.hf_bf16.f32: logits (T x V, float32 little-endian) of
   transformers' LlamaForCausalLM + PeftModel on the GPU, float32 (TF32 off) and bf16.
"""
import json
import os
import shutil
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.numpy import load_file, save_file
from transformers import LlamaForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "test", "reference"))
import nf4_ref  # noqa: E402

BLOCK_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def dequantized_copy(model_dir, out_dir):
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors"):
            shutil.copy(os.path.join(model_dir, name), out_dir)
    for name in os.listdir(model_dir):
        if not name.endswith(".safetensors"):
            continue
        tensors = load_file(os.path.join(model_dir, name))
        for key, w in tensors.items():
            if key.endswith(".weight") and any(f".{t}." in key for t in BLOCK_LINEAR) and w.shape[1] % 64 == 0:
                w32 = w.astype(np.float32)
                codes, _, _, dq, _, _ = nf4_ref.quantize(w32.reshape(-1), w.shape[0], w.shape[1])
                deq = nf4_ref.LEVELS[codes] * np.repeat(dq, nf4_ref.BLOCK)
                tensors[key] = deq.reshape(w.shape).astype(np.float32)
            else:
                tensors[key] = tensors[key].astype(np.float32)
        save_file(tensors, os.path.join(out_dir, name), metadata={"format": "pt"})


def main():
    model_dir, deq_dir, adapter_out, ids_arg, out_prefix = sys.argv[1:6]
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    dequantized_copy(model_dir, deq_dir)
    ids = torch.tensor([[int(x) for x in ids_arg.split(",")]], device="cuda")

    base = LlamaForCausalLM.from_pretrained(deq_dir, torch_dtype=torch.float32, attn_implementation="eager").cuda().eval()
    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM", target_modules=list(BLOCK_LINEAR))
    pm = get_peft_model(base, cfg)
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    pm.save_pretrained(adapter_out)

    with torch.no_grad():
        f32 = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(deq_dir, torch_dtype=torch.float32, attn_implementation="eager").cuda(),
            adapter_out).eval()
        f32(ids).logits[0].float().cpu().numpy().astype("<f4").tofile(out_prefix + ".hf_f32.f32")
        del f32
        bf16 = PeftModel.from_pretrained(
            LlamaForCausalLM.from_pretrained(deq_dir, torch_dtype=torch.bfloat16).cuda(), adapter_out).eval()
        bf16(ids).logits[0].float().cpu().numpy().astype("<f4").tofile(out_prefix + ".hf_bf16.f32")
    print(json.dumps({"hf_parity": "written", "tokens": int(ids.shape[1]), "torch": torch.__version__}))


if __name__ == "__main__":
    main()
