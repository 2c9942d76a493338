#!/usr/bin/env bash
# The GPU machine's checks for this milestone, in one call (see ../shared/DEVICE.md). Prepared by
# bench/gpu/prepare.sh on the CPU machine (packs node, the CUDA-built addon, dist/ and the few
# node_modules the engine CLI needs into .device/). Prints a short table last; full logs in $OUT.
#  1. the addon built here with nvcc loads on a GPU node, its CUDA probe sees the device and runs a
#     kernel, and `--device auto` falls back to the CPU backend with one log line (`cuda` refuses);
#  2. the engine's CPU benchmark on that node's cores (PyTorch CPU there uses MKL, not OpenBLAS, so
#     bench:cpu's torch side refuses to report: engine numbers only);
#  3. the peer for the GPU milestone: Hugging Face transformers + PEFT on the H200, same shapes.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT" node_modules build/Release
python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.device/node.xz'),open('/tmp/node','wb'))" && chmod +x /tmp/node
cp -r .device/nm/. node_modules/ && cp .device/tuneserve_native.node build/Release/ && rm -rf dist && cp -r .device/dist dist
export PATH=/tmp:$PATH
ln -sf /tmp/node /tmp/node20 2>/dev/null
NODE=/tmp/node

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; } > "$OUT/machine.txt" 2>&1
$NODE -e "console.log(JSON.stringify(require('./build/Release/tuneserve_native.node').cudaProbe(), null, 2))" > "$OUT/cuda_probe.json" 2>&1
$NODE bin/tuneserve.js make-model --preset small --out /tmp/small > "$OUT/make_model.txt" 2>&1
$NODE bin/tuneserve.js generate --model /tmp/small --prompt "Hello world" --max-tokens 8 --device auto --json > "$OUT/generate_auto.txt" 2>&1
$NODE bin/tuneserve.js generate --model /tmp/small --prompt "Hello world" --max-tokens 8 --device cuda > "$OUT/generate_cuda.txt" 2>&1
echo "exit $?" >> "$OUT/generate_cuda.txt"
timeout 120 $NODE bench/cpu.mjs --model /tmp/small --rounds 1 > "$OUT/bench_cpu.txt" 2>&1
PYTHONUNBUFFERED=1 timeout 150 python3 .device/hf_peft_baseline.py --preset tiny --seq 512 --batch 4 --rank 16 --steps 6 --targets q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj > "$OUT/hf_peft_tiny.jsonl" 2>&1
PYTHONUNBUFFERED=1 timeout 210 python3 .device/hf_peft_baseline.py --preset llama3-8b --seq 2048 --batch 2 --rank 16 --steps 4 > "$OUT/hf_peft_8b.jsonl" 2>&1

echo "== summary"
echo "-- cuda probe"; grep -E '"(compiled|deviceCount|name|kernelOk|error)"' "$OUT/cuda_probe.json" | head -8
echo "-- --device auto"; grep -h "CPU backend" "$OUT/generate_auto.txt"
echo "-- --device cuda"; tail -2 "$OUT/generate_cuda.txt"
echo "-- engine CPU bench ($(nproc) cores)"; grep -E "train_tokens|decode_tokens|prefill_tokens" "$OUT/bench_cpu.txt"
echo "-- HF+PEFT on the GPU"; tail -8 "$OUT/hf_peft_tiny.jsonl"; tail -8 "$OUT/hf_peft_8b.jsonl"
