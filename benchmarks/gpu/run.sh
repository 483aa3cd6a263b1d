#!/usr/bin/env bash
# THERE (the GPU machine), in the repository root: `bash benchmarks/gpu/run.sh PHASE ...`. See plan.md.
# Every invocation first unpacks whatever carry folders .gpu/c* / .gpu/o* came with this call (parts gather in
# $KIT/store, which lasts while the machine stays warm) and links turbo_trt into $KIT/site. Then, in order:
#   env      GPU, driver, versions                                    -> summary.json
#   export   starts the full-size random SD-Turbo ONNX export in the background (setsid, nice -n 10, 8 threads;
#            pid in $KIT/export.pid; never a second one while that pid lives; needs diffusers)
#   probe    (a) tiny engines: the prebuilt portable ones, then --targets current built here, each attempt a
#            child process under its own timeout                       -> rtx-probe.json
#   tests    (b) tests/test_gpu.py on each GPU executor that runs, on the carried bundle  -> test_gpu.log
#   full[:S] (c) full-size SD-Turbo engines (TensorRT-RTX if the probe ran, else ONNX Runtime CUDA), then a
#            quick 1-step bench against diffusers FP16 eager; the export wait, the engine build and the bench
#            share S seconds (default 260)                             -> bench-sd-1step.{json,md,png}
#   ort      ONNX Runtime CUDA from the carried onnxruntime-gpu: can it start here, and why not
# Timeouts (s, each `timeout -k 10`): env 60, probe 150, tests 150, full S, ort 60. A call's timeout_s must hold
# the sum of its phases (plan.md); $OUT holds the summary so far when a call is cut short anyway.
# Each phase adds to one summary JSON (kept in $KIT, copied to $OUT after each step). At most 8 files go to $OUT.
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
jstr() { python3 -c 'import json,sys; print(json.dumps(sys.argv[1]))' "$1"; }
T() { timeout -k 10 "$@"; }  # every phase: TERM at its limit, KILL 10 s later

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
LD_LIBRARY_PATH=$(IFS=:; dirs=(); for d in $nvlib ${LD_LIBRARY_PATH:-}; do [ -n "$d" ] && dirs+=("$d"); done
                  echo "${dirs[*]}")  # no empty entry: a leading ':' would search the working folder
export LD_LIBRARY_PATH
if [ -f "$KIT/commit.json" ]; then  # the commit the kit was packed from (no .git here): environment.py reads it
  TURBO_TRT_COMMIT=$(python3 -c "import json,sys; c = json.load(open(sys.argv[1]))
print((c.get('commit') or '') + ('-dirty' if c.get('dirty') else ''))" "$KIT/commit.json")
  export TURBO_TRT_COMMIT
fi
note unpack "last=$(jstr "$unpacked")" \
  "nvidia_lib_dirs=$(python3 -c 'import json,sys; print(json.dumps([d for d in sys.argv[1].split(":") if d]))' "$nvlib")"

ran() {  # which probe attempt ran: portable | targets-current | (empty), from the probe's own file
  python3 -c 'import json,sys; print((json.load(open(sys.argv[1])).get("runs") or [""])[0])' \
    "$KIT/rtx-probe.json" 2>/dev/null
}
gpu_bundle() {  # the tiny bundle the tests use: one whose engines ran, else the carried one (ONNX for ORT CUDA)
  case $(ran) in
    portable) echo "$KIT/probe/portable" ;;
    targets-current) echo "$KIT/probe/targets-current" ;;
    *) echo "$KIT/bundles/tiny-sd-turbo" ;;
  esac
}
export_alive() { [ -f "$KIT/export.pid" ] && kill -0 "$(cat "$KIT/export.pid")" 2>/dev/null; }

