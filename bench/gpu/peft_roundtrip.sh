#!/usr/bin/env bash
# PEFT interoperability, both directions, on a machine with transformers + PEFT (run on the GPU
# machine after the node setup of bench/gpu/check.sh). Prints relative L2 errors of the logits.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
NODE=${NODE:-/tmp/node}
IDS=128000,9906,1917,0,578,4062,14198,39935,35308,927,279
printf '{"prompt": "Q: ping?", "completion": " A: pong."}\n{"prompt": "Q: up?", "completion": " A: down."}\n' > /tmp/pp.jsonl
$NODE bin/tuneserve.js make-model --preset tiny --out /tmp/pp-model --seed 4
$NODE bin/tuneserve.js train --model /tmp/pp-model --data /tmp/pp.jsonl --out /tmp/pp-ours --targets all-linear --rank 4 --alpha 8 \
  --dropout 0 --lr 5e-2 --steps 5 --quant none --device cpu --json > /dev/null
$NODE bench/gpu/logits.mjs /tmp/pp-model /tmp/pp-ours $IDS /tmp/pp-ours.f32
python3 bench/gpu/peft_roundtrip.py /tmp/pp-model /tmp/pp-ours /tmp/pp-ours.f32 $IDS /tmp/pp-peft /tmp/pp-peft.f32 2>&1 | grep -v Warning
$NODE bench/gpu/logits.mjs /tmp/pp-model /tmp/pp-peft $IDS /tmp/pp-engine-peft.f32 /tmp/pp-peft.f32
cp /tmp/pp-ours/adapter_config.json "$OUT/ours_adapter_config.json"; cp /tmp/pp-peft/adapter_config.json "$OUT/peft_adapter_config.json"
