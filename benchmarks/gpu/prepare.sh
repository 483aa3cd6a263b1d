#!/usr/bin/env bash
# HERE (no GPU needed), from anywhere, in the project's virtualenv: pack everything a GPU lease carries into the
# ignored folder .gpu/ and print each call's size with the working tree; refuse a plan over 64 MiB per call.
#   .gpu/c1, .gpu/c2   base series: diffusers, the prebuilt tiny SD-Turbo bundle, TensorRT-RTX (its bindings
#                      built for the GPU machine's Python 3.12; its library xz -9), cut to fit
#   .gpu/o1 ...        ONNX Runtime series: onnxruntime-gpu without the parts the CUDA executor does not need,
#                      carried only when TensorRT-RTX does not run there (plan.md)
# The slow parts (xz -9 of libtensorrt_rtx.so.1, the tiny bundle build, the wheel downloads) are cached under
# ${TURBO_TRT_KIT_CACHE:-~/.cache/turbo-trt/gpu-kit}: a second run takes seconds.
#   bash benchmarks/gpu/prepare.sh [--no-ort] [--python 3.12] [--out .gpu]
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
py=3.12 out=.gpu ort=(--ort) ort_version=1.31.1
while [ $# -gt 0 ]; do
  case $1 in
    --no-ort) ort=() ;;
    --python) py=$2; shift ;;
    --out) out=$2; shift ;;
    *) echo "unknown option $1" >&2; exit 2 ;;
  esac
  shift
done
cache=${TURBO_TRT_KIT_CACHE:-$HOME/.cache/turbo-trt/gpu-kit}
mkdir -p "$cache/wheels"
rtx=$(python3 -c "import importlib.metadata as m; print(m.version('tensorrt_rtx_cu13_libs'))")
echo "TensorRT-RTX $rtx (the library and front end come from this environment; engines are built with it)"

# 1. the tiny SD-Turbo bundle, engines built here on the CPU (portable targets); rebuilt only when stale
bundle=$cache/tiny-sd-turbo
python3 -m turbo_trt.cli build --model tiny-sd-turbo --height 64 --width 64 --flavor tensorrt-rtx --out "$bundle" -q

# 2. binary wheels for the GPU machine's Python (the TensorRT-RTX bindings; onnxruntime-gpu for the o-series)
want=("tensorrt-rtx-cu13-bindings==$rtx")
[ ${#ort[@]} -gt 0 ] && want+=("onnxruntime-gpu==$ort_version")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d "$cache/wheels" "${want[@]}" 2>&1 | grep -v "is ignored" || true
wheels=("$cache/wheels/tensorrt_rtx_cu13_bindings-$rtx-cp${py/./}-"*.whl)
[ ${#ort[@]} -gt 0 ] && wheels+=("$cache/wheels/onnxruntime_gpu-$ort_version-cp${py/./}-"*.whl)
for w in "${wheels[@]}"; do [ -f "$w" ] || { echo "missing wheel $w" >&2; exit 1; }; done

# 3. archives, cut into call-sized folders; sizes printed with the working tree; over 64 MiB -> refused
python3 benchmarks/gpu_kit.py prepare --repo "$repo" --out "$out" --python "$py" --bundle "$bundle" \
  --wheels "${wheels[@]}" "${ort[@]}"
echo "carry folders ready in $out/ (see $out/plan.json); next: benchmarks/gpu/README.md"
