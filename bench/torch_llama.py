#!/usr/bin/python3
"""PyTorch eager float32 baseline for the CPU benchmark: LoRA training step tokens/s and greedy decode
tokens/s (KV cache) on a Hugging Face Llama folder, using the model code of
test/reference/llama_ref.py. PyTorch gets its best: every core (torch and OpenBLAS threads), an
optimized BLAS (refuses to report, exit code 3, when OpenBLAS is not the loaded BLAS), no autograd
while decoding.

  /usr/bin/python3 bench/torch_llama.py --model DIR [--batch 4 --seq-len 128 --steps 5 --warmup 2
      --prompt-len 32 --new-tokens 64 --rank 16 --alpha 32 --max-grad-norm 1.0 --decode-without-adapter]

Work measured (the engine's benchmark must time the same):
  train  one optimizer step = forward of B x T random tokens (labels = input ids, HF shift), mean CE
         over the full vocabulary, backward to the LoRA tensors only (base frozen), global-norm clip,
         AdamW step. LoRA r=16, alpha 32 on q,k,v,o,gate,up,down of every layer.
         train_tokens_per_s = B*T*steps / time of `steps` steps (after `warmup` untimed steps).
  decode batch 1: prefill P prompt tokens into the KV cache (timed apart: prefill_tokens_per_s), then
         N single-token forward steps, each feeding the previous greedy (argmax) token.
         decode_tokens_per_s = N / time of those N steps. The LoRA adapter stays unmerged and active
         (as when serving an adapter) unless --decode-without-adapter.
Prints diagnostics on stderr and one JSON line on stdout:
  {"train_tokens_per_s", "decode_tokens_per_s", "prefill_tokens_per_s", "threads", "blas", ...}
"""

import argparse
import ctypes
import json
import os
import re
import subprocess
import sys
import time

EXIT_NO_OPTIMIZED_BLAS = 3
AVX512_FLAGS = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"}
AVX512_CORES = {"SkylakeX", "Cooperlake", "SapphireRapids"}
AVX2_CORES = AVX512_CORES | {"Haswell", "Zen"}


def default_openblas_core():
    """The kernel set OpenBLAS picks by itself, asked in a child process (this one must not load it yet)."""
    probe = ("import ctypes\n"
             "library = ctypes.CDLL('libblas.so.3')\n"
             "name = getattr(library, 'openblas_get_corename', None)\n"
             "if name is not None:\n"
             "    name.restype = ctypes.c_char_p\n"
             "    print(name().decode())\n")
    try:
        return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def choose_openblas_core():
    """OpenBLAS 0.3.21 does not know some newer CPUs (a Sapphire Rapids under KVM is detected as
    "Prescott", SSE3 kernels, ~7x slower). When the detected kernels are weaker than the CPU's flags,
    force the matching ones with OPENBLAS_CORETYPE before torch loads OpenBLAS. Returns a note."""
    if "OPENBLAS_CORETYPE" in os.environ:
        return f"OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']} set by the caller"
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            flags = next((line.split(":", 1)[1].split() for line in handle if line.startswith("flags")), [])
    except OSError:
        return "no /proc/cpuinfo"
    detected = default_openblas_core()
    if not detected:
        return "OpenBLAS core unknown"
    if AVX512_FLAGS <= set(flags) and detected not in AVX512_CORES:
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"
    elif {"avx2", "fma"} <= set(flags) and detected not in AVX2_CORES:
        os.environ["OPENBLAS_CORETYPE"] = "Haswell"
    else:
        return f"autodetected core {detected}"
    return f"autodetected core {detected} is weaker than the CPU: forced OPENBLAS_CORETYPE={os.environ['OPENBLAS_CORETYPE']}"


OPENBLAS_CORE_NOTE = choose_openblas_core()

import torch  # noqa: E402  (after OPENBLAS_CORETYPE is settled)

sys.dont_write_bytecode = True  # importing llama_ref must not leave __pycache__ in the tree
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "test", "reference"))
import llama_ref as ref  # noqa: E402


def loaded_blas_libraries():
    """Paths of the BLAS libraries mapped into this process (after torch has run a matmul)."""
    with open("/proc/self/maps", encoding="utf-8") as handle:
        paths = {line.split()[-1] for line in handle if len(line.split()) >= 6}
    return sorted(path for path in paths if "blas" in os.path.basename(path).lower())


def torch_blas_info():
    match = re.search(r"BLAS_INFO=([^,\s]+)", torch.__config__.show())
    return f"BLAS_INFO={match[1] if match else '?'}"


def ensure_openblas(threads):
    """Returns a description of the loaded OpenBLAS and sets its thread count; exits 3 without it."""
    torch.ones(64, 64) @ torch.ones(64, 64)       # make sure the BLAS is loaded
    libraries = loaded_blas_libraries()
    openblas = [path for path in libraries if "openblas" in os.path.basename(path).lower()]
    print(f"torch {torch.__version__}, {torch_blas_info()}, BLAS libraries mapped: {libraries or 'none'}", file=sys.stderr)
    if not openblas:
        print("torch_llama: REFUSING TO REPORT: OpenBLAS is not loaded, so PyTorch would run on the slow "
              "reference BLAS and the comparison would be dishonest. Install it: apt-get install -y "
              "libopenblas0-pthread (and make libblas.so.3 point at it with update-alternatives).", file=sys.stderr)
        sys.exit(EXIT_NO_OPTIMIZED_BLAS)
    library = ctypes.CDLL(openblas[0])
    blas_threads = None
    core = "?"
    if hasattr(library, "openblas_set_num_threads"):
        library.openblas_set_num_threads(threads)
        blas_threads = library.openblas_get_num_threads()
    if hasattr(library, "openblas_get_corename"):
        library.openblas_get_corename.restype = ctypes.c_char_p
        core = library.openblas_get_corename().decode()
    print(f"OpenBLAS core {core} ({OPENBLAS_CORE_NOTE}), {blas_threads} threads", file=sys.stderr)
    return f"openblas ({os.path.basename(openblas[0])}, core {core}, {blas_threads} threads)", blas_threads


