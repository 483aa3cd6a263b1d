#!/usr/bin/env bash
# HERE, on a machine without a GPU, in the project's virtualenv: run the GPU kit as far as a CPU can, the way the
# lease will. Builds carry folders for THIS Python (the same recipe prepare.sh applies for the GPU machine's
# 3.12; the ONNX Runtime series packs this machine's onnxruntime in place of onnxruntime-gpu), unpacks them call
# by call into a temporary site exactly as run.sh does there, imports everything from that site (and checks
# that it came from there), opens the prebuilt tiny bundle, and runs every phase of run.sh up to the step that
# needs a GPU; then prints one line per phase. The full-size model is swapped for the tiny one (FULL_MODEL).
#   bash benchmarks/gpu/rehearse.sh [--keep]
set -uo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
cd "$repo"
keep=${1:-}
work=$(mktemp -d /tmp/turbo-trt-rehearsal.XXXXXX)
[ "$keep" = --keep ] || trap 'rm -rf "$work"' EXIT
cache=${TURBO_TRT_KIT_CACHE:-$HOME/.cache/turbo-trt/gpu-kit}
export KIT=$work/kit OUT=$work/out CARRY_ROOT=$work/carries REHEARSAL=1
export FULL_MODEL="--model tiny-sd-turbo --height 64 --width 64"
mkdir -p "$OUT"
echo "== rehearsal in $work"

echo "== 1. carry folders (this Python; the lease's are made by prepare.sh for 3.12)"
python3 -m turbo_trt.cli build --model tiny-sd-turbo --height 64 --width 64 --flavor tensorrt-rtx --out "$cache/tiny-sd-turbo" -q
python3 benchmarks/gpu_kit.py prepare --out "$work/all" --bundle "$cache/tiny-sd-turbo" --ort || exit 1
[ -f .gpu/plan.json ] && python3 -c "
import json; p = json.load(open('.gpu/plan.json'))
print('   the lease kit in .gpu/ (prepare.sh):', ', '.join(f'{k} {v[\"with_tree_mib\"]} MiB' for k, v in p['calls'].items()))"

call() {  # call N PHASES...: what one `run` call does there: its carry folder arrives, then run.sh runs
  local folder=$1; shift
  rm -rf "$CARRY_ROOT" && mkdir -p "$CARRY_ROOT"
  [ "$folder" = none ] || cp -r "$work/all/$folder" "$CARRY_ROOT/"
  echo "== call with carry $folder: run.sh $*"
  bash benchmarks/gpu/run.sh "$@" 2>&1 | sed 's/^/   /'
}
# the calls of README.md, in order (both branches: the ONNX Runtime series too)
call c1 env export
call c2 probe tests full:900  # full: the CPU builds the tiny portable engines (the lease's budget is 260)
shopt -s nullglob
rest=("$work"/all/o[0-9]*)  # none when this machine's onnxruntime fitted into c2 whole
[ ${#rest[@]} -gt 0 ] || call none ort
for d in "${rest[@]}"; do
  if [ "$d" = "${rest[-1]}" ]; then call "$(basename "$d")" ort; else call "$(basename "$d")"; fi
done

echo "== 2. imports come from the unpacked site"
(cd "$KIT/work" && PYTHONPATH=$KIT/site python3 - "$KIT/site" <<'EOF'
import importlib, sys
site = sys.argv[1]
bad = []
for name in ("turbo_trt", "turbo_trt.runner", "tensorrt_rtx", "tensorrt_rtx_libs", "diffusers", "importlib_metadata",
             "onnxruntime", "turbo_trt.runner.executors.tensorrt", "turbo_trt.runner.executors.onnxruntime_cuda"):
    module = importlib.import_module(name)
    where = getattr(module, "__file__", "") or ""
    ok = where.startswith(site)
    bad += [] if ok else [name]
    print(f"   {name}: {'from the kit site' if ok else 'NOT from the kit site: ' + where}")
from turbo_trt.runner.bundle import open_bundle
bundle = open_bundle(site.replace("/site", "/bundles/tiny-sd-turbo"), files="onnx")
print(f"   prebuilt tiny bundle opens: {bundle.manifest['model']['id']}, engines {bundle.manifest['engine']['flavor']} "
      f"{bundle.manifest['engine']['version']}")
sys.exit(1 if bad else 0)
EOF
)
imports=$?

echo "== 3. where each phase stopped (one line each)"
python3 - "$KIT/summary.json" <<'EOF'
import json, sys
phases = json.load(open(sys.argv[1]))["phases"]
def first(text): return str(text).strip().splitlines()[-1][:300] if str(text).strip() else ""
lines = {
    "unpack": lambda p: "reached the end: " + "; ".join(first(l) for l in str(p.get("last", "")).splitlines()[-2:]),
    "env": lambda p: f"reached the end; GPU: {p['environment'].get('gpu') if isinstance(p.get('environment'), dict) else first(p.get('environment'))}",
    "export": lambda p: f"background export started at {p.get('started')}" if p.get("started") else f"failed: {p}",
    "probe": lambda p: "; ".join(f"{k}: " + ("ran" if a.get("ran") else "needs a GPU at " + first(a.get("error", "?")))
                                 for k, a in (p.get("result") or {}).get("attempts", {}).items()),
    "tests": lambda p: f"exit {p.get('result', {}).get('exit')}: " + " / ".join((p.get("result") or {}).get("last_lines", [])[-2:]),
    "ort": lambda p: "needs a GPU: " + first((p.get("result") or {}).get("cuda_unavailable_reason", p.get("result"))),
    "full": lambda p: (f"export done, engines built ({p.get('targets')}, {p.get('engine_build_s')} s); " if "engine_build_s" in p else "")
                      + (("needs a GPU: " + first(p["skipped"])) if p.get("skipped") else first(p.get("error") or p.get("bench_log", ""))),
}
for name, phase in phases.items():
    try:
        text = lines.get(name, lambda p: json.dumps(p)[:200])(phase)
    except Exception as exc:
        text = f"(unreadable: {exc})"
    print(f"   {name:7s} {text}")
EOF
echo "== rehearsal done (imports: $([ $imports = 0 ] && echo ok || echo FAILED))"
exit $imports
