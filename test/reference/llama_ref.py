#!/usr/bin/python3
"""Independent PyTorch reference of Hugging Face LlamaForCausalLM + PEFT LoRA, written from the spec
(../../shared/REFERENCE.md), used by the parity tests and by bench/torch_llama.py.

Shape letters: B batch, T tokens, S key positions (cache + new), H hidden, I intermediate, V vocab,
L layers, NH heads, NKV kv heads, D head dim, r rank.

Command line (all input and output through files):
  /usr/bin/python3 test/reference/llama_ref.py --model DIR [--adapter DIR] --batch batch.json
      --out out.safetensors --task logits|loss_grads|train [--dtype float32|float64]
Outputs (safetensors, F32 or F64 by --dtype):
  logits     "logits" [B,T,V]
  loss_grads "loss" [1]; "<PEFT key>.grad" for every LoRA tensor (needs --adapter)
  train      "<PEFT key>" final value of every LoRA tensor; "losses" [N]; "grad_norms" [N]
             (pre-clip global norm); "lrs" [N] (lr used by each optimizer step) (needs --adapter)
batch.json:
  {"input_ids": [[...], ...]            equal-length rows (the caller pads; no attention mask, positions
                                        0..T-1 in every row, as HF called without attention_mask)
   "labels": [[...], ...]               optional, same shape, -100 ignored, unshifted (position t
                                        predicts labels[t+1]); absent = input_ids
   "train": {"steps": N, "lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.0,
             "max_grad_norm": 1.0 (0 = no clipping), "scheduler": "linear" (default, as the HF
             Trainer) | "constant" | "cosine", "warmup_steps": 0, "total_steps": N (default steps),
             "grad_accum": 1, "micro_batches": [[row, ...], ...]}}
Loss: sum of token cross-entropies over the non-ignored targets of the whole accumulated batch divided
by their count (0 targets: loss 0). Optimizer step k (0-based) uses lr·lambda(k) of transformers'
schedule, grad_accum micro-batches micro_batches[(k·grad_accum + j) % len] (default: the rows split
into grad_accum contiguous near-equal groups, so every step sees the whole batch), pre-clip global
norm, torch.nn.utils.clip_grad_norm_, torch.optim.AdamW. No dropout (lora_dropout is ignored).
Exit codes: 0 ok, 2 bad input (message on stderr).
"""

import argparse
import json
import math
import os
import re
import struct
import sys

import numpy as np
import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
PEFT_PREFIX = "base_model.model.model.layers."


class ReferenceInputError(Exception):
    """A problem with an input file, reported with the file and the reason; exit code 2."""


# ---------------------------------------------------------------------------------------------------
# safetensors: 8-byte LE header length N, N bytes of JSON, raw little-endian data.

SAFETENSORS_DTYPES = {  # name -> (numpy storage dtype, bytes per element)
    "F64": (np.dtype("<f8"), 8),
    "F32": (np.dtype("<f4"), 4),
    "F16": (np.dtype("<f2"), 2),
    "BF16": (np.dtype("<u2"), 2),
    "I64": (np.dtype("<i8"), 8),
    "I32": (np.dtype("<i4"), 4),
    "I16": (np.dtype("<i2"), 2),
    "I8": (np.dtype("i1"), 1),
    "U8": (np.dtype("u1"), 1),
    "BOOL": (np.dtype("?"), 1),
}
MAX_HEADER_BYTES = 100_000_000


def bf16_bits_to_float32(bits):
    """bfloat16 is the top half of a float32: widen the 16 bits and shift them into place."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16_bits(values):
    """Round float32 to the nearest bfloat16 (ties to even), as torch's .to(torch.bfloat16) does."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    return (rounded >> np.uint32(16)).astype(np.uint16)


def _reject_duplicates(pairs):
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate tensor name {key!r}")
        seen[key] = value
    return seen


