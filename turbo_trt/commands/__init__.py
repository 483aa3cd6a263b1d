"""One module per `turbo-trt` command, each with `add(subparsers)` and `run(args) -> int`."""

COMMANDS = ("build", "generate", "bench", "serve", "export-triton", "live")
