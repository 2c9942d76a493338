#!/usr/bin/env bash
# Every GPU check of the CUDA backend in one device call, prepared by bench/gpu/prepare.sh. Each step
# has its own time limit and a failing step does not stop the next; the summary table comes last and
# full logs go to $OUT (summary.txt and logs.tar.gz: the device tool brings back at most 8 files).
#
#   bash bench/gpu/check.sh [serving|training|all]
# serving (the default) takes about 6 minutes on an H200 and training about 5 (both build first):
# run them as separate device calls (timeout_s 600 each), "all" only when time allows.
#
# serving (issue 6): build the native tests for sm_90a; the op test, every CUDA op against the CPU op
#   in float32 and bf16 (test-backend-ops); attention and sampling kernels (attention-sample-test);
#   whole-model parity with the CPU, tiny and small presets, both modes (test-model-backends); the
#   addon from Node: CUDA probe, `generate --device cuda`; logits with an NF4 base and a PEFT adapter vs
#   transformers + PEFT on the same dequantized weights (hf_parity.py + logits.mjs); the serving
#   benchmark on the Llama-3-8B shape (bench-serving).
# training (issue 7): 20 AdamW steps of the tiny and small presets from the same adapter and data on
#   the CPU and the GPU, float32 and bf16 compute (test-model-backends --train-steps 20: loss curves and
#   final adapters); the training benchmark on the 8B shape (bench-training: NF4 base, batch 2 x 2,048,
#   r 16 on q/k/v/o, recompute) and the HF + PEFT peer on the same shape right after it (hf_train.py,
#   which prints the engine/peer ratios from bench-training's log).
set -uo pipefail
PHASE=${1:-serving}
OUT=${OUT:-/tmp/out}
LOG=/tmp/tuneserve-check
rm -rf "$LOG" && mkdir -p "$OUT" "$LOG"
START=$(date +%s)
SUMMARY="$LOG/summary.txt"

# step NAME SECONDS COMMAND...: runs with a limit, logs to $LOG/NAME.log, records rc and duration.
step() {
  local name=$1 limit=$2
  shift 2
  local t0 rc
  t0=$(date +%s)
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" > "$LOG/$name.log" 2>&1
  rc=$?
  printf '%-28s rc=%-4s %4ss\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" >> "$LOG/steps.txt"
  tail -n 3 "$LOG/$name.log"
  return 0
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nproc; cat .device/commit; date -u; } > "$LOG/machine.txt" 2>&1

# Node, the addon built on the CPU machine with nvcc, dist/ and the engine CLI's modules.
python3 -c "import lzma,shutil;shutil.copyfileobj(lzma.open('.device/node.xz'),open('/tmp/node','wb'))" && chmod +x /tmp/node
NODE=/tmp/node
mkdir -p node_modules build/Release
cp -r .device/nm/. node_modules/ && cp .device/tuneserve_native.node build/Release/ && rm -rf dist && cp -r .device/dist dist
CUBLASLT=$(ls /usr/local/cuda/lib64/libcublasLt.so.1[0-9] 2>/dev/null | head -1)
[ -n "$CUBLASLT" ] || CUBLASLT=$(python3 -c "import nvidia.cublas, os; d=os.path.join(nvidia.cublas.__path__[0],'lib'); print(os.path.join(d, sorted(f for f in os.listdir(d) if f.startswith('libcublasLt.so'))[0]))" 2>/dev/null)
export TUNESERVE_CUBLASLT=$CUBLASLT
echo "cuBLASLt: ${CUBLASLT:-not found}" >> "$LOG/machine.txt"

BUILD=/tmp/native-tests
step build 300 bash -c "cmake -S native/tests -B $BUILD -DTS_CUDA=real -DTS_CUDA_GENCODE='-gencode=arch=compute_90a,code=sm_90a' > /dev/null && cmake --build $BUILD -j \$(nproc)"

