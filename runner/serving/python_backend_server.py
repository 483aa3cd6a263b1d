"""`turbo-trt serve` (default `--backend python`): the exported repository (repository.py) served by the
`tritonserver` binary that the PyTriton wheel ships, as a child process.

Against `--backend pytriton`: each model instance is a Python-backend process of its own (the engines'
weights are loaded once per instance, not shared by `fork()`), and Triton's Python backend answers every
request of a dynamic batch on its own, so a bad request fails alone. Readiness comes from Triton: the model's
`initialize` checks the bundle and warms it up before Triton opens its endpoints. SIGINT/SIGTERM are passed
on to tritonserver, which answers the requests in flight before it exits.
"""

from __future__ import annotations

import signal
import subprocess
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from turbo_trt.errors import UsageError

from .repository import ExportOptions, export_repository
from .tritonserver import die_with_parent, http_ready, kill_tree, listen_summary, server_command

if TYPE_CHECKING:
    from .pytriton_server import ServeOptions

STOP_TIMEOUT_S = 60


def serve_python_backend(options: ServeOptions, log: Callable[[str], None],
                         stop: threading.Event | None = None) -> None:
    """Serve until tritonserver exits, `stop` is set, or SIGINT/SIGTERM arrives."""
    stop = stop or threading.Event()
    if threading.current_thread() is threading.main_thread():
        def on_signal(number: int, frame: Any) -> None:
            stop.set()
            signal.signal(number, signal.SIG_DFL)

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, on_signal)
    with tempfile.TemporaryDirectory(prefix="turbo-trt-serve-") as tmp:
        repository = Path(tmp) / "repository"
        export_repository(ExportOptions(
            engines=options.engines, out=repository, model_name=options.model_name, instances=options.instances,
            executor=options.executor, max_queue_delay_us=options.max_queue_delay_us,
            strict_targets=options.strict_targets,
        ))
        argv, env = server_command(repository, options.http_port, options.grpc_port, options.metrics_port,
                                   options.address)
        log(f"starting tritonserver on {repository} (Python backend, {options.instances} instance(s) per device)")
        # Its own session: a terminal's Ctrl-C reaches only this process, which passes on exactly one signal.
        # die_with_parent: a `serve` killed outright (SIGKILL, OOM) still takes tritonserver along.
        proc = subprocess.Popen(argv, env=env, start_new_session=True, preexec_fn=die_with_parent)
        announced = False
        try:
            while proc.poll() is None and not stop.wait(0.5):
                if not announced and http_ready(options.address, options.http_port):
                    where = listen_summary(options.address, options.http_port, options.grpc_port,
                                           options.metrics_port)
                    log(f"serving model '{options.model_name}': {where}; ready")
                    announced = True
        finally:
            if proc.poll() is None:
                log("stopping: finishing requests in flight ...")
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    kill_tree(proc.pid)
                    proc.wait()
        if not stop.is_set():
            raise UsageError(f"tritonserver exited with status {proc.returncode}"
                             + ("" if announced else " before the model was ready") + "; see its log above")
    log("stopped")
