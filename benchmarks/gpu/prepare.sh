#!/usr/bin/env bash
# Run HERE (the machine without a GPU), from anywhere: stage what the GPU machine lacks into two ignored
# folders, .wh1 and .wh2, each under the 64 MiB a `run` call may carry. The GPU machine's image already
# has torch, transformers, onnx, onnxscript, onnxruntime, cuda-bindings, matplotlib, pillow and pytest;
# it lacks TensorRT-RTX, diffusers and importlib_metadata. See benchmarks/gpu/README.md.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
shared=${SHARED:-$repo/../shared}
cd "$repo"
rm -rf .wheels .wh1 .wh2
bash "$shared/tools/wheelhouse.sh" .wheels 3.12 tensorrt-rtx-cu13 diffusers importlib_metadata >/dev/null
mkdir .wh1 .wh2
cp "$shared/tools/wheelhouse-install.sh" .wh1/
mv .wheels/*.part00 .wh1/          # the first 60 MiB part of tensorrt-rtx's libraries
mv .wheels/* .wh2/                 # the rest
rmdir .wheels
du -sh .wh1 .wh2
