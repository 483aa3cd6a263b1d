"""`turbo-trt live`: load a bundle, warm it up, then serve the page and the WebSocket with uvicorn.

The port is bound only after warm-up, so anything that answers is warm (GET /health). SIGINT/SIGTERM:
uvicorn closes the connections (waiting up to GRACEFUL_S), then the pool finishes what runs and closes.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbo_trt.errors import UsageError

from ..stream import StreamPool
from .app import LiveApp, LiveLimits

GRACEFUL_S = 5


@dataclass
class LiveOptions:
    engines: Path
    address: str = "127.0.0.1"
    port: int = 8080
    max_clients: int = 8
    max_message: int = 4 * 2**20
    instances: int = 1
    executor: str = "auto"
    strict_targets: bool = True

    def check(self) -> None:
        if not 0 <= self.port <= 65535:
            raise UsageError(f"--port must be in 0..65535, got {self.port}")
        if self.max_clients < 1:
            raise UsageError(f"--max-clients must be at least 1, got {self.max_clients}")
        if self.max_message < 1024:
            raise UsageError(f"--max-message must be at least 1024 bytes, got {self.max_message}")
        if self.instances < 1:
            raise UsageError(f"--instances must be at least 1, got {self.instances}")


#: Bytes over --max-message that the transport still reads (and the app answers with an error).
WS_SLACK = 4096
#: Client messages the transport buffers per connection before it stops reading the socket (the app reads
#: one at a time, so this bounds a client's memory at about WS_MAX_QUEUE * ws_max_size).
WS_MAX_QUEUE = 2


def ws_max_size(max_message: int) -> int:
    """The transport's own limit: a message up to --max-message plus WS_SLACK bytes is read and answered
    with an error when over --max-message; a larger one closes the connection (code 1009, message too big)
    before it is buffered."""
    return max_message + WS_SLACK


def load_pool(options: LiveOptions, log: Callable[[str], None]) -> tuple[StreamPool, str]:
    """The bundle's pipeline and its forks, each warmed up (every step count, both modes; graphs captured)."""
    from ..pipeline import TurboPipeline
    from ..serving.batching import warm_up

    log(f"loading {options.engines} ...")
    pipe = TurboPipeline.from_bundle(options.engines, executor=options.executor, strict_targets=options.strict_targets)
    log(pipe.executor_choice.describe())
    pipes = [pipe] + [pipe.fork() for _ in range(options.instances - 1)]
    try:
        for i, each in enumerate(pipes):
            calls = warm_up(each)
            log(f"engine {i + 1}/{len(pipes)} warm ({calls} calls)")
    except BaseException:
        for each in pipes:
            each.close()
        raise
    return StreamPool(pipes), pipe.executor.name


def bind(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((address, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"cannot bind {address}:{port}: {exc.strerror or exc}; pick another --port or --address") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def url(address: str, port: int) -> str:
    host = f"[{address}]" if ":" in address else address
    return f"http://{host}:{port}/"


def serve(options: LiveOptions, log: Callable[[str], None]) -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn
    except ImportError as exc:
        raise UsageError(f"turbo-trt live needs the `live` extra ({exc.name} is missing): "
                         "pip install 'turbo-trt[live]'") from None
    options.check()
    pool, executor = load_pool(options, log)
    try:
        app = LiveApp(pool, LiveLimits(options.max_clients, options.max_message), executor)
        sock = bind(options.address, options.port)
        port = sock.getsockname()[1]
        config: Any = uvicorn.Config(app.asgi(), log_level="warning", lifespan="off",
                                     ws_max_size=ws_max_size(options.max_message), ws_max_queue=WS_MAX_QUEUE,
                                     timeout_graceful_shutdown=GRACEFUL_S)
        log(f"serving {url(options.address, port)} (WebSocket /ws, health /health; up to {options.max_clients} "
            "clients); Ctrl-C stops")
        try:
            uvicorn.Server(config).run(sockets=[sock])
        except KeyboardInterrupt:  # uvicorn re-raises the SIGINT it handled once it has shut down
            pass
    finally:
        pool.close()
        log("stopped")
