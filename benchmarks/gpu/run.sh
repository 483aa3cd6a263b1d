#!/usr/bin/env bash
# THERE (the GPU machine), in the repository root: `bash benchmarks/gpu/run.sh PHASE ...`. See plan.md.
# Every invocation first unpacks whatever carry folders .gpu/c* / .gpu/o* came with this call (parts gather in
# $KIT/store, which lasts while the machine stays warm) and links turbo_trt into $KIT/site. Then, in order:
#   env      GPU, driver, versions                                    -> summary.json
#   export   starts the full-size random SD-Turbo ONNX export in the background (setsid; needs diffusers)
#   probe    (a) tiny engines: the prebuilt portable ones, then --targets current built here -> rtx-probe.json
#   tests    (b) tests/test_gpu.py on each GPU executor that runs, on the carried bundle  -> test_gpu.log
#   full     (c) full-size SD-Turbo engines (TensorRT-RTX if the probe ran, else ONNX Runtime CUDA), then a
#            quick 1-step bench against diffusers FP16 eager          -> bench-sd-1step.{json,md,png}
#   ort      ONNX Runtime CUDA from the carried onnxruntime-gpu: can it start here, and why not
# Timeouts (s): env 60, probe 300, tests 240, full: export wait 120 + engine build 200 + bench 240, ort 60; a call
# whose phases add up past its timeout_s is cut there, and $OUT still holds the summary so far.
# Each phase runs under `timeout` and adds to one summary JSON (kept in $KIT, copied to $OUT after each step),
# so a call cut short still returns what it learned. At most 8 files go to $OUT.
set -uo pipefail
# (no phase: only unpack what came with the call)
KIT=${KIT:-/tmp/tt}
OUT=${OUT:-$KIT/out}
CARRY_ROOT=${CARRY_ROOT:-.gpu}  # where this call's carry folders are (c1, c2, ... o1, ...)
# the full-size model (the rehearsal on a CPU machine swaps in the tiny one)
read -r -a MODEL <<< "${FULL_MODEL:---model sd-turbo --random-weights}"
export OUT KIT KIT_SUMMARY=$KIT/summary.json PYTHONUNBUFFERED=1
mkdir -p "$OUT" "$KIT"
kit() { python3 benchmarks/gpu_kit.py "$@"; }
note() { kit record "$@"; }  # note PHASE KEY=JSON ... [--file KEY=PATH]

# -- every call: unpack what came, link the package, find torch's CUDA libraries ---------------------------------
shopt -s nullglob
carries=("$CARRY_ROOT"/c[0-9]* "$CARRY_ROOT"/o[0-9]*)
unpacked=$(kit unpack "${carries[@]}" --store "$KIT/store" --root "$KIT" 2>&1) || { echo "$unpacked"; exit 1; }
echo "$unpacked"
kit link-package --repo . --site "$KIT/site" >/dev/null
export PYTHONPATH=$KIT/site${PYTHONPATH:+:$PYTHONPATH}
# Work from a folder without the repository's own turbo_trt/ (cwd comes first on sys.path, and pytest puts the
# tests' root there): the linked package, with its runner/builder/benchmarks subpackages, is then the one imported.
mkdir -p "$KIT/work"
for entry in tests benchmarks pyproject.toml; do ln -sfn "$PWD/$entry" "$KIT/work/$entry"; done
cd "$KIT/work"
nvlib=$(kit nvidia-libs)  # the image's nvidia/*/lib (torch's CUDA 13, cuDNN 9): ONNX Runtime CUDA needs them
export LD_LIBRARY_PATH=$nvlib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
note unpack "last=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$unpacked")" \
  "nvidia_lib_dirs=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1].split(":")))' "$nvlib")"

ran() {  # which probe attempt ran: portable | targets-current | (empty)
  python3 - "$KIT/summary.json" <<'EOF'
import json, sys
probe = json.load(open(sys.argv[1]))["phases"].get("probe", {}).get("result", {})
print((probe.get("runs") or [""])[0] if isinstance(probe, dict) else "")
EOF
}
gpu_bundle() {  # the tiny bundle the tests use: one whose engines ran, else the carried one (ONNX for ORT CUDA)
  case $(ran) in
    portable) echo "$KIT/probe/portable" ;;
    targets-current) echo "$KIT/probe/targets-current" ;;
    *) echo "$KIT/bundles/tiny-sd-turbo" ;;
  esac
}

status=0
for phase in "$@"; do
echo "=== $phase ($(date +%T))"
start=$(date +%s)
case $phase in
  env)
    timeout 60 python3 - <<'EOF' > "$KIT/env.json" 2>&1
