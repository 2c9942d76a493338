#!/usr/bin/env bash
# Stages what bench/gpu/check.sh needs on the GPU machine into .device/ (ignored by git), on this
# CPU machine, after `npm ci`: node (packed), the addon built here with nvcc (CUDA compiled in),
# dist/, the node_modules the engine CLI needs, the shared HF+PEFT baseline script and the commit.
# The native test and benchmark executables are built on the GPU machine itself (CMake + nvcc there,
# about a minute on its 16 cores), from the sources that travel with the working tree.
# Then one device call per phase (see check.sh's header):
#   run(command: "bash bench/gpu/check.sh serving", carry: [".device"], timeout_s: 600)
set -euo pipefail
root=$(git rev-parse --show-toplevel)
cd "$root"
bash ../shared/device/pack-node.sh
if ! node -e "process.exit(require('./build/Release/tuneserve_native.node').cudaProbe().compiled ? 0 : 1)"; then
  echo "prepare: the addon has no CUDA compiled in; rebuilding it with nvcc"
  npx node-gyp rebuild -j max --nodedir=/usr
fi
rm -rf .device/nm .device/dist && mkdir -p .device/nm/@lenml
cp -r node_modules/@huggingface .device/nm/
for pkg in tokenizer-llama3 tokenizer-llama3_1; do
  mkdir -p ".device/nm/@lenml/$pkg"
  cp -r "node_modules/@lenml/$pkg/package.json" "node_modules/@lenml/$pkg/models" ".device/nm/@lenml/$pkg/"
done
cp "${TUNESERVE_NATIVE_ADDON:-build/Release/tuneserve_native.node}" .device/tuneserve_native.node
strip --strip-debug .device/tuneserve_native.node
cp -r dist .device/dist
git rev-parse HEAD > .device/commit
git diff --quiet && git diff --cached --quiet || echo "+uncommitted" >> .device/commit
du -sh .device
echo "prepared; carry .device (check the whole tree stays under 64 MiB: du -sh --exclude=node_modules --exclude=build .)"
