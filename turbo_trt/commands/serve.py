"""`turbo-trt serve`: a bundle on Triton Inference Server."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .common import EXECUTOR_HELP, HelpFormatter, defaults, executors


def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ..runner.serving.pytriton_server import ServeOptions

    d = defaults(ServeOptions)
    p = sub.add_parser(
        "serve",
        help="serve a bundle on NVIDIA Triton Inference Server",
        description="Serve a bundle as one Triton model: HTTP and gRPC (KServe v2 protocol), dynamic batching "
                    "up to the bundle's batch, health and metrics. Each instance checks the bundle and warms "
                    "up before Triton reports ready. Each request is answered on its own: a bad one gets an "
                    "error that starts with the field's name, and the requests batched with it their images; "
                    "an internal failure gets 'internal error (id ...)', and the log has that id beside the "
                    "traceback. SIGINT/SIGTERM stop it after the requests in flight. Model inputs: prompt BYTES [1]; "
                    "optional seed INT64 [1], steps INT32 [1], image UINT8 [H, W, 3], strength FP32 [1]; "
                    "output: image UINT8 [H, W, 3] (see README, Serve). Needs the `serve` extra.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--engines", type=Path, required=True, help="bundle directory written by `turbo-trt build`")
    p.add_argument("--model-name", default=d["model_name"], help="name of the model in Triton")
    p.add_argument("--address", default=d["address"],
                   help="address the HTTP, gRPC and metrics endpoints bind: loopback by default; use 0.0.0.0 "
                        "to serve other machines (behind a load balancer)")
    p.add_argument("--http-port", type=int, default=d["http_port"], help="HTTP port")
    p.add_argument("--grpc-port", type=int, default=d["grpc_port"], help="gRPC port")
    p.add_argument("--metrics-port", type=int, default=d["metrics_port"], help="Prometheus metrics port")
    p.add_argument("--instances", type=int, default=d["instances"],
                   help="model instances (per GPU with --backend python): each runs one batch at a time")
    p.add_argument("--executor", choices=executors(), default=d["executor"], help=EXECUTOR_HELP)
    p.add_argument("--max-queue-delay-us", type=int, default=d["max_queue_delay_us"],
                   help="how long Triton's dynamic batcher waits to fill a batch (microseconds)")
    p.add_argument("--ignore-targets", action="store_true",
                   help="run TensorRT engines even on a GPU outside the compute capabilities they were built for")
    p.add_argument("--backend", choices=["python", "pytriton"], default=d["backend"],
                   help="python: the `export-triton` repository on the tritonserver binary PyTriton ships, one "
                        "Triton Python-backend process per instance, each with its own copy of the engines' "
                        "weights; pytriton: Triton bound to this process through PyTriton, instances are "
                        "fork()s sharing one copy of the weights (less device memory per extra instance)")


def run(args: argparse.Namespace) -> int:
    from ..runner.serving.pytriton_server import ServeOptions, serve

    options = ServeOptions(
        engines=args.engines, model_name=args.model_name, address=args.address, http_port=args.http_port,
        grpc_port=args.grpc_port, metrics_port=args.metrics_port, instances=args.instances, executor=args.executor,
        max_queue_delay_us=args.max_queue_delay_us, strict_targets=not args.ignore_targets, backend=args.backend,
    )
    log = lambda message: print(f"turbo-trt serve: {message}", file=sys.stderr, flush=True)  # noqa: E731
    serve(options, log)
    return 0