def read_safetensors(path):
    """Returns {name: numpy array}; BF16 comes back as float32, other dtypes as stored.
    Rejects what the reference reader rejects (REFERENCE.md, safetensors)."""
    with open(path, "rb") as handle:
        blob = handle.read()
    if len(blob) < 8:
        raise ReferenceInputError(f"{path}: file is {len(blob)} bytes, under the 8-byte header length")
    (header_len,) = struct.unpack("<Q", blob[:8])
    if header_len > MAX_HEADER_BYTES:
        raise ReferenceInputError(f"{path}: header length {header_len} exceeds {MAX_HEADER_BYTES}")
    if 8 + header_len > len(blob):
        raise ReferenceInputError(f"{path}: header of {header_len} bytes runs past the end of the file")
    try:
        header = json.loads(blob[8:8 + header_len].decode("utf-8"), object_pairs_hook=_reject_duplicates)
    except (UnicodeDecodeError, ValueError) as error:
        raise ReferenceInputError(f"{path}: header is not valid UTF-8 JSON: {error}") from None
    if not isinstance(header, dict):
        raise ReferenceInputError(f"{path}: header is not a JSON object")
    header.pop("__metadata__", None)
    data = memoryview(blob)[8 + header_len:]
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
            raise ReferenceInputError(f"{path}: tensor {name!r} lacks dtype, shape or data_offsets")
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ReferenceInputError(f"{path}: tensor {name!r} has unsupported dtype {info['dtype']!r}")
        begin, end = info["data_offsets"]
        if not (isinstance(begin, int) and isinstance(end, int)) or end < begin or begin < 0:
            raise ReferenceInputError(f"{path}: tensor {name!r} has bad data_offsets {info['data_offsets']}")
        entries.append((begin, end, name, info))
    entries.sort(key=lambda entry: (entry[0], entry[1]))
    expected_begin = 0
    tensors = {}
    for begin, end, name, info in entries:
        if begin != expected_begin:
            raise ReferenceInputError(f"{path}: tensor {name!r} starts at {begin}, expected {expected_begin} (offsets not contiguous)")
        storage, width = SAFETENSORS_DTYPES[info["dtype"]]
        shape = [int(dim) for dim in info["shape"]]
        if any(dim < 0 for dim in shape):
            raise ReferenceInputError(f"{path}: tensor {name!r} has a negative dimension {shape}")
        count = math.prod(shape)
        if count * width != end - begin:
            raise ReferenceInputError(f"{path}: tensor {name!r} shape {shape} x {width} bytes != {end - begin} bytes")
        if end > len(data):
            raise ReferenceInputError(f"{path}: tensor {name!r} runs past the end of the file")
        array = np.frombuffer(data[begin:end], dtype=storage, count=count).reshape(shape)
        tensors[name] = bf16_bits_to_float32(array) if info["dtype"] == "BF16" else array
        expected_begin = end
    if expected_begin != len(data):
        raise ReferenceInputError(f"{path}: data ends at {expected_begin} but the file has {len(data)} data bytes")
    return tensors


def write_safetensors(path, tensors, dtype="F32", metadata=None):
    """Writes {name: array-like} as `dtype` (F64, F32, F16 or BF16); header padded to a multiple of 8."""
    header = {}
    chunks = []
    offset = 0
    for name, value in tensors.items():
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().double().numpy()
        value = np.asarray(value)
        if dtype == "BF16":
            raw = float32_to_bf16_bits(value.astype(np.float32)).tobytes()
        else:
            raw = np.ascontiguousarray(value.astype(SAFETENSORS_DTYPES[dtype][0])).tobytes()
        header[name] = {"dtype": dtype, "shape": list(value.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    if metadata:
        header["__metadata__"] = metadata
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(text)))
        handle.write(text)
        for raw in chunks:
            handle.write(raw)


# ---------------------------------------------------------------------------------------------------
# Model configuration and files.

class LlamaConfig:
    """The config.json fields a Llama 3 forward pass needs, with Hugging Face's defaults."""

    def __init__(self, fields, source="config.json"):
        def need(name):
            if name not in fields or fields[name] is None:
                raise ReferenceInputError(f"{source}: missing field {name!r}")
            return fields[name]

        self.hidden_size = int(need("hidden_size"))                                  # H
        self.intermediate_size = int(need("intermediate_size"))                      # I
        self.num_hidden_layers = int(need("num_hidden_layers"))                      # L
        self.num_attention_heads = int(need("num_attention_heads"))                  # NH
        self.num_key_value_heads = int(fields.get("num_key_value_heads") or self.num_attention_heads)  # NKV
        self.head_dim = int(fields.get("head_dim") or self.hidden_size // self.num_attention_heads)   # D
        self.vocab_size = int(need("vocab_size"))                                    # V
        self.rms_norm_eps = float(fields.get("rms_norm_eps", 1e-6))
        self.rope_theta = float(fields.get("rope_theta", 10000.0))
        self.rope_scaling = fields.get("rope_scaling")
        self.tie_word_embeddings = bool(fields.get("tie_word_embeddings", False))
        if self.num_attention_heads % self.num_key_value_heads != 0:
            raise ReferenceInputError(f"{source}: num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}")
        if self.head_dim % 2 != 0:
            raise ReferenceInputError(f"{source}: head_dim {self.head_dim} is odd")
        if self.rope_scaling is not None:
            rope_type = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if rope_type not in ("llama3", "default"):
                raise ReferenceInputError(f"{source}: rope_scaling type {rope_type!r} is not supported (llama3 or null)")
            if rope_type == "default":
                self.rope_scaling = None

    def to_dict(self):
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama",
            "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "rope_scaling": self.rope_scaling, "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu", "bos_token_id": 128000, "eos_token_id": 128001,
            "max_position_embeddings": 131072, "torch_dtype": "float32",
        }


