"""`turbo-trt serve`: Triton Inference Server in this process (PyTriton), the bundle bound as one model.

Order of events: open and check the bundle (manifest, every file's sha256, flavor, GPU), load one pipeline
and fork one more per extra instance (each with its own execution state, all sharing the engines'
weights), warm every instance up (first-call costs and, on a GPU, CUDA graph capture), and only then start
Triton, so `/v2/health/ready` is never true before the model can answer at full speed. A bundle that
fails a check raises before any port opens. SIGINT/SIGTERM stop Triton, which finishes the requests in
flight first.

PyTriton (0.7) answers a dynamic batch as a whole, with a traceback: the model file it writes is wrapped
(`install_stub`, `pytriton_stub.py`) so that each request gets its own answer. The callable raises a
`BatchVerdict` (one reply per request) when any request fails; the wrapper answers the failed ones with
their messages and sends the others again alone. `turbo-trt serve` defaults to `--backend python`
(python_backend_server.py: Triton's Python backend answers each request natively); this backend is kept for
what only it gives: instances in one process sharing the engines' weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from turbo_trt.errors import InputError, UsageError

from .batching import run_requests, warm_up
from .contract import DEFAULT_MODEL_NAME, model_inputs, model_outputs
from .errors import Answer, answers
from .requests import ModelFacts, ServeRequest, decode_request
from .tritonserver import listen_summary, python_library_env

#: How long Triton waits for requests in flight when stopping: below PyTriton's own 30 s limit, after which
#: it kills tritonserver, so Triton's graceful drain always gets to finish first.
EXIT_TIMEOUT_S = 25

#: Loopback only by default; `--address 0.0.0.0` serves other machines (behind a load balancer).
DEFAULT_ADDRESS = "127.0.0.1"


@dataclass
class ServeOptions:
    engines: Path
    model_name: str = DEFAULT_MODEL_NAME
    address: str = DEFAULT_ADDRESS
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    instances: int = 1
    executor: str = "auto"
    max_queue_delay_us: int = 2000
    strict_targets: bool = True
    backend: str = "python"  # python_backend_server.py; or "pytriton": this module


#: Precedes the JSON replies in a BatchVerdict's text; pytriton_stub.py holds the same text.
VERDICT_MARKER = "turbo-trt-verdict:"
STUB = Path(__file__).with_name("pytriton_stub.py")


class BatchVerdict(Exception):
    """Raised by the PyTriton callable when a request of its batch failed: one reply per request,
    `[message, bad_request]` or None (fine: to be sent again without the others), as JSON after
    VERDICT_MARKER, which `pytriton_stub.py` reads back out of the error text PyTriton hands to Triton."""

    def __init__(self, replies: list[Answer | None]) -> None:
        payload = [None if r is None else [r.message, r.bad_request] for r in replies]
        super().__init__(VERDICT_MARKER + json.dumps(payload))


class _QuietVerdicts(logging.Filter):
    """PyTriton logs every exception of a callable with its traceback; a verdict is already logged (one line
    per bad request, the traceback of an internal error under its id)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return VERDICT_MARKER not in record.getMessage()


def make_infer_func(pipe: Any, log: Callable[[str], None] | None = None,
                    model: str = DEFAULT_MODEL_NAME) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    """PyTriton's callable for one instance: a list of requests (Triton's dynamic batch) -> their images.
    A batch with a bad request runs nothing: the wrapper sends the good ones again without it."""
    facts = ModelFacts.of(pipe)
    write = log or (lambda message: None)

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        outcomes: list[Any]
        try:
            decoded: list[ServeRequest | Exception] = []
            for request in requests:
                try:
                    decoded.append(decode_request(dict(request.data), facts))
                except InputError as exc:
                    decoded.append(exc)
            if any(isinstance(r, Exception) for r in decoded):
                outcomes = decoded
            else:
                outcomes = run_requests(pipe, decoded)
        except Exception as exc:  # noqa: BLE001 - outside the engine calls: every request of the batch
            outcomes = [exc] * len(requests)
        replies = answers(outcomes, write, model)
        if any(reply is not None for reply in replies):
            raise BatchVerdict(replies)
        return [{"image": np.asarray(outcome)[None]} for outcome in outcomes]  # every outcome is an image here

    return infer


