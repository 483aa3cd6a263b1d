"""Does TensorRT-RTX run on this GPU? Run THERE (the GPU machine): `python3 -m turbo_trt.benchmarks.rtx_probe OUT.json`.

Builds the tiny SD-Turbo bundle twice with TensorRT-RTX on this machine (targets `current`, and the
portable default that a CPU machine builds), then for each: the engine validity TensorRT-RTX reports,
whether the engines deserialize, whether an image comes out, and whether it matches the ONNX Runtime CPU
executor. Every outcome and message is recorded, whatever it is; the script itself only fails on a bug.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from typing import Any


def _attempt(bundle: Path) -> dict[str, Any]:
    import numpy as np

    from turbo_trt.flavors import load_flavor
    from turbo_trt.runner import TurboPipeline

    out: dict[str, Any] = {}
    trt = load_flavor("tensorrt-rtx").trt
    plan = next(bundle.glob("unet*.plan"))
    try:
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        validity = runtime.get_engine_validity(plan.read_bytes()[: runtime.engine_header_size])
        out["engine_validity"] = str(validity)
    except Exception as exc:
        out["engine_validity"] = f"query failed: {exc}"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            start = time.perf_counter()
            pipe = TurboPipeline.from_bundle(bundle, executor="tensorrt", strict_targets=False)
            out["load_s"] = round(time.perf_counter() - start, 3)
            image = pipe("a photo of a cat", num_inference_steps=2, seed=3, output_type="np")
            ref = TurboPipeline.from_bundle(bundle, executor="onnxruntime")("a photo of a cat", num_inference_steps=2,
                                                                           seed=3, output_type="np")
            diff = np.abs(image.astype(int) - ref.astype(int))
            out.update(ran=True, max_abs_diff_vs_onnxruntime_cpu=int(diff.max()),
                       mean_abs_diff=round(float(diff.mean()), 4), graph_stats=pipe.executor.graph_stats(),
                       memory=pipe.executor.memory_report())
            pipe.close()
        except Exception as exc:
            out.update(ran=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
    out["warnings"] = [str(w.message) for w in caught]
    return out


def main(path: str) -> int:
    from turbo_trt.builder.build import build
    from turbo_trt.builder.engine import EngineOptions
    from turbo_trt.builder.options import BuildOptions
    from turbo_trt.gpu import current_gpu
    from turbo_trt.progress import Progress

    result: dict[str, Any] = {"gpu": current_gpu(), "bundles": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, targets in (("targets-current", ("current",)), ("portable-default", ())):
            bundle = Path(tmp) / label
            entry: dict[str, Any] = {"targets": list(targets) or "default"}
            try:
                start = time.perf_counter()
                build(BuildOptions(model="tiny-sd-turbo", out=bundle, height=64, width=64, flavor="tensorrt-rtx",
                                   engine=EngineOptions(targets=targets)), Progress(enabled=False))
                entry["build_s"] = round(time.perf_counter() - start, 1)
                entry.update(_attempt(bundle))
            except Exception as exc:
                entry.update(built=False, error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-3000:])
            result["bundles"][label] = entry
            print(label, json.dumps({k: v for k, v in entry.items() if k != "traceback"})[:1500], flush=True)
    Path(path).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "rtx-probe.json"))
