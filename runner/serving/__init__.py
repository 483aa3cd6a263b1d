"""Serving a bundle on NVIDIA Triton Inference Server.

Two ways, one set of rules (`requests` checks every request, `batching` runs checked requests in engine
calls of the bundle's batch):

- `turbo-trt serve` (`pytriton_server`): Triton in this process through PyTriton, one pipeline per
  model instance made with `TurboPipeline.fork()`.
- `turbo-trt export-triton` (`repository`): a standard model repository whose Python-backend `model.py`
  (`triton_model`) calls the runner, for a stock `tritonserver`; `tritonserver` starts the binary that
  the PyTriton wheel ships on such a repository, and `turbo-trt serve --backend python`
  (`python_backend_server`) does that with a temporary repository.
- `client`: builds a request for tritonclient (HTTP or gRPC).

Nothing here imports torch, diffusers or transformers; PyTriton and tritonclient are imported only by the
functions that need them (the `serve` extra).
"""
