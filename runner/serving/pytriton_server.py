"""`turbo-trt serve`: Triton Inference Server in this process (PyTriton), the bundle bound as one model.

Order of events: open and check the bundle (manifest, every file's sha256, flavor, GPU), load one pipeline
and fork one more per extra instance (each with its own execution state, all sharing the engines'
weights), warm every instance up (first-call costs and, on a GPU, CUDA graph capture), and only then start
Triton, so `/v2/health/ready` is never true before the model can answer at full speed. A bundle that
fails a check raises before any port opens. SIGINT/SIGTERM stop Triton, which finishes the requests in
flight first.

PyTriton (0.7) answers a dynamic batch as a whole: an exception of the callable fails every request with a
traceback. So the callable never raises: it returns one outcome per request, its image and a hidden BYTES
output (VERDICT_OUTPUT) that is empty for a success and holds `{"message": ..., "bad_request": ...}` (JSON)
for a failure. The model file PyTriton writes is wrapped (`install_stub`, `pytriton_stub.py`): the wrapper
turns each verdict into that request's own error response and strips the output from every reply; the
output is left out of the config Triton serves, so clients never see it. Every request runs once.
`turbo-trt serve` defaults to `--backend python` (python_backend_server.py: Triton's Python backend answers
each request natively); this backend is kept for what only it gives: instances in one process sharing the
engines' weights. `serve` is the one entry point of both.
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

from turbo_trt.errors import UsageError

from .batching import run_requests, warm_up
from .contract import DEFAULT_MODEL_NAME, TensorSpec, model_inputs, model_outputs
from .errors import answers
from .requests import ModelFacts, decode_requests
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


#: The callable's per-request verdict output; pytriton_stub.py holds the same name.
VERDICT_OUTPUT = "turbo_trt_verdict"
STUB = Path(__file__).with_name("pytriton_stub.py")
LOGGER = logging.getLogger(__name__)


def verdict(message: str, bad_request: bool) -> bytes:
    """A failed request's verdict (the payload of VERDICT_OUTPUT)."""
    return json.dumps({"message": message, "bad_request": bad_request}).encode()


def make_infer_func(pipe: Any, log: Callable[[str], None] | None = None,
                    model: str = DEFAULT_MODEL_NAME) -> Callable[[list[Any]], list[dict[str, np.ndarray]]]:
    """PyTriton's callable for one instance: a list of requests (Triton's dynamic batch) -> one reply per
    request, never an exception: `image` (zeros for a failed request) and VERDICT_OUTPUT (empty for a
    success). The good requests of a batch run once, beside the bad ones."""
    facts = ModelFacts.of(pipe)
    write = log or LOGGER.error
    blank = np.zeros((1, facts.height, facts.width, 3), np.uint8)

    def infer(requests: list[Any]) -> list[dict[str, np.ndarray]]:
        outcomes: list[Any]
        try:
            outcomes = run_requests(pipe, decode_requests(requests, facts, lambda request: dict(request.data)))
        except Exception as exc:  # noqa: BLE001 - outside the engine calls: every request of the batch
            outcomes = [exc] * len(requests)
        replies = answers(outcomes, write, model)
        return [{"image": np.asarray(outcome)[None], VERDICT_OUTPUT: np.array([[b""]], dtype=object)}
                if reply is None else
                {"image": blank, VERDICT_OUTPUT: np.array([[verdict(reply.message, reply.bad_request)]], dtype=object)}
                for outcome, reply in zip(outcomes, replies)]

    return infer


def install_stub(model_dir: Path) -> None:
    """Put `pytriton_stub.py` in place of the `1/model.py` PyTriton wrote in `model_dir` (kept beside it as
    pytriton_model.py, which the stub runs) and leave VERDICT_OUTPUT out of the config Triton serves."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2  # PyTriton writes its configs with it

    version_dir = model_dir / "1"
    model = version_dir / "model.py"
    config_path = model_dir / "config.pbtxt"
    if not model.is_file() or "class TritonPythonModel" not in model.read_text() or not config_path.is_file():
        raise UsageError(f"PyTriton wrote no model.py with a TritonPythonModel (or no config.pbtxt) in {model_dir}: "
                         "this PyTriton version is not one turbo-trt can wrap; use `--backend python`")
    config = text_format.Parse(config_path.read_text(), model_config_pb2.ModelConfig())
    kept = [output for output in config.output if output.name != VERDICT_OUTPUT]
    if len(kept) != len(config.output) - 1:
        raise UsageError(f"{config_path} has no output {VERDICT_OUTPUT}: use `--backend python`")
    del config.output[:]
    config.output.extend(kept)
    config_path.write_text(text_format.MessageToString(config))
    os.replace(model, version_dir / "pytriton_model.py")
    shutil.copyfile(STUB, model)


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

    return [Tensor(name=s.name, dtype=s.numpy_dtype, shape=s.config_dims, optional=s.optional) for s in specs]


def serve(options: ServeOptions, log: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """Serve with `options.backend` until `stop` is set or SIGINT/SIGTERM arrives (signals only when called
    in the main thread)."""
    if options.backend == "python":
        from .python_backend_server import serve_python_backend

        serve_python_backend(options, log, stop)
    elif options.backend == "pytriton":
        serve_pytriton(options, log, stop)
    else:
        raise UsageError(f"--backend must be python or pytriton, got {options.backend!r}")


def serve_pytriton(options: ServeOptions, log: Callable[[str], None], stop: threading.Event | None = None) -> None:
    """`--backend pytriton`: Triton bound to this process."""
    try:
        from pytriton.model_config import DynamicBatcher, ModelConfig
        from pytriton.triton import Triton, TritonConfig, TritonLifecyclePolicy
        from pytriton.utils.workspace import Workspace
    except ImportError as exc:
        raise UsageError("`turbo-trt serve` needs PyTriton: pip install 'turbo-trt[serve]'") from exc

    pipes = load_instances(options, log)
    triton = None
    try:
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
        workspace = Workspace()
        triton = Triton(config=config, workspace=workspace,
                        triton_lifecycle_policy=TritonLifecyclePolicy(launch_triton_on_startup=False,
                                                                      local_model_store=True))
        triton.bind(
            model_name=options.model_name,
            infer_func=[make_infer_func(pipe, log, options.model_name) for pipe in pipes],
            inputs=_triton_tensors(model_inputs(height, width, pipes[0].controlnets)),
            outputs=_triton_tensors([*model_outputs(height, width), TensorSpec(VERDICT_OUTPUT, "STRING", (1,))]),
            config=ModelConfig(max_batch_size=pipes[0].batch,
                               batcher=DynamicBatcher(max_queue_delay_microseconds=options.max_queue_delay_us)),
            strict=True,
        )
        install_stub(workspace.model_store_path / options.model_name)
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
        if triton is not None:
            triton.stop()
        for pipe in pipes:
            pipe.close()
    log("stopped")