if [ "$PHASE" = serving ] || [ "$PHASE" = all ]; then
  step op-test 150 "$BUILD/test-backend-ops" --backend cuda --mode both
  step attention-sample 120 "$BUILD/attention-sample-test"
  step model-tiny 120 "$BUILD/test-model-backends" --backend cuda --preset tiny --mode both
  step model-small 150 "$BUILD/test-model-backends" --backend cuda --preset small --mode both
  step node-probe 30 $NODE -e "console.log(JSON.stringify(require('./build/Release/tuneserve_native.node').cudaProbe(), null, 1))"
  step make-small 60 $NODE bin/tuneserve.js make-model --preset small --out /tmp/small --seed 5
  step generate-cuda 90 $NODE bin/tuneserve.js generate --model /tmp/small --prompt "Hello world" --max-tokens 16 --device cuda --json
  IDS=128000,9906,1917,0,578,4062,14198,39935,35308,927,279,311,1505,264,1296
  step hf-parity 180 bash -c "PYTHONUNBUFFERED=1 python3 bench/gpu/hf_parity.py /tmp/small /tmp/small-deq /tmp/peft-adapter $IDS /tmp/parity \
    && $NODE bench/gpu/logits.mjs /tmp/small /tmp/peft-adapter $IDS /tmp/eng-f32.f32 /tmp/parity.hf_f32.f32 --device cuda --quant nf4 --cuda-compute f32 --label 'engine CUDA f32 (NF4 base) vs HF+PEFT f32 (dequantized)' \
    && $NODE bench/gpu/logits.mjs /tmp/small /tmp/peft-adapter $IDS /tmp/eng-bf16.f32 /tmp/parity.hf_bf16.f32 --device cuda --quant nf4 --label 'engine CUDA bf16 (NF4 base) vs HF+PEFT bf16 (dequantized)' \
    && $NODE bench/gpu/logits.mjs /tmp/small /tmp/peft-adapter $IDS /tmp/eng-bf16.f32 /tmp/parity.hf_f32.f32 --device cuda --quant nf4 --label 'engine CUDA bf16 vs HF+PEFT f32'"
  step bench-serving 240 "$BUILD/bench-serving" --preset llama3-8b
fi

if [ "$PHASE" = training ] || [ "$PHASE" = all ]; then
  step train-tiny-20 120 "$BUILD/test-model-backends" --backend cuda --preset tiny --mode both --train-steps 20
  step train-small-20 150 "$BUILD/test-model-backends" --backend cuda --preset small --mode both --train-steps 20
  step bench-training 200 "$BUILD/bench-training" --preset llama3-8b --batch 2 --seq 2048 --rank 16 --targets qkvo
  step hf-train-8b 200 env PYTHONUNBUFFERED=1 python3 bench/gpu/hf_train.py --preset llama3-8b --batch 2 --seq 2048 \
    --rank 16 --targets qkvo --engine-log "$LOG/bench-training.log"
fi

{
  echo "# tuneserve GPU check, phase $PHASE"; cat "$LOG/machine.txt"; echo
  echo "## steps"; cat "$LOG/steps.txt"; echo
  for f in op-test attention-sample model-tiny model-small train-tiny-20 train-small-20; do
    [ -f "$LOG/$f.log" ] && { echo "## $f"; grep -E "^(PASS|FAIL)|OK:|FAILED" "$LOG/$f.log" | tail -n 60; echo; }
  done
  [ -f "$LOG/generate-cuda.log" ] && { echo "## generate --device cuda"; tail -n 3 "$LOG/generate-cuda.log"; echo; }
  [ -f "$LOG/hf-parity.log" ] && { echo "## HF + PEFT parity"; grep -E '"check"' "$LOG/hf-parity.log"; echo; }
  [ -f "$LOG/bench-serving.log" ] && { echo "## serving benchmark"; sed -n '/^metric/,$p' "$LOG/bench-serving.log"; echo; }
  [ -f "$LOG/bench-training.log" ] && { echo "## training benchmark"; sed -n '/^metric/,$p' "$LOG/bench-training.log"; echo; }
  [ -f "$LOG/hf-train-8b.log" ] && { echo "## HF + PEFT peer, and the engine against it"; tail -n 4 "$LOG/hf-train-8b.log"; echo; }
  echo "total $(( $(date +%s) - START ))s"
} > "$SUMMARY"
cp "$SUMMARY" "$OUT/summary.txt"
tar -czf "$OUT/logs.tar.gz" -C "$LOG" .
cat "$SUMMARY"
