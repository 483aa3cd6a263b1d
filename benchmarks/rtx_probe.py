"""Does TensorRT-RTX run on this GPU? Run THERE (the GPU machine), phase (a) of benchmarks/gpu/run.sh:

    python3 -m turbo_trt.benchmarks.rtx_probe OUT.json --bundle PREBUILT_TINY_BUNDLE --work DIR [--budget S]

Two attempts on the tiny SD-Turbo bundle, nothing exported here:
1. `portable`: the prebuilt bundle as it travelled, its engines built on a CPU machine with TensorRT-RTX's
   default (portable) targets;
2. `targets-current`: a copy of it whose engines this machine compiles with `--targets current` from the
   same ONNX (the builder rebuilds the engines only).
Each attempt runs in a child process of its own under its own timeout (a crash or a hang in one loses nothing
of the other); their JSON is merged. For each: TensorRT-RTX's `get_engine_validity` answer (the function
`auto` asks), `auto`'s choice and reasons, whether the engines deserialize, whether an image comes out, and
how far it is from the ONNX Runtime CPU executor's; every error and warning word for word. The JSON is
rewritten after each step, so a probe cut short by its timeout still says how far it got. The script itself
only fails on a bug.
On a machine without a GPU (the rehearsal) each attempt stops where a GPU is needed and says so.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any

ATTEMPTS = ("portable", "targets-current")


def _conclude(result: dict[str, Any], attempts: Any, out: Path) -> dict[str, Any]:
    """Record which attempts ran and the verdict, write the result and return it."""
    ran = [label for label in attempts if result["attempts"][label].get("ran")]
    result["runs"] = ran
    result["verdict"] = (f"TensorRT-RTX runs here ({', '.join(ran)})" if ran else
                         "TensorRT-RTX does not run here: see each attempt's error")
    _write(out, result)
    return result


def _write(path: Path, result: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(path)


def _error(exc: BaseException) -> dict[str, Any]:
    return {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()[-3000:]}


def _build_current(source: Path, bundle: Path) -> dict[str, Any]:
    """Copy the prebuilt bundle and compile its engines for this GPU from the same ONNX."""
    from turbo_trt.builder.build import build
    from turbo_trt.builder.engine import EngineOptions
    from turbo_trt.builder.options import BuildOptions
    from turbo_trt.manifest import read_manifest
    from turbo_trt.progress import Progress

    if bundle.exists():
        shutil.rmtree(bundle)
    shutil.copytree(source, bundle, ignore=shutil.ignore_patterns("*.lock", "runtime_cache"))
    shapes = read_manifest(bundle)["shapes"]
    start = time.perf_counter()
    report = build(BuildOptions(model="tiny-sd-turbo", out=bundle, height=shapes["height"], width=shapes["width"],
                                flavor="tensorrt-rtx", engine=EngineOptions(targets=("current",))),
                   Progress(enabled=False))
    return {"build_s": round(time.perf_counter() - start, 1), "exported": report.exported,
            "engines_built": report.engines_built}


def _attempt(bundle: Path, entry: dict[str, Any], save: Any) -> None:
    import numpy as np

    from turbo_trt.flavors import load_flavor
    from turbo_trt.manifest import read_manifest
    from turbo_trt.runner import TurboPipeline
    from turbo_trt.runner.executor_choice import choose_executor, engine_validity

    manifest = read_manifest(bundle)
    entry["targets"] = manifest["engine"].get("targets")
    try:
        entry["engine_validity"] = engine_validity(bundle, manifest, load_flavor("tensorrt-rtx"))[1]
    except Exception as exc:
        entry["engine_validity"] = f"query failed: {type(exc).__name__}: {exc}"
    try:
        entry["auto"] = choose_executor(bundle, strict_targets=False).describe()
    except Exception as exc:
        entry["auto"] = f"failed: {type(exc).__name__}: {exc}"
    save()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            start = time.perf_counter()
            pipe = TurboPipeline.from_bundle(bundle, executor="tensorrt", strict_targets=False)
            entry["load_s"] = round(time.perf_counter() - start, 3)
            start = time.perf_counter()
            image = pipe("a photo of a cat", num_inference_steps=2, seed=3, output_type="np")
            entry["first_image_s"] = round(time.perf_counter() - start, 3)
            ref = TurboPipeline.from_bundle(bundle, executor="onnxruntime")("a photo of a cat", num_inference_steps=2,
                                                                           seed=3, output_type="np")
            diff = np.abs(image.astype(int) - ref.astype(int))
            entry.update(ran=True, max_abs_diff_vs_onnxruntime_cpu=int(diff.max()),
                         mean_abs_diff=round(float(diff.mean()), 4), graph_stats=pipe.executor.graph_stats(),
                         memory=pipe.executor.memory_report())
            pipe.close()
        except Exception as exc:
            entry.update(ran=False, **_error(exc))
    entry["warnings"] = [str(w.message) for w in caught]
    save()


def probe(out: Path, bundle: Path, work: Path, attempts: tuple[str, ...] = ATTEMPTS) -> dict[str, Any]:
    from turbo_trt.gpu import current_gpu

    result: dict[str, Any] = {"gpu": current_gpu(), "prebuilt_bundle": str(bundle), "attempts": {}}
    try:
        import tensorrt_rtx

        result["tensorrt_rtx"] = tensorrt_rtx.__version__
    except Exception as exc:
        result["tensorrt_rtx"] = f"import failed: {type(exc).__name__}: {exc}"
    work.mkdir(parents=True, exist_ok=True)
    for label in attempts:
        entry: dict[str, Any] = {}
        result["attempts"][label] = entry
        save = lambda: _write(out, result)  # noqa: E731
        target = work / label
        try:
            if label == "portable":
                if target.exists():
                    shutil.rmtree(target)
                shutil.copytree(bundle, target, ignore=shutil.ignore_patterns("*.lock", "runtime_cache"))
            else:
                entry.update(_build_current(bundle, target))
            entry["bundle"] = str(target)
            save()
            _attempt(target, entry, save)
        except Exception as exc:
            entry.update(built=False, **_error(exc))
        save()
        print(label, json.dumps({k: v for k, v in entry.items() if k != "traceback"})[:1500], flush=True)
    return _conclude(result, attempts, out)


#: Seconds each later attempt keeps of the budget while an earlier one runs.
RESERVE_S = 80.0


def probe_isolated(out: Path, bundle: Path, work: Path, attempts: tuple[str, ...] = ATTEMPTS,
                   budget: float | None = None) -> dict[str, Any]:
    """`probe`, each attempt in a child process of its own with its share of `budget` seconds (the later
    attempts keep RESERVE_S each); what a child wrote before it crashed or timed out is kept, with its exit
    and the end of its output."""
    deadline = None if budget is None else time.monotonic() + budget
    result: dict[str, Any] = {"prebuilt_bundle": str(bundle), "attempts": {}, "isolated": True}
    work.mkdir(parents=True, exist_ok=True)
    for index, label in enumerate(attempts):
        part = work / f"{label}.json"
        part.unlink(missing_ok=True)
        limit = None
        if deadline is not None:
            limit = max(10.0, deadline - time.monotonic() - RESERVE_S * (len(attempts) - index - 1))
        command = [sys.executable, "-m", "turbo_trt.benchmarks.rtx_probe", str(part), "--bundle", str(bundle),
                   "--work", str(work), "--attempts", label, "--in-process"]
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=limit)
            exit_code: Any = done.returncode
            output = (done.stdout or "") + (done.stderr or "")
        except subprocess.TimeoutExpired as exc:
            exit_code = f"timed out after {limit:.0f} s"
            output = "".join(x.decode(errors="replace") if isinstance(x, bytes) else (x or "")
                             for x in (exc.stdout, exc.stderr))
        child: dict[str, Any] = {}
        try:
            child = json.loads(part.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            child = {"attempts": {label: {"error": f"the child wrote no readable JSON: {exc}"}}}
        for key in ("gpu", "tensorrt_rtx"):
            if key in child:
                result.setdefault(key, child[key])
        entry = child.get("attempts", {}).get(label, {})
        entry["child"] = {"exit": exit_code, "seconds": round(time.perf_counter() - start, 1),
                          "timeout_s": None if limit is None else round(limit), "output_tail": output[-3000:]}
        if exit_code != 0:
            entry["ran"] = False
            entry.setdefault("error", f"the attempt's process ended with {exit_code}")
        result["attempts"][label] = entry
        _write(out, result)
        print(label, json.dumps({k: v for k, v in entry.items() if k not in ("traceback", "child")})[:1500],
              f"(child exit {exit_code})", flush=True)
    return _conclude(result, attempts, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--bundle", type=Path, required=True, help="the prebuilt tiny SD-Turbo bundle")
    parser.add_argument("--work", type=Path, required=True, help="where the attempts' bundle copies go")
    parser.add_argument("--attempts", nargs="+", choices=ATTEMPTS, default=list(ATTEMPTS))
    parser.add_argument("--budget", type=float, default=None,
                        help=f"seconds for all attempts (each later attempt keeps {RESERVE_S:.0f} s)")
    parser.add_argument("--in-process", action="store_true", help="run the attempts in this process (the child)")
    args = parser.parse_args(argv)
    run = probe if args.in_process else probe_isolated
    kwargs = {} if args.in_process else {"budget": args.budget}
    result = run(args.out, args.bundle, args.work, tuple(args.attempts), **kwargs)
    print(result["verdict"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