import json, shutil, subprocess
from turbo_trt.benchmarks.environment import environment
env = environment()
if shutil.which("nvidia-smi"):
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,compute_cap",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
print(json.dumps(env))
EOF
    note env --file "environment=$KIT/env.json"
    ;;
  export)
    if python3 -c "import diffusers" 2>/dev/null; then
      rm -f "$KIT/export.rc"
      setsid nohup bash -c "timeout 1500 python3 -m turbo_trt.cli build ${MODEL[*]} --onnx-only \
        --out '$KIT/engines/full' > '$KIT/export.log' 2>&1; echo \$? > '$KIT/export.rc'" >/dev/null 2>&1 < /dev/null &
      note export "started=\"$(date -u +%FT%TZ)\"" "log=\"$KIT/export.log\""
    else
      note export 'error="diffusers is not unpacked: carry .gpu/c1 first"'; status=1
    fi
    ;;
  probe)
    timeout 300 python3 -m turbo_trt.benchmarks.rtx_probe "$OUT/rtx-probe.json" --bundle "$KIT/bundles/tiny-sd-turbo" \
      --work "$KIT/probe" 2>&1 | tail -20
    note probe --file "result=$OUT/rtx-probe.json"
    ;;
  tests)
    b=$(gpu_bundle)
    TURBO_TRT_GPU_BUNDLE=$b timeout 240 python3 -m pytest -q -rs -p no:cacheprovider tests/test_gpu.py \
      --junitxml "$KIT/junit.xml" > "$OUT/test_gpu.log" 2>&1
    rc=$?
    tail -15 "$OUT/test_gpu.log"
    python3 - "$KIT/junit.xml" "$b" "$rc" "$OUT/test_gpu.log" > "$KIT/tests.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
log = open(sys.argv[4], errors="replace").read().strip().splitlines()
out = {"bundle": sys.argv[2], "exit": int(sys.argv[3]), "last_lines": log[-6:], "tests": {}}
try:
    for case in ET.parse(sys.argv[1]).getroot().iter("testcase"):
        verdict = "passed"
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                verdict = f"{tag}: {(node.get('message') or '')[:300]}"
        out["tests"][case.get("name")] = verdict
except (OSError, ET.ParseError) as exc:
    out["junit"] = str(exc)
print(json.dumps(out))
EOF
    note tests --file "result=$KIT/tests.json"
    [ "$rc" = 0 ] || status=1
    ;;
  full)
    bundle=$KIT/engines/full
    for _ in $(seq 1 24); do [ -f "$KIT/export.rc" ] && break; sleep 5; done  # the background export
    if [ "$(cat "$KIT/export.rc" 2>/dev/null)" != 0 ]; then
      note full "error=\"export not finished or failed\"" --file "export_log=$KIT/export.log"; status=1; continue
    fi
    case $(ran) in
      portable) executor=tensorrt; targets=() ;;
      targets-current) executor=tensorrt; targets=(--targets current) ;;
      *) executor=onnxruntime-cuda; targets=() ;;
    esac
    if [ $executor = tensorrt ] || [ "${REHEARSAL:-0}" = 1 ]; then  # the rehearsal builds portable engines on the CPU
      t0=$(date +%s)
      timeout 200 python3 -m turbo_trt.cli build "${MODEL[@]}" --flavor tensorrt-rtx "${targets[@]}" \
        --out "$bundle" -q > "$KIT/build.log" 2>&1 || { note full "executor=\"$executor\"" --file "build_error=$KIT/build.log"; status=1; continue; }
      note full "targets=\"${targets[*]:-portable}\"" "engine_build_s=$(( $(date +%s) - t0 ))" --file "build_log=$KIT/build.log"
    fi
    if [ $executor = onnxruntime-cuda ]; then
      reason=$(python3 -c "from turbo_trt.runner.executors.onnxruntime_cuda import cuda_unavailable_reason as r; print(r() or '')")
      if [ -n "$reason" ]; then
        note full "executor=null" "skipped=$(python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "no GPU executor runs here: TensorRT-RTX did not (probe) and onnxruntime-cuda: $reason")"
        status=1; continue
      fi
    fi
    note full "executor=\"$executor\""
    timeout 240 python3 -m turbo_trt.cli bench --engines "$bundle" --executor $executor --steps 1 --iterations 20 \
      --warmup 3 --quick --ignore-targets --json "$OUT/bench-sd-1step.json" --report "$OUT/bench-sd-1step.md" \
      --plot "$OUT/bench-sd-1step.png" > "$KIT/bench.log" 2>&1 || status=1
    tail -25 "$KIT/bench.log"
    note full --file "bench_log=$KIT/bench.log"
    ;;
  ort)
    timeout 60 python3 -c "
import json
from turbo_trt.runner.executors.onnxruntime_cuda import cuda_unavailable_reason
import onnxruntime as o
print(json.dumps({'onnxruntime': o.__version__, 'file': o.__file__, 'providers': o.get_available_providers(),
                  'cuda_unavailable_reason': cuda_unavailable_reason()}))" > "$KIT/ort.json" 2>&1
    note ort --file "result=$KIT/ort.json"
    ;;
  *) echo "unknown phase $phase" >&2; exit 2 ;;
esac || status=1
note "$phase" "seconds=$(( $(date +%s) - start ))"
done
exit $status
