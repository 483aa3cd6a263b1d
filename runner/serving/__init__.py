"""Serving a bundle on NVIDIA Triton Inference Server.

Two ways, one set of rules (`requests` checks every request, `batching` runs checked requests in engine
calls of the bundle's batch, `errors` says what a client reads when a request fails):

- `turbo-trt export-triton` (`repository`): a standard model repository whose Python-backend `model.py`
  (`triton_model`) calls the runner, for a stock `tritonserver`; `tritonserver` starts the binary that
  the PyTriton wheel ships on such a repository, and `turbo-trt serve` (default `--backend python`,
  `python_backend_server`) does that with a temporary repository.
- `turbo-trt serve --backend pytriton` (`pytriton_server`): Triton bound to this process through PyTriton,
  one pipeline per model instance made with `TurboPipeline.fork()`; PyTriton's model file is wrapped
  (`pytriton_stub`) so that each request of a batch gets its own answer.
- `client`: builds a request for tritonclient (HTTP or gRPC) or as the KServe v2 JSON body.

Nothing here imports torch, diffusers or transformers; PyTriton and tritonclient are imported only by the
functions that need them (the `serve` extra).
"""