def bench_train(model, params, config, args, generator):
    optimizer = torch.optim.AdamW(params, lr=2e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    input_ids = torch.randint(0, config.vocab_size, (args.batch, args.seq_len), generator=generator)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_sum, count = ref.cross_entropy_sum(model.logits(input_ids), input_ids)
        loss = loss_sum / count
        loss.backward()
        if args.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        optimizer.step()
        return float(loss)

    for _ in range(args.warmup):
        step()
    start = time.perf_counter()
    losses = [step() for _ in range(args.steps)]
    elapsed = time.perf_counter() - start
    print(f"train: {args.steps} steps of {args.batch}x{args.seq_len} tokens in {elapsed:.3f} s, losses {[round(l, 4) for l in losses]}",
          file=sys.stderr)
    return args.batch * args.seq_len * args.steps / elapsed, elapsed / args.steps


@torch.inference_mode()
def greedy_decode(model, config, prompt, new_tokens):
    """Returns (prefill seconds, decode seconds, generated ids)."""
    cache = ref.KVCache(config, 1, prompt.shape[1] + new_tokens + 1, torch.float32)
    start = time.perf_counter()
    token = model.logits(prompt, cache)[:, -1].argmax(-1)
    prefilled = time.perf_counter()
    generated = [int(token)]
    for _ in range(new_tokens):
        token = model.logits(token.view(1, 1), cache)[:, -1].argmax(-1)
        generated.append(int(token))
    done = time.perf_counter()
    return prefilled - start, done - prefilled, generated


def bench_decode(model, config, args, generator):
    prompt = torch.randint(0, config.vocab_size, (1, args.prompt_len), generator=generator)
    for _ in range(args.warmup):
        greedy_decode(model, config, prompt, min(args.new_tokens, 8))
    prefill_s, decode_s, generated = greedy_decode(model, config, prompt, args.new_tokens)
    print(f"decode: prefill {args.prompt_len} tokens in {prefill_s:.3f} s, {args.new_tokens} tokens in {decode_s:.3f} s "
          f"(first ids {generated[:8]})", file=sys.stderr)
    return args.new_tokens / decode_s, args.prompt_len / prefill_s


def main():
    parser = argparse.ArgumentParser(description="PyTorch eager float32 LoRA train/decode baseline")
    parser.add_argument("--model", required=True, help="Hugging Face Llama folder")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0)
    parser.add_argument("--max-grad-norm", type=float, default=1.0)
    parser.add_argument("--decode-without-adapter", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if min(args.batch, args.seq_len, args.steps, args.prompt_len, args.new_tokens) < 1 or args.warmup < 0:
        parser.error("sizes and --steps must be >= 1, --warmup >= 0")

    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    blas, blas_threads = ensure_openblas(threads)
    generator = torch.Generator().manual_seed(args.seed)

    config, weights = ref.load_model(args.model, torch.float32)
    adapter = ref.random_adapter(config, args.rank, args.alpha, False, ref.LORA_TARGETS, torch.float32, generator, b_std=0.01)
    params = adapter.parameters()
    for p in params:
        p.requires_grad_(True)
    for tensor in weights.tensors.values():
        tensor.requires_grad_(False)
    model = ref.LlamaReference(config, weights, adapter, torch.float32)
    print(f"model {args.model}: H {config.hidden_size}, I {config.intermediate_size}, L {config.num_hidden_layers}, "
          f"NH {config.num_attention_heads}, NKV {config.num_key_value_heads}, V {config.vocab_size}; "
          f"torch threads {torch.get_num_threads()}, LoRA r {args.rank} on {','.join(ref.LORA_TARGETS)}", file=sys.stderr)

    train_tokens_per_s, train_step_s = bench_train(model, params, config, args, generator)
    decode_model = ref.LlamaReference(config, weights, None if args.decode_without_adapter else adapter, torch.float32)
    decode_tokens_per_s, prefill_tokens_per_s = bench_decode(decode_model, config, args, generator)
    print(json.dumps({
        "train_tokens_per_s": round(train_tokens_per_s, 2),
        "decode_tokens_per_s": round(decode_tokens_per_s, 2),
        "prefill_tokens_per_s": round(prefill_tokens_per_s, 2),
        "threads": torch.get_num_threads(),
        "blas": blas,
        "blas_threads": blas_threads,
        "train_step_s": round(train_step_s, 4),
        "batch": args.batch, "seq_len": args.seq_len, "steps": args.steps,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "rank": args.rank, "decode_lora": not args.decode_without_adapter,
        "torch": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ref.ReferenceInputError as error:
        print(f"torch_llama: error: {error}", file=sys.stderr)
        sys.exit(2)