def read_model_tensors(model_dir):
    """All tensors of a Hugging Face folder: model.safetensors or the shards of its index."""
    index_path = os.path.join(model_dir, "model.safetensors.index.json")
    single_path = os.path.join(model_dir, "model.safetensors")
    if os.path.exists(index_path):
        with open(index_path, encoding="utf-8") as handle:
            weight_map = json.load(handle).get("weight_map")
        if not isinstance(weight_map, dict):
            raise ReferenceInputError(f"{index_path}: no weight_map object")
        tensors = {}
        for shard in sorted(set(weight_map.values())):
            for name, array in read_safetensors(os.path.join(model_dir, shard)).items():
                if weight_map.get(name) == shard:
                    tensors[name] = array
        missing = sorted(set(weight_map) - set(tensors))
        if missing:
            raise ReferenceInputError(f"{index_path}: tensors listed but absent from their shard: {missing[:5]}")
        return tensors
    if os.path.exists(single_path):
        return read_safetensors(single_path)
    raise ReferenceInputError(f"{model_dir}: neither model.safetensors nor model.safetensors.index.json")


def load_model(model_dir, dtype):
    """Returns (LlamaConfig, LlamaWeights) with every weight in `dtype` (float32 or float64)."""
    config_path = os.path.join(model_dir, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = LlamaConfig(json.load(handle), config_path)
    return config, LlamaWeights(config, read_model_tensors(model_dir), dtype, model_dir)


class LlamaWeights:
    """Frozen base weights, HF layout: linear weights [out, in]."""

    def __init__(self, config, tensors, dtype, source="model"):
        c = config
        q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
        expected = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size), "model.norm.weight": (c.hidden_size,)}
        if not c.tie_word_embeddings:
            expected["lm_head.weight"] = (c.vocab_size, c.hidden_size)
        for layer in range(c.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            expected.update({
                prefix + "self_attn.q_proj.weight": (q_out, c.hidden_size),
                prefix + "self_attn.k_proj.weight": (kv_out, c.hidden_size),
                prefix + "self_attn.v_proj.weight": (kv_out, c.hidden_size),
                prefix + "self_attn.o_proj.weight": (c.hidden_size, q_out),
                prefix + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
                prefix + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
                prefix + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
                prefix + "input_layernorm.weight": (c.hidden_size,),
                prefix + "post_attention_layernorm.weight": (c.hidden_size,),
            })
        self.tensors = {}
        for name, shape in expected.items():
            if name not in tensors:
                raise ReferenceInputError(f"{source}: missing weight {name}")
            if tuple(tensors[name].shape) != shape:
                raise ReferenceInputError(f"{source}: weight {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
            self.tensors[name] = torch.from_numpy(np.array(tensors[name])).to(dtype)
        if c.tie_word_embeddings:
            self.tensors["lm_head.weight"] = self.tensors["model.embed_tokens.weight"]

    def __getitem__(self, name):
        return self.tensors[name]


# ---------------------------------------------------------------------------------------------------
# LoRA adapter (PEFT semantics).

class LoraAdapter:
    """LoRA tensors keyed (layer, module) -> (A [r, in], B [out, r]) plus the scale s."""

    def __init__(self, rank, alpha, use_rslora, pairs):
        self.rank = rank
        self.alpha = alpha
        self.use_rslora = use_rslora
        self.scale = alpha / math.sqrt(rank) if use_rslora else alpha / rank   # s
        self.pairs = pairs                                                      # {(layer, module): (A, B)}

    @staticmethod
    def peft_key(layer, module, which):
        group = "self_attn" if module in ATTENTION_TARGETS else "mlp"
        return f"{PEFT_PREFIX}{layer}.{group}.{module}.lora_{which}.weight"

    def named_tensors(self):
        """[(PEFT key, tensor)] in a fixed order: layer, module, A then B."""
        out = []
        for (layer, module) in sorted(self.pairs, key=lambda key: (key[0], LORA_TARGETS.index(key[1]))):
            lora_a, lora_b = self.pairs[(layer, module)]
            out.append((self.peft_key(layer, module, "A"), lora_a))
            out.append((self.peft_key(layer, module, "B"), lora_b))
        return out

    def parameters(self):
        return [tensor for _, tensor in self.named_tensors()]


ADAPTER_KEY = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_(A|B)(?:\.default)?\.weight$")


def load_adapter(adapter_dir, config, dtype):
    """Reads a PEFT folder; the tensors present decide which (layer, module) pairs carry LoRA."""
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    with open(config_path, encoding="utf-8") as handle:
        fields = json.load(handle)
    for name in ("r", "lora_alpha"):
        if name not in fields:
            raise ReferenceInputError(f"{config_path}: missing field {name!r}")
    if fields.get("use_dora"):
        raise ReferenceInputError(f"{config_path}: use_dora is not supported by the reference")
    if fields.get("rank_pattern") or fields.get("alpha_pattern"):
        raise ReferenceInputError(f"{config_path}: rank_pattern / alpha_pattern are not supported by the reference")
    if fields.get("bias", "none") != "none":
        raise ReferenceInputError(f"{config_path}: bias {fields['bias']!r} is not supported (only 'none')")
    if float(fields.get("lora_dropout") or 0.0) > 0.0:
        print(f"llama_ref: note: lora_dropout {fields['lora_dropout']} ignored (the reference has no dropout)", file=sys.stderr)
    rank = int(fields["r"])
    tensors_path = os.path.join(adapter_dir, "adapter_model.safetensors")
    halves = {}
    for key, array in read_safetensors(tensors_path).items():
        match = ADAPTER_KEY.match(key)
        if not match:
            raise ReferenceInputError(f"{tensors_path}: unexpected tensor {key}")
        layer, group, module, which = int(match[1]), match[2], match[3], match[4]
        if module not in LORA_TARGETS or (group == "self_attn") != (module in ATTENTION_TARGETS):
            raise ReferenceInputError(f"{tensors_path}: unknown LoRA module in {key}")
        if layer >= config.num_hidden_layers:
            raise ReferenceInputError(f"{tensors_path}: {key} names layer {layer} but the model has {config.num_hidden_layers}")
        halves[(layer, module, which)] = (key, array)
    pairs = {}
    for (layer, module, which) in list(halves):
        if which != "A":
            continue
        if (layer, module, "B") not in halves:
            raise ReferenceInputError(f"{tensors_path}: lora_A of layer {layer} {module} has no lora_B")
        in_features, out_features = linear_shape(config, module)
        key_a, array_a = halves[(layer, module, "A")]
        key_b, array_b = halves[(layer, module, "B")]
        if tuple(array_a.shape) != (rank, in_features):
            raise ReferenceInputError(f"{tensors_path}: {key_a} has shape {list(array_a.shape)}, expected {[rank, in_features]}")
        if tuple(array_b.shape) != (out_features, rank):
            raise ReferenceInputError(f"{tensors_path}: {key_b} has shape {list(array_b.shape)}, expected {[out_features, rank]}")
        pairs[(layer, module)] = tuple(torch.from_numpy(np.array(a)).to(dtype) for a in (array_a, array_b))
    if len(pairs) * 2 != len(halves):
        raise ReferenceInputError(f"{tensors_path}: a lora_B has no lora_A")
    return LoraAdapter(rank, float(fields["lora_alpha"]), bool(fields.get("use_rslora", False)), pairs)


def save_adapter(adapter_dir, adapter, target_modules=None, dtype="F32"):
    """Writes a PEFT folder (the fields PEFT writes, REFERENCE.md) from a LoraAdapter."""
    os.makedirs(adapter_dir, exist_ok=True)
    modules = target_modules or sorted({module for _, module in adapter.pairs}, key=LORA_TARGETS.index)
    fields = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": adapter.rank, "lora_alpha": adapter.alpha,
        "lora_dropout": 0.0, "target_modules": modules, "bias": "none", "use_rslora": adapter.use_rslora,
        "use_dora": False, "fan_in_fan_out": False, "init_lora_weights": True, "modules_to_save": None,
        "rank_pattern": {}, "alpha_pattern": {}, "layers_to_transform": None,
        "base_model_name_or_path": None, "inference_mode": True, "revision": None,
    }
    with open(os.path.join(adapter_dir, "adapter_config.json"), "w", encoding="utf-8") as handle:
        json.dump(fields, handle, indent=2)
    write_safetensors(os.path.join(adapter_dir, "adapter_model.safetensors"), dict(adapter.named_tensors()), dtype)


def linear_shape(config, module):
    """(in, out) features of a projection."""
    c = config
    q_out, kv_out = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    return {
        "q_proj": (c.hidden_size, q_out), "k_proj": (c.hidden_size, kv_out), "v_proj": (c.hidden_size, kv_out),
        "o_proj": (q_out, c.hidden_size), "gate_proj": (c.hidden_size, c.intermediate_size),
        "up_proj": (c.hidden_size, c.intermediate_size), "down_proj": (c.intermediate_size, c.hidden_size),
    }[module]


def random_adapter(config, rank, alpha, use_rslora, targets, dtype, generator, b_std=0.0):
    """PEFT init: A kaiming-uniform (a=sqrt(5)) i.e. U(-1/sqrt(in), 1/sqrt(in)); B zero, or N(0, b_std)."""
    pairs = {}
    for layer in range(config.num_hidden_layers):
        for module in targets:
            in_features, out_features = linear_shape(config, module)
            bound = 1.0 / math.sqrt(in_features)
            lora_a = (torch.rand(rank, in_features, generator=generator, dtype=torch.float64) * 2 - 1) * bound
            lora_b = torch.randn(out_features, rank, generator=generator, dtype=torch.float64) * b_std
            pairs[(layer, module)] = (lora_a.to(dtype), lora_b.to(dtype))
    return LoraAdapter(rank, alpha, use_rslora, pairs)


def random_model_tensors(config, generator, std=0.02):
    """Random weights in the HF layout (norm weights near 1), float32 numpy arrays."""
    c = config
    def normal(*shape):
        return (torch.randn(*shape, generator=generator, dtype=torch.float64) * std).float().numpy()
    def near_one(size):
        return (1.0 + 0.1 * torch.randn(size, generator=generator, dtype=torch.float64)).float().numpy()
    tensors = {"model.embed_tokens.weight": normal(c.vocab_size, c.hidden_size)}
    for layer in range(c.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        tensors[prefix + "input_layernorm.weight"] = near_one(c.hidden_size)
        for module in LORA_TARGETS:
            in_features, out_features = linear_shape(c, module)
            group = "self_attn" if module in ATTENTION_TARGETS else "mlp"
            tensors[f"{prefix}{group}.{module}.weight"] = normal(out_features, in_features)
        tensors[prefix + "post_attention_layernorm.weight"] = near_one(c.hidden_size)
    tensors["model.norm.weight"] = near_one(c.hidden_size)
    if not c.tie_word_embeddings:
        tensors["lm_head.weight"] = normal(c.vocab_size, c.hidden_size)
    return tensors


def write_model_folder(model_dir, config, tensors, dtype="F32", shards=1):
    """A Hugging Face folder: config.json plus model.safetensors (or `shards` files and an index)."""
    os.makedirs(model_dir, exist_ok=True)
    with open(os.path.join(model_dir, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config.to_dict(), handle, indent=2)
    if shards <= 1:
        write_safetensors(os.path.join(model_dir, "model.safetensors"), tensors, dtype)
        return
    names = list(tensors)
    weight_map = {}
    for shard in range(shards):
        file_name = f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: tensors[name] for name in names[shard::shards]}
        write_safetensors(os.path.join(model_dir, file_name), part, dtype)
        weight_map.update({name: file_name for name in part})
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w", encoding="utf-8") as handle:
        json.dump({"metadata": {}, "weight_map": weight_map}, handle, indent=2)


# ---------------------------------------------------------------------------------------------------
# Layers.

def rope_inverse_frequencies(config):
    """inv_freq [D/2] in float64: theta^(-2i/D), then the "llama3" rule of REFERENCE.md when set."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq
    factor = float(scaling["factor"])
    low_freq_factor = float(scaling["low_freq_factor"])
    high_freq_factor = float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    low_freq_wavelen = original / low_freq_factor
    high_freq_wavelen = original / high_freq_factor
    out = np.empty_like(inv_freq)
    for i, frequency in enumerate(inv_freq):
        wavelen = 2 * math.pi / frequency
        if wavelen < high_freq_wavelen:
            out[i] = frequency
        elif wavelen > low_freq_wavelen:
            out[i] = frequency / factor
        else:
            smooth = (original / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
            out[i] = (1 - smooth) * frequency / factor + smooth * frequency
    return out


class RotaryTable:
    """cos/sin [positions, D] (angles computed in float64, cast to the compute dtype), grown on demand."""

    def __init__(self, config, dtype):
        self.inv_freq = rope_inverse_frequencies(config)
        self.dtype = dtype
        self.cos = self.sin = torch.empty(0, config.head_dim, dtype=dtype)

    def get(self, start, length):
        if start + length > self.cos.shape[0]:
            positions = np.arange(max(2 * (start + length), 64), dtype=np.float64)
            angles = np.outer(positions, self.inv_freq)
            angles = np.concatenate([angles, angles], axis=1)                  # [P, D]
            self.cos = torch.from_numpy(np.cos(angles)).to(self.dtype)
            self.sin = torch.from_numpy(np.sin(angles)).to(self.dtype)
        return self.cos[start:start + length], self.sin[start:start + length]


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x, cos, sin):
    """x [B, heads, T, D]; cos/sin [T, D]; dimension i pairs with i + D/2 (rotate_half convention)."""
    return x * cos + rotate_half(x) * sin


def rmsnorm(x, weight, eps):
    """x * rsqrt(mean(x^2) + eps) * w over the last axis (x is already float32/float64)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def lora_linear(x, weight, lora, scale):
    """The one place LoRA is applied: y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ; lora is (A [r,in], B [out,r]) or None."""
    y = F.linear(x, weight)
    if lora is not None:
        lora_a, lora_b = lora
        y = y + F.linear(F.linear(x, lora_a), lora_b) * scale
    return y


class KVCache:
    """Per-layer keys and values [B, NKV, capacity, D]; `length` positions are filled."""

    def __init__(self, config, batch, capacity, dtype):
        shape = (batch, config.num_key_value_heads, capacity, config.head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.values = [torch.zeros(shape, dtype=dtype) for _ in range(config.num_hidden_layers)]
        self.length = 0


class LlamaReference:
    """LlamaForCausalLM forward with optional PEFT LoRA and optional KV cache."""

    def __init__(self, config, weights, adapter=None, dtype=torch.float32):
        self.config = config
        self.weights = weights
        self.adapter = adapter
        self.dtype = dtype
        self.rotary = RotaryTable(config, dtype)

    def linear(self, x, layer, group, module):
        lora = self.adapter.pairs.get((layer, module)) if self.adapter is not None else None
        scale = self.adapter.scale if self.adapter is not None else 0.0
        return lora_linear(x, self.weights[f"model.layers.{layer}.{group}.{module}.weight"], lora, scale)

    def attention(self, x, layer, cos, sin, cache, start):
        """x [B, T, H] -> [B, T, H]; causal grouped-query attention over cache + new positions."""
        c = self.config
        batch, tokens, _ = x.shape
        group_size = c.num_attention_heads // c.num_key_value_heads
        q = self.linear(x, layer, "self_attn", "q_proj").view(batch, tokens, c.num_attention_heads, c.head_dim).transpose(1, 2)
        k = self.linear(x, layer, "self_attn", "k_proj").view(batch, tokens, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        v = self.linear(x, layer, "self_attn", "v_proj").view(batch, tokens, c.num_key_value_heads, c.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)              # [B, NH, T, D], [B, NKV, T, D]
        if cache is not None:
            cache.keys[layer][:, :, start:start + tokens] = k
            cache.values[layer][:, :, start:start + tokens] = v
            k = cache.keys[layer][:, :, :start + tokens]
            v = cache.values[layer][:, :, :start + tokens]                   # [B, NKV, S, D]
        keys = k.shape[2]
        # Query head h reads kv head h // group_size (HF repeat_kv): stack each group's queries.
        q = q.reshape(batch, c.num_key_value_heads, group_size * tokens, c.head_dim)
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(c.head_dim)  # [B, NKV, group*T, S]
        if tokens > 1:
            query_positions = torch.arange(start, start + tokens).repeat(group_size)
            future = torch.arange(keys)[None, :] > query_positions[:, None]   # [group*T, S]
            scores = scores.masked_fill(future, float("-inf"))
        probs = torch.softmax(scores, dim=-1)
        out = torch.matmul(probs, v)                                           # [B, NKV, group*T, D]
        out = out.reshape(batch, c.num_attention_heads, tokens, c.head_dim).transpose(1, 2)
        return self.linear(out.reshape(batch, tokens, c.num_attention_heads * c.head_dim), layer, "self_attn", "o_proj")

    def mlp(self, x, layer):
        gate = self.linear(x, layer, "mlp", "gate_proj")
        up = self.linear(x, layer, "mlp", "up_proj")
        return self.linear(F.silu(gate) * up, layer, "mlp", "down_proj")

    def hidden_states(self, input_ids, cache=None):
        """input_ids [B, T] (positions cache.length .. +T-1, or 0..T-1) -> final-norm output [B, T, H]."""
        c = self.config
        start = cache.length if cache is not None else 0
        cos, sin = self.rotary.get(start, input_ids.shape[1])
        x = F.embedding(input_ids, self.weights["model.embed_tokens.weight"])
        for layer in range(c.num_hidden_layers):
            prefix = f"model.layers.{layer}."
            h = rmsnorm(x, self.weights[prefix + "input_layernorm.weight"], c.rms_norm_eps)
            x = x + self.attention(h, layer, cos, sin, cache, start)
            h = rmsnorm(x, self.weights[prefix + "post_attention_layernorm.weight"], c.rms_norm_eps)
            x = x + self.mlp(h, layer)
        if cache is not None:
            cache.length = start + input_ids.shape[1]
        return rmsnorm(x, self.weights["model.norm.weight"], c.rms_norm_eps)

    def logits(self, input_ids, cache=None):
        """[B, T, V]."""
        return F.linear(self.hidden_states(input_ids, cache), self.weights["lm_head.weight"])


def cross_entropy_sum(logits, labels):
    """HF causal-LM loss pieces: logits[:, :-1] predict labels[:, 1:]; returns (sum of CE over
    non-ignored targets, their count)."""
    vocab = logits.shape[-1]
    targets = labels[:, 1:].reshape(-1)
    loss_sum = F.cross_entropy(logits[:, :-1].reshape(-1, vocab), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss_sum, int((targets != IGNORE_INDEX).sum())


def count_targets(labels):
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


# ---------------------------------------------------------------------------------------------------
# Training: AdamW (torch), global-norm clipping, transformers' LambdaLR schedules, accumulation.

def lr_multiplier(scheduler, step, warmup_steps, total_steps):
    """transformers' get_{constant,linear,cosine}_schedule_with_warmup lambdas at `step` (the count
    of optimizer steps done before this one)."""
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if scheduler == "constant":
        return 1.0
    if scheduler == "linear":
        return max(0.0, float(total_steps - step) / float(max(1, total_steps - warmup_steps)))
    if scheduler == "cosine":
        progress = float(step - warmup_steps) / float(max(1, total_steps - warmup_steps))
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))
    raise ReferenceInputError(f"batch.json: unknown scheduler {scheduler!r} (constant, linear or cosine)")


def global_grad_norm(params):
    grads = [p.grad.detach() for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    return torch.norm(torch.stack([torch.norm(g, 2.0) for g in grads]), 2.0)


def accumulated_loss_backward(model, input_ids, labels, micro_batches):
    """One optimizer step's gradients: sum over micro-batches of CE sums / total target count.
    Returns the loss (float)."""
    total_count = sum(count_targets(labels[rows]) for rows in micro_batches)
    denominator = max(total_count, 1)           # no targets at all: loss 0, zero gradients
    total = 0.0
    for rows in micro_batches:
        loss_sum, _ = cross_entropy_sum(model.logits(input_ids[rows]), labels[rows])
        (loss_sum / denominator).backward()
        total += float(loss_sum)
    return total / denominator


def train(model, input_ids, labels, options):
    """Runs options["steps"] optimizer steps; returns (losses, grad_norms, lrs) as float lists.

    Step k uses grad_accum consecutive micro-batches, cycling through `micro_batches`
    (k*grad_accum + j modulo their count). Without micro_batches the rows are split into grad_accum
    contiguous near-equal groups, so every step sees the whole batch."""
    steps = int(options.get("steps", 1))
    base_lr = float(options.get("lr", 2e-4))
    betas = tuple(float(b) for b in options.get("betas", (0.9, 0.999)))
    eps = float(options.get("eps", 1e-8))
    weight_decay = float(options.get("weight_decay", 0.0))
    max_grad_norm = float(options.get("max_grad_norm", 1.0))
    scheduler = options.get("scheduler", "linear")
    warmup_steps = int(options.get("warmup_steps", 0))
    total_steps = int(options.get("total_steps", steps))
    grad_accum = int(options.get("grad_accum", 1))
    if grad_accum < 1 or steps < 0:
        raise ReferenceInputError("batch.json: train.grad_accum must be >= 1 and train.steps >= 0")
    micro_batches = options.get("micro_batches")
    if micro_batches is None:
        micro_batches = [chunk.tolist() for chunk in np.array_split(np.arange(input_ids.shape[0]), grad_accum) if len(chunk)]
    for rows in micro_batches:
        if not rows or any(not (0 <= int(r) < input_ids.shape[0]) for r in rows):
            raise ReferenceInputError(f"batch.json: micro-batch {rows} is empty or names a row outside the batch")
    params = model.adapter.parameters()
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=base_lr, betas=betas, eps=eps, weight_decay=weight_decay)
    losses, grad_norms, lrs = [], [], []
    for step in range(steps):
        for p in params:
            p.grad = None
        chosen = [micro_batches[(step * grad_accum + j) % len(micro_batches)] for j in range(grad_accum)]
        losses.append(accumulated_loss_backward(model, input_ids, labels, chosen))
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if max_grad_norm > 0:
            norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
        else:
            norm = global_grad_norm(params)
        grad_norms.append(float(norm))
        lr = base_lr * lr_multiplier(scheduler, step, warmup_steps, total_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        lrs.append(lr)
        optimizer.step()
    return losses, grad_norms, lrs


# ---------------------------------------------------------------------------------------------------
# Command line.

def read_batch(path, vocab_size):
    with open(path, encoding="utf-8") as handle:
        batch = json.load(handle)
    if "input_ids" not in batch:
        raise ReferenceInputError(f"{path}: missing input_ids")
    rows = batch["input_ids"]
    if not rows or len({len(row) for row in rows}) != 1 or len(rows[0]) == 0:
        raise ReferenceInputError(f"{path}: input_ids must be a non-empty list of equal-length non-empty rows")
    input_ids = torch.tensor(rows, dtype=torch.long)                      # [B, T]
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise ReferenceInputError(f"{path}: input_ids outside [0, {vocab_size})")
    labels = torch.tensor(batch["labels"], dtype=torch.long) if batch.get("labels") is not None else input_ids.clone()
    if labels.shape != input_ids.shape:
        raise ReferenceInputError(f"{path}: labels shape {list(labels.shape)} differs from input_ids {list(input_ids.shape)}")
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ReferenceInputError(f"{path}: labels must be -100 or in [0, {vocab_size})")
    return input_ids, labels, batch.get("train") or {}


def main(argv=None):
    parser = argparse.ArgumentParser(description="PyTorch reference of LlamaForCausalLM + PEFT LoRA")
    parser.add_argument("--model", required=True, help="Hugging Face model folder")
    parser.add_argument("--adapter", help="PEFT adapter folder (required for loss_grads and train)")
    parser.add_argument("--batch", required=True, help="batch.json")
    parser.add_argument("--out", required=True, help="output .safetensors")
    parser.add_argument("--task", required=True, choices=("logits", "loss_grads", "train"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    args = parser.parse_args(argv)
    dtype = torch.float32 if args.dtype == "float32" else torch.float64
    out_dtype = "F32" if args.dtype == "float32" else "F64"
    torch.set_num_threads(os.cpu_count() or 1)

    config, weights = load_model(args.model, dtype)
    adapter = load_adapter(args.adapter, config, dtype) if args.adapter else None
    if args.task != "logits" and adapter is None:
        raise ReferenceInputError(f"--task {args.task} needs --adapter (gradients are taken w.r.t. LoRA tensors)")
    input_ids, labels, train_options = read_batch(args.batch, config.vocab_size)
    model = LlamaReference(config, weights, adapter, dtype)

    if args.task == "logits":
        with torch.no_grad():
            write_safetensors(args.out, {"logits": model.logits(input_ids)}, out_dtype)
    elif args.task == "loss_grads":
        params = adapter.parameters()
        for p in params:
            p.requires_grad_(True)
        loss = accumulated_loss_backward(model, input_ids, labels, [list(range(input_ids.shape[0]))])
        out = {"loss": torch.tensor([loss], dtype=torch.float64)}
        for key, tensor in adapter.named_tensors():
            out[key + ".grad"] = tensor.grad if tensor.grad is not None else torch.zeros_like(tensor)
        write_safetensors(args.out, out, out_dtype)
    else:
        losses, grad_norms, lrs = train(model, input_ids, labels, train_options)
        out = dict(adapter.named_tensors())
        out["losses"] = torch.tensor(losses, dtype=torch.float64)
        out["grad_norms"] = torch.tensor(grad_norms, dtype=torch.float64)
        out["lrs"] = torch.tensor(lrs, dtype=torch.float64)
        write_safetensors(args.out, out, out_dtype)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (ReferenceInputError, OSError, json.JSONDecodeError) as error:
        print(f"llama_ref: error: {error}", file=sys.stderr)
        sys.exit(2)
