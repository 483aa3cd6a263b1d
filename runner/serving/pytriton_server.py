"""`turbo-trt serve`: Triton Inference Server in this process (PyTriton), the bundle bound as one model.

Order of events: open and check the bundle (manifest, every file's sha256, flavor, GPU), load one pipeline
and fork one more per extra instance (each with its own execution state, all sharing the engines'
weights), warm every instance up (first-call costs and, on a GPU, CUDA graph capture), and only then start
Triton, so `/v2/health/ready` is never true before the model can answer at full speed. A bundle that
fails a check raises before any port opens. SIGINT/SIGTERM stop Triton, which finishes the requests in
flight first.

PyTriton answers a dynamic batch as a whole: a request that fails its checks fails the other requests that
Triton grouped into the same batch (they get an error naming the bad request). The exported repository
(`export-triton`, or `serve --backend python`: Triton's Python backend) answers each request on its own.
"""

from __future__ import annotations

import os
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
    backend: str = "pytriton"  # or "python": python_backend_server.py


class BatchError(InputError):
    """A batch held a request that broke a rule (PyTriton fails a batch as a whole)."""


def make_infer_func(pipe: Any) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    """PyTriton's callable for one instance: a list of requests (Triton's dynamic batch) -> their images."""
    facts = ModelFacts.of(pipe)

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        decoded: list[ServeRequest | Exception] = []
        for request in requests:
            try:
                decoded.append(decode_request(dict(request.data), facts))
            except InputError as exc:
                decoded.append(exc)
        bad = [(i, r) for i, r in enumerate(decoded) if isinstance(r, Exception)]
        if bad:
            if len(requests) == 1:
                raise bad[0][1]
            reasons = "; ".join(f"request {i + 1} of {len(requests)}: {error}" for i, error in bad)
            raise BatchError(f"{reasons} (requests batched with a bad one are not run: send them again)")
        outcomes = run_requests(pipe, decoded)
        for outcome in outcomes:
            if isinstance(outcome, Exception):
                raise outcome
        return [{"image": outcome[None]} for outcome in outcomes]  # type: ignore[index]

    return infer


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
    config = TritonConfig(
        http_address=options.address, http_port=options.http_port, grpc_address=options.address,
        grpc_port=options.grpc_port, metrics_address=options.address, metrics_port=options.metrics_port,
        strict_readiness=True, exit_timeout_secs=EXIT_TIMEOUT_S,
    )
    # The model is written to a local model store before tritonserver starts, so Triton loads it during
    # startup: the endpoints open (and /v2/health/ready turns true) only once the model is loaded.
    triton = Triton(config=config,
                    triton_lifecycle_policy=TritonLifecyclePolicy(launch_triton_on_startup=False, local_model_store=True))
    try:
        triton.bind(
            model_name=options.model_name,
            infer_func=[make_infer_func(pipe) for pipe in pipes],
            inputs=_triton_tensors(model_inputs(height, width)),
            outputs=_triton_tensors(model_outputs(height, width)),
            config=ModelConfig(max_batch_size=pipes[0].batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us)),
            strict=True,
        )
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