full_phase() {  # full:BUDGET: the export wait, the engine build and the bench share BUDGET seconds
  local rc=0
  deadline=$(( start + budget ))
  left() { echo $(( deadline - $(date +%s) )); }
  bundle=$KIT/engines/full reason=
  case $(ran) in
    portable) executor=tensorrt; targets=() ;;
    targets-current) executor=tensorrt; targets=(--targets current) ;;
    *) executor=onnxruntime-cuda; targets=() ;;
  esac
  note full "budget_s=$budget" "executor=\"$executor\""
  if [ $executor = onnxruntime-cuda ]; then  # asked first: without a GPU executor there is nothing to wait for
    reason=$(T 60 python3 -c "from turbo_trt.runner.executors.onnxruntime_cuda import cuda_unavailable_reason as r
print(r() or '')" 2>&1)
    if [ -n "$reason" ] && [ "${REHEARSAL:-0}" != 1 ]; then
      note full "executor=null" "skipped=$(jstr "no GPU executor runs here: TensorRT-RTX did not (probe) and onnxruntime-cuda: $reason")"
      return 1
    fi
  fi
  if [ ! -f "$KIT/export.pid" ]; then
    note full 'error="the export was not started (no export.pid): run the export phase first"'; return 1
  fi
  while export_alive && [ "$(left)" -gt 0 ]; do sleep 3; done  # the background export
  if [ -f "$KIT/export.end" ]; then
    note full "export_s=$(( $(cat "$KIT/export.end") - $(cat "$KIT/export.start") ))"
  fi
  if [ "$(cat "$KIT/export.rc" 2>/dev/null)" != 0 ]; then
    if export_alive; then why="export still running after the budget of $budget s"; else why="export failed (exit $(cat "$KIT/export.rc" 2>/dev/null || echo '?'))"; fi
    tail -c 4000 "$KIT/export.log" > "$KIT/export.tail" 2>/dev/null
    note full "error=$(jstr "$why")" --file "export_log_tail=$KIT/export.tail"; return 1
  fi
  tail -c 2000 "$KIT/export.log" > "$KIT/export.tail" 2>/dev/null
  note full --file "export_log_tail=$KIT/export.tail"
  if [ $executor = tensorrt ] || [ "${REHEARSAL:-0}" = 1 ]; then  # the rehearsal builds portable engines on the CPU
    t0=$(date +%s)
    limit=$(( $(left) - 150 )); [ $limit -lt 30 ] && limit=30  # leave the bench 150 s
    T $limit python3 -m turbo_trt.cli build "${MODEL[@]}" --flavor tensorrt-rtx "${targets[@]}" \
      --out "$bundle" -q > "$KIT/build.log" 2>&1 || { note full --file "build_error=$KIT/build.log"; return 1; }
    note full "targets=\"${targets[*]:-portable}\"" "engine_build_s=$(( $(date +%s) - t0 ))" --file "build_log=$KIT/build.log"
  fi
  if [ $executor = onnxruntime-cuda ] && [ -n "$reason" ]; then  # the rehearsal: built, but no GPU to bench on
    note full "skipped=$(jstr "no GPU executor runs here: onnxruntime-cuda: $reason")"; return 1
  fi
  T 60 python3 -c "import sys; from turbo_trt.runner.executor_choice import choose_executor
print(choose_executor(sys.argv[1], strict_targets=False).describe())" "$bundle" > "$KIT/choice.txt" 2>&1
  note full "auto=$(jstr "$(tail -c 4000 "$KIT/choice.txt")")"
  limit=$(left)
  if [ "$limit" -lt 30 ]; then note full "error=\"no time left for the bench ($limit s)\""; return 1; fi
  T "$limit" python3 -m turbo_trt.cli bench --engines "$bundle" --executor $executor --steps 1 --iterations 20 \
    --warmup 3 --quick --ignore-targets --json "$OUT/bench-sd-1step.json" --report "$OUT/bench-sd-1step.md" \
    --plot "$OUT/bench-sd-1step.png" > "$KIT/bench.log" 2>&1 || rc=1
  tail -25 "$KIT/bench.log"
  note full --file "bench_log=$KIT/bench.log"
  return $rc
}

status=0
for phase in "$@"; do
echo "=== $phase ($(date +%T))"
start=$(date +%s)
budget=${phase#*:}; [ "$budget" = "$phase" ] && budget=260
phase=${phase%%:*}
case $phase in
  env)
    T 60 python3 - <<'EOF' > "$KIT/env.json" 2>&1
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
    if export_alive; then
      note export "already_running=$(cat "$KIT/export.pid")"
    elif python3 -c "import diffusers" 2>/dev/null; then
      rm -f "$KIT/export.rc" "$KIT/export.end"
      date +%s > "$KIT/export.start"
      # in the background for the calls after this one: lower priority and 8 threads, so that the probe and the
      # tests keep the CPU they need; the pid is the bash that writes export.rc when the build ends
      setsid nohup nice -n 10 env OMP_NUM_THREADS=8 bash -c "echo \$\$ > '$KIT/export.pid'
        timeout -k 10 1500 python3 -m turbo_trt.cli build ${MODEL[*]} --onnx-only --out '$KIT/engines/full' \
          > '$KIT/export.log' 2>&1; echo \$? > '$KIT/export.rc'; date +%s > '$KIT/export.end'" \
        >/dev/null 2>&1 < /dev/null &
      echo $! > "$KIT/export.pid"  # the same process (setsid does not fork here); rewritten by it as well
      note export "started=\"$(date -u +%FT%TZ)\"" "log=\"$KIT/export.log\""
    else
      note export 'error="diffusers is not unpacked: carry .gpu/c1 first"'; status=1
    fi
    ;;
  probe)
    rm -f "$KIT/rtx-probe.json"
    T 150 python3 -m turbo_trt.benchmarks.rtx_probe "$KIT/rtx-probe.json" --bundle "$KIT/bundles/tiny-sd-turbo" \
      --work "$KIT/probe" --budget 140 2>&1 | tail -20
    [ -f "$KIT/rtx-probe.json" ] && cp "$KIT/rtx-probe.json" "$OUT/rtx-probe.json"
    note probe --file "result=$KIT/rtx-probe.json"
    ;;
  tests)
    b=$(gpu_bundle)
    rm -f "$KIT/junit.xml"
    extra=()
    python3 -c "import pytest_timeout" 2>/dev/null && extra=(--timeout 90)
    # nothing of TensorRT-RTX ran in the probe: the tests load ONNX Runtime CUDA only (TensorRT-RTX loaded first
    # in the same process could take the GPU down with it)
    if [ -n "$(ran)" ]; then executors=${TURBO_TRT_GPU_EXECUTORS:-}; else executors=onnxruntime-cuda; fi
    TURBO_TRT_GPU_EXECUTORS=$executors TURBO_TRT_GPU_BUNDLE=$b T 150 python3 -m pytest -q -rs -p no:cacheprovider \
      tests/test_gpu.py --junitxml "$KIT/junit.xml" "${extra[@]}" > "$OUT/test_gpu.log" 2>&1
    rc=$?
    tail -15 "$OUT/test_gpu.log"
    python3 - "$KIT/junit.xml" "$b" "$rc" "$OUT/test_gpu.log" "$executors" > "$KIT/tests.json" <<'EOF'
import json, sys, xml.etree.ElementTree as ET
log = open(sys.argv[4], errors="replace").read().strip().splitlines()
out = {"bundle": sys.argv[2], "exit": int(sys.argv[3]), "executors": sys.argv[5] or "all", "last_lines": log[-6:],
       "tests": {}}
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
  full) full_phase || status=1 ;;
  ort)
    T 60 python3 -c "
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
