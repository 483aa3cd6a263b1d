#!/usr/bin/env bash
# Run THERE (the GPU machine), in the repository root: `run.sh PHASE [PHASE ...]`, phases in order:
#   install     unpack .wh1 ... .wh7 into .site, install turbo-trt editable (no network)
#   probe       does TensorRT-RTX run here? tiny bundles built with targets `current` and the portable
#               default, loaded and run; every outcome and message into rtx-probe.json
#   tests       tests/test_gpu.py on every GPU executor that runs (TensorRT, ONNX Runtime CUDA): vs ONNX
#               Runtime CPU, graph replay vs plain run, no per-image allocation, failures, forks
#   sd-current  full-size SD-Turbo built with TensorRT-RTX --targets current on this GPU, 1-step bench
#   sd-ort      bench SD-Turbo (built by `sd`) with the onnxruntime-cuda executor, 1 step
#   sd          build full-size random-weight SD-Turbo with TensorRT-RTX on this GPU, then bench it
#               against diffusers FP16 eager (1 and 4 steps)
#   sd-compile  bench SD-Turbo again with the torch.compile baseline as well
#   sdxl        build and bench full-size random-weight SDXL-Turbo (eager baseline)
# Results go to $OUT (at most 8 files come back per call; each phase writes fewer). See benchmarks/gpu/README.md.
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: run.sh install|probe|tests|sd|sd-current|sd-ort|sd-compile|sdxl ..." >&2; exit 2; }
OUT=${OUT:-/tmp/turbo-trt-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD/.site${PYTHONPATH:+:$PYTHONPATH}
cli() { python3 -m turbo_trt.cli "$@"; }
bench() {  # bundle name steps extra-args... (writes NAME.json; --report/--plot as extra args)
  local bundle=$1 name=$2 steps=$3; shift 3
  # --ignore-targets: TensorRT-RTX's default targets leave out Hopper (9.0); whether its engines run on an
  # H100 anyway is one of the things this run finds out (the JSON records targets and GPU).
  cli bench --engines "engines/$bundle" --steps "$steps" --iterations 50 --warmup 5 --parallel 2 \
    --ignore-targets --json "$OUT/$name.json" "$@"
}
full() {  # bench with Markdown and PNG too
  local bundle=$1 name=$2 steps=$3; shift 3
  bench "$bundle" "$name" "$steps" --report "$OUT/$name.md" --plot "$OUT/$name.png" "$@"
}
status=0
for phase in "$@"; do
echo "=== $phase ($(date +%T))"
case $phase in
  install)
    bash .wh1/wheelhouse-install.sh .site .wh[0-9] &&
      python3 -m pip install -q --no-index --no-deps --no-build-isolation -e . &&
      python3 -c "import tensorrt_rtx, diffusers, onnxruntime as o, turbo_trt.runner.executors.tensorrt as t; print('ok', tensorrt_rtx.__version__, diffusers.__version__, o.__version__, o.get_available_providers())"
    ;;
  probe)
    python3 -m turbo_trt.benchmarks.rtx_probe "$OUT/rtx-probe.json" 2>&1 | tail -20
    ;;
  tests)
    { nvidia-smi; python3 -c "import json; from turbo_trt.benchmarks.environment import environment as e; print(json.dumps(e()))"
      python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py tests/test_cuda_wrappers.py -rs; } 2>&1 | tee "$OUT/test_gpu.log"
    ;;
  sd)
    python3 -m turbo_trt.benchmarks.build_report --model sd-turbo --random-weights --flavor tensorrt-rtx \
      --out engines/sd-turbo-random --results "$OUT" --name build-sd 2>&1 | tail -5 &&
      full sd-turbo-random bench-sd-1step 1 &&
      bench sd-turbo-random bench-sd-4step 4 --no-baseline
    ;;
  sd-current)
    cli build --model sd-turbo --random-weights --flavor tensorrt-rtx --targets current \
      --out engines/sd-turbo-random-current -q 2>&1 | tail -5 &&
      bench sd-turbo-random-current bench-sd-current-1step 1 --no-baseline
    ;;
  sd-ort)
    full sd-turbo-random bench-sd-1step-ort 1 --executor onnxruntime-cuda --no-baseline
    ;;
  sd-compile)
    full sd-turbo-random bench-sd-1step-compile 1 --compile
    ;;
  sdxl)
    python3 -m turbo_trt.benchmarks.build_report --model sdxl-turbo --random-weights --flavor tensorrt-rtx \
      --out engines/sdxl-turbo-random --results "$OUT" --name build-sdxl 2>&1 | tail -5 &&
      full sdxl-turbo-random bench-sdxl-1step 1
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac || status=1
done
exit $status