def install_stub(version_dir: Path) -> None:
    """Put `pytriton_stub.py` in place of the model.py PyTriton wrote in `version_dir` (kept beside it as
    pytriton_model.py, which the stub runs)."""
    model = version_dir / "model.py"
    if not model.is_file() or "class TritonPythonModel" not in model.read_text():
        raise UsageError(f"PyTriton wrote no model.py with a TritonPythonModel in {version_dir}: this PyTriton "
                         "version is not one turbo-trt can wrap; use `--backend python`")
    os.replace(model, version_dir / "pytriton_model.py")
    shutil.copyfile(STUB, version_dir / "model.py")


def load_instances(options: ServeOptions, log: Callable[[str], None]) -> list[Any]:
    """Open and check the bundle, make one pipeline per instance and warm each up."""
    from ..pipeline import TurboPipeline

    if options.instances < 1:
        raise UsageError(f"--instances must be at least 1, got {options.instances}")
    start = time.perf_counter()
    log(f"opening {options.engines} (checking every file's sha256) ...")
    first = TurboPipeline.from_bundle(options.engines, executor=options.executor, strict_targets=options.strict_targets)
    pipes = [first] + [first.fork() for _ in range(options.instances - 1)]
    for index, pipe in enumerate(pipes):
        calls = warm_up(pipe)
        log(f"instance {index}: warmed up ({calls} calls)")
    log(f"{len(pipes)} instance(s) of {first.executor.name} ready in {time.perf_counter() - start:.1f} s")
    return pipes


def _triton_tensors(specs: list[Any]) -> list[Any]:
    from pytriton.model_config import Tensor

    return [Tensor(name=s.name, dtype=s.numpy_dtype, shape=s.dims, optional=s.optional) for s in specs]


def serve(options: ServeOptions, log: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """Serve until `stop` is set or SIGINT/SIGTERM arrives (signals only when called in the main thread)."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
        from pytriton.utils.workspace import Workspace
    except ImportError as exc:
        raise UsageError("`turbo-trt serve` needs PyTriton: pip install 'turbo-trt[serve]'") from exc

    pipes = load_instances(options, log)
    shapes = pipes[0].shapes
    height, width = int(shapes["height"]), int(shapes["width"])
    # The Python backend's stub (a child of tritonserver) must load this interpreter's libpython.
    os.environ.update(python_library_env())
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(number: int, frame: Any) -> None:
            stop.set()  # the first signal stops gracefully; a second one gets the default action (exit now)
            signal.signal(number, signal.SIG_DFL)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
    logging.getLogger("pytriton.proxy.inference").addFilter(_QuietVerdicts())
    config = TritonConfig(
        http_address=options.address, http_port=options.http_port, grpc_address=options.address,
        grpc_port=options.grpc_port, metrics_address=options.address, metrics_port=options.metrics_port,
        strict_readiness=True, exit_timeout_secs=EXIT_TIMEOUT_S,
    )
    # The model is written to a local model store before tritonserver starts, so Triton loads it during
    # startup: the endpoints open (and /v2/health/ready turns true) only once the model is loaded.
    workspace = Workspace()
    triton = Triton(config=config, workspace=workspace,
                    triton_lifecycle_policy=TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True))
    try:
        triton.bind(
            model_name=options.model_name,
            infer_func=[make_infer_func(pipe, log, options.model_name) for pipe in pipes],
            inputs=_triton_tensors(model_inputs(height, width)),
            outputs=_triton_tensors(model_outputs(height, width)),
            config=ModelConfig(max_batch_size=pipes[0].batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us)),
            strict=True,
        )
        install_stub(workspace.model_store_path / options.model_name / "1")
        try:
            triton.run()
        except Exception as exc:  # PyTriton's own errors (a port in use, tritonserver exiting) carry no common base
            raise UsageError(f"Triton did not start ({type(exc).__name__}: {exc}); see its log above") from exc
        log(f"serving model '{options.model_name}' ({len(pipes)} instance(s), batch {pipes[0].batch}): "
            f"{listen_summary(options.address, options.http_port, options.grpc_port, options.metrics_port)}; ready")
        while not stop.wait(0.5):
            if not triton.is_alive():
                raise UsageError("Triton stopped unexpectedly; see its log above")
        log("stopping: finishing requests in flight ...")
    finally:
        triton.stop()
        for pipe in pipes:
            pipe.close()
    log("stopped")
