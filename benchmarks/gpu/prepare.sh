#!/usr/bin/env bash
# Run HERE (the machine without a GPU), from anywhere: stage what the GPU machine lacks into two ignored
# folders, .wh1 ... .wh7, each under the 64 MiB a `run` call may carry. The GPU machine's image already
# has torch, transformers, onnx, onnxscript, onnxruntime (CPU), cuda-bindings, matplotlib, pillow and
# pytest; it lacks TensorRT-RTX, diffusers, importlib_metadata and onnxruntime-gpu (~255 MB, in five 50 MiB
# parts, .wh3 to .wh7; installed into .site it shadows the image's CPU onnxruntime). See README.md here.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
shared=${SHARED:-$repo/../shared}
cd "$repo"
rm -rf .wheels .wheels-ort .wh[0-9]
bash "$shared/tools/wheelhouse.sh" .wheels 3.12 tensorrt-rtx-cu13 diffusers importlib_metadata >/dev/null
mkdir .wh1 .wh2
cp "$shared/tools/wheelhouse-install.sh" .wh1/
mv .wheels/*.part00 .wh1/          # the first 60 MiB part of tensorrt-rtx's libraries
mv .wheels/* .wh2/                 # the rest
rmdir .wheels
PART_MIB=50 bash "$shared/tools/wheelhouse.sh" .wheels-ort 3.12 onnxruntime-gpu >/dev/null
n=3
for part in .wheels-ort/*.part*; do mkdir -p ".wh$n"; mv "$part" ".wh$n/"; n=$((n + 1)); done
mv .wheels-ort/* .wh2/ 2>/dev/null || true   # small wheels ONNX Runtime needs, if any were fetched
rmdir .wheels-ort
du -sh .wh[0-9]
