"""PEFT interoperability on a machine that has transformers + PEFT (the GPU machine): an adapter
trained by tuneserve loads in PEFT and gives the engine's logits; an adapter made and saved by PEFT
is written for the engine to load (bench/gpu/peft_roundtrip.sh compares the engine's logits to PEFT's).
  python3 peft_roundtrip.py MODEL_DIR OUR_ADAPTER OUR_LOGITS.f32 IDS PEFT_ADAPTER_OUT PEFT_LOGITS_OUT.f32
"""
import json
import sys

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaForCausalLM

model_dir, ours_dir, ours_logits, ids_arg, peft_out, peft_logits_out = sys.argv[1:7]
ids = torch.tensor([[int(x) for x in ids_arg.split(",")]])
torch.manual_seed(0)

def base():
    m = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    return m.eval()

# 1. tuneserve -> PEFT
with torch.no_grad():
    m = PeftModel.from_pretrained(base(), ours_dir)
    got = m(ids).logits[0].float().numpy()
ref = np.fromfile(ours_logits, dtype=np.float32).reshape(got.shape)
rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
print(json.dumps({"check": "PEFT logits with a tuneserve-trained adapter vs the engine", "relative_l2": rel, "n": int(ref.size)}))

# 2. PEFT -> tuneserve: a LoRA made by PEFT (rslora, all linear modules, non-zero B), saved as PEFT does.
cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, use_rslora=True, task_type="CAUSAL_LM",
                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
pm = get_peft_model(base(), cfg)
with torch.no_grad():
    for name, p in pm.named_parameters():
        if "lora_B" in name:
            p.normal_(0.0, 0.05)
    pm.save_pretrained(peft_out)
    pm.eval()
    pm(ids).logits[0].float().numpy().tofile(peft_logits_out)
print(json.dumps({"check": "PEFT adapter saved", "files": sorted(__import__("os").listdir(peft_out))}))
