"""`turbo-trt live`: the real-time page and WebSocket server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import EXECUTOR_HELP, HelpFormatter, defaults, executors


def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ..runner.live.server import LiveOptions

    d = defaults(LiveOptions)
    p = sub.add_parser(
        "live",
        help="real-time page and WebSocket server: camera frames restyled live, images that follow a typed prompt",
        description="Load and warm up a bundle, then serve a web page (GET /) and a WebSocket (/ws) with "
                    "uvicorn. Each client sends JSON settings and JPEG/PNG frames and gets one result per "
                    "input it sent (newest wins when it sends faster than the engines run); clients share "
                    "the engines round robin. The port opens only after warm-up (GET /health). Browsers "
                    "must come from the server's own page (the Origin header is checked). Protocol: README, "
                    "Real time > turbo-trt live. Needs the `live` extra.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--engines", type=Path, required=True, help="bundle directory written by `turbo-trt build`")
    p.add_argument("--address", default=d["address"],
                   help="address to bind: loopback by default; 0.0.0.0 serves other machines (the camera then "
                        "needs HTTPS in front: browsers allow getUserMedia only on https or localhost)")
    p.add_argument("--port", type=int, default=d["port"], help="TCP port (0: any free port, printed at start)")
    p.add_argument("--max-clients", type=int, default=d["max_clients"],
                   help="WebSocket clients served at once; one more is closed with code 1013 and a reason")
    p.add_argument("--max-message", type=int, default=d["max_message"],
                   help="largest client message in bytes; a larger one is answered with an error, and one over it by "
                        "more than 4 KiB closes the connection (code 1009, message too big)")
    p.add_argument("--instances", type=int, default=d["instances"],
                   help="pipelines (forks sharing the weights, one execution state each) the clients share")
    p.add_argument("--executor", choices=executors(), default=d["executor"], help=EXECUTOR_HELP)
    p.add_argument("--ignore-targets", action="store_true",
                   help="run TensorRT engines even on a GPU outside the compute capabilities they were built for")


def run(args: argparse.Namespace) -> int:
    from ..runner.live.server import LiveOptions, serve

    options = LiveOptions(engines=args.engines, address=args.address, port=args.port, max_clients=args.max_clients,
                          max_message=args.max_message, instances=args.instances, executor=args.executor,
                          strict_targets=not args.ignore_targets)
    serve(options, lambda message: print(f"turbo-trt live: {message}", file=sys.stderr, flush=True))
    return 0
