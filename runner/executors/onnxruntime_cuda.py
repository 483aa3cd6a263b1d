"""ONNX Runtime CUDA executor: the bundle's ONNX graphs on a GPU where its TensorRT engines cannot run (no
TensorRT installed, or TensorRT-RTX engines on a GPU outside their targets, such as Hopper).

Like the TensorRT executor, every buffer is an OrtValue allocated on the device at load and every session's
IO binding is made once: the text encoders write the embeddings the UNet reads; the UNet has one binding
per step position j (0 = the last step run) reading latents[j + 1] and writing latents[j]; the VAE encoder
has one binding per possible number of UNet runs r, writing latents[r]; the decoder reads latents[0]. So
nothing travels through the host between stages: per image the host updates the inputs in place (ids,
noise, the plan's timesteps and coefficients: a few hundred bytes besides the noise), runs the sessions,
and reads the uint8 image back. With CUDA graphs on (ONNX Runtime's `enable_cuda_graph`), each binding
replays its own graph, told apart by the `gpu_graph_id` run option; every binding runs a few times at load
so all graphs are captured before the first image, and a session whose graph cannot be captured (a node
ONNX Runtime places on the CPU) is re-created without graphs, with a warning. With graphs on, images of
all such executors in a process take turns (ONNX Runtime captures in global mode).

The prompt cache keeps embeddings on the host (ONNX Runtime's Python API has no device-to-device copy);
a hit uploads them in place of running the text encoders.

`device="cpu"` runs the same bindings on the CPU provider: that is how the binding logic is tested on a
machine without a GPU.

Determinism. Every session asks cuDNN for its heuristic convolution algorithm (`cudnn_conv_algo_search`
HEURISTIC, see `cuda_provider_options`), not ONNX Runtime's default timed search, so on one GPU with one set
of library versions:
- bit for bit equal: images of two sessions of one bundle (a fork, a session re-created without graphs,
  another process), and CUDA-graph replay against plain runs (tests/test_gpu.py checks both);
- within a tolerance (at most 3 levels of 255, mean below 0.5, the same bound as TensorRT): images against
  ONNX Runtime on the CPU, against TensorRT, and across GPU models or library versions.

Uploads. `OrtValue.update_inplace` from host memory is complete when it returns: ONNX Runtime copies with
`cudaMemcpy` and then synchronizes the legacy default stream (`cudaMemcpy_HostToDevice` in its CUDA
provider, onnxruntime/core/providers/cuda/cuda_provider_factory.cc, added by microsoft/onnxruntime#9841
because a pageable `cudaMemcpy` may return before the DMA lands while sessions compute on non-blocking
streams). And each `run_with_iobinding` returns only after the session's stream is synchronized
(`run_options`), so an upload never overwrites a buffer a kernel still reads. Staging through pinned
buffers would only shorten copies of a few kilobytes (ids, noise, coefficients); tests/test_gpu.py checks
the ordering on a GPU with a 64 MiB upload read at once by a run.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import io
import os
import re
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from turbo_trt.errors import ExecutionError, ExecutorUnavailable
from turbo_trt.io_contract import EMBEDDING_FEEDS, manifest_io

from ..bundle import Bundle
from ..inputs import Control, Noise
from ..schedule import Plan
from .base import Executor, Timings

CUDA_PROVIDER = "CUDAExecutionProvider"
#: Runs of each binding at load: ONNX Runtime's CUDA provider runs a graph id plainly a couple of times
#: before it captures it, so after these every graph exists and no image pays for a capture.
WARM_RUNS = 3
#: ONNX Runtime captures in global mode, where a blocking copy from another thread breaks the capture; with
#: graphs on, images of all executors in the process take turns (ONNX Runtime CUDA is the fallback path).
_GRAPH_LOCK = threading.Lock()


class GraphFallbackWarning(RuntimeWarning):
    """A session could not use CUDA graphs and runs without them."""


def cuda_provider_options(graphs: bool, device_id: int = 0) -> dict[str, str]:
    """The CUDA execution provider's options for every session of this executor (and the probe session).

    `cudnn_conv_algo_search`: HEURISTIC. ONNX Runtime's default, EXHAUSTIVE, times every cuDNN algorithm
    at a session's first run and keeps the fastest: timings are noisy, so two sessions of one graph (a fork,
    a re-created session) may keep different algorithms and give images a few levels apart, and the first
    full-size run spends a long time searching. HEURISTIC takes cuDNN's heuristic choice, a function of the
    shapes, the GPU and the library versions alone, so every session of one graph on one machine runs the
    same convolution kernels.
    """
    return {"device_id": str(device_id), "enable_cuda_graph": "1" if graphs else "0",
            "cudnn_conv_algo_search": "HEURISTIC"}


def session_providers(device: str, graphs: bool) -> list[Any]:
    """The provider list every session of the executor is created with."""
    if device == "cuda":
        return [(CUDA_PROVIDER, cuda_provider_options(graphs))]
    return ["CPUExecutionProvider"]


def run_options(ort: Any, graph_id: int | None) -> Any:
    """RunOptions for one session run. `disable_synchronize_execution_providers` is left at "0" on purpose
    (written out so it is visible): the run returns only once the CUDA stream of the session is
    synchronized, so no kernel still reads an input buffer when the next `update_inplace` overwrites it."""
    options = ort.RunOptions()
    options.add_run_config_entry("disable_synchronize_execution_providers", "0")
    if graph_id is not None:
        options.add_run_config_entry("gpu_graph_id", str(graph_id))
    return options


def nvidia_library_dirs() -> list[Path]:
    """Folders `nvidia/<package>/lib` of the nvidia-* wheels (torch's CUDA and cuDNN) on sys.path, in
    sys.path order: where the CUDA provider's libraries are when onnxruntime-gpu sits in another site."""
    import site

    roots = [*sys.path, *site.getsitepackages(), site.getusersitepackages()]
    found: list[Path] = []
    for root in roots:
        for lib in sorted(Path(root or ".").glob("nvidia/*/lib")):
            resolved = lib.resolve()
            if resolved.is_dir() and resolved not in found:
                found.append(resolved)
    return found


_PRELOAD_LOCK = threading.Lock()
_preload_report: list[str] = []


def preload_cuda_libraries(ort: Any) -> list[str]:
    """Load CUDA and cuDNN from every `nvidia/*/lib` folder found (ONNX Runtime's own `preload_dlls`, given
    each folder), so the CUDA provider finds them whether onnxruntime-gpu sits beside them or not.

    `preload_dlls()` without a directory looks in `nvidia/...` beside the onnxruntime package only, which
    misses torch's libraries when onnxruntime-gpu is installed in another site folder. Returns what
    preload_dlls printed (its failures), once per process."""
    with _PRELOAD_LOCK:
        if _preload_report or not hasattr(ort, "preload_dlls"):
            return _preload_report
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            dirs = nvidia_library_dirs()
            for lib in dirs:
                cuda = any(lib.glob("libcudart.so.*")) or any(lib.glob("libcublas*.so.*"))
                cudnn = any(lib.glob("libcudnn.so.*"))
                if cuda or cudnn:
                    try:
                        ort.preload_dlls(cuda=cuda, cudnn=cudnn, directory=str(lib))
                    except Exception as exc:  # an older preload_dlls without `directory`
                        print(f"preload_dlls(directory={lib}) failed: {exc}")
            if not dirs:
                ort.preload_dlls()
        _preload_report.extend(line for line in printed.getvalue().splitlines() if line.strip())
        _preload_report.append(f"nvidia library folders: {', '.join(map(str, dirs)) or 'none found'}")
        return _preload_report


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def probe_model(size: int = 4) -> bytes:
    """A one-node ONNX model (y = x + x, float32[size]), protobuf written out by hand so the run stage needs
    no `onnx` package: enough for ONNX Runtime to place a kernel on the CUDA provider."""
    def value_info(name: str) -> bytes:
        dim = _field(1, _field(1, size))  # TensorShapeProto.dim { dim_value: size }
        tensor = _field(1, 1) + _field(2, dim)  # elem_type FLOAT, shape
        return _field(1, name.encode()) + _field(2, _field(1, tensor))

    node = _field(1, b"x") + _field(1, b"x") + _field(2, b"y") + _field(3, b"add") + _field(4, b"Add")
    graph = _field(1, node) + _field(2, b"probe") + _field(11, value_info("x")) + _field(12, value_info("y"))
    opset = _field(1, b"") + _field(2, 13)
    return _field(1, 8) + _field(2, b"turbo-trt") + _field(7, graph) + _field(8, opset)


def check_model() -> bytes:
    """y = MatMul(Conv(x, w), m) (x float32[1,1,4,4], w [1,1,1,1], m [4,4]), protobuf written out by hand:
    running it once loads cuDNN (Conv) and cuBLAS (MatMul), the libraries a carried onnxruntime-gpu most often
    misses, which an Add alone never touches."""
    def value_info(name: str, dims: tuple[int, ...]) -> bytes:
        shape = b"".join(_field(1, _field(1, d)) for d in dims)  # TensorShapeProto.dim { dim_value }
        tensor = _field(1, 1) + _field(2, shape)  # elem_type FLOAT, shape
        return _field(1, name.encode()) + _field(2, _field(1, tensor))

    conv = _field(1, b"x") + _field(1, b"w") + _field(2, b"c") + _field(3, b"conv") + _field(4, b"Conv")
    matmul = _field(1, b"c") + _field(1, b"m") + _field(2, b"y") + _field(3, b"matmul") + _field(4, b"MatMul")
    graph = (_field(1, conv) + _field(1, matmul) + _field(2, b"check")
             + _field(11, value_info("x", (1, 1, 4, 4))) + _field(11, value_info("w", (1, 1, 1, 1)))
             + _field(11, value_info("m", (4, 4))) + _field(12, value_info("y", (1, 1, 4, 4))))
    opset = _field(1, b"") + _field(2, 13)
    return _field(1, 8) + _field(2, b"turbo-trt") + _field(7, graph) + _field(8, opset)


def check_inputs() -> dict[str, Any]:
    """Inputs for `check_model` (y = 2 * x @ m with m the identity: y == 2 * x)."""
    import numpy as np

    return {"x": np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4), "w": np.full((1, 1, 1, 1), 2, np.float32),
            "m": np.eye(4, dtype=np.float32)}


@contextlib.contextmanager
def _stderr_captured() -> Iterator[io.StringIO]:
    """ONNX Runtime's C++ log (why a provider library did not load) goes to file descriptor 2: read it."""
    text = io.StringIO()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield text
        return
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield text
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text.write(sink.read().decode(errors="replace"))


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """Why the ONNX Runtime CUDA provider cannot run here, or None when it can.

    Opens a real Conv + MatMul session asking for the CUDA provider (after `preload_cuda_libraries`), runs it
    once (cuDNN and cuBLAS load only then) and reports what ONNX Runtime said when it fell back or failed: the
    exception, its warnings, its log, and the loader's error for the CUDA provider library. Computed once
    per process."""
    try:
        import onnxruntime as ort
    except ImportError as exc:
        return f"onnxruntime is not installed ({exc}); pip install 'turbo-trt[onnxruntime-cuda]'"
    version = getattr(ort, "__version__", "?")
    preloaded = preload_cuda_libraries(ort) if CUDA_PROVIDER in ort.get_available_providers() else []
    options = ort.SessionOptions()
    options.log_severity_level = 3
    providers = [(CUDA_PROVIDER, cuda_provider_options(graphs=False)), "CPUExecutionProvider"]
    with warnings.catch_warnings(record=True) as caught, _stderr_captured() as log:
        warnings.simplefilter("always")
        try:
            session = ort.InferenceSession(check_model(), options, providers=providers)
            ran_on = session.get_providers()
            session.run(None, check_inputs())  # cuDNN and cuBLAS load at the first run, not at session creation
            error = None
        except Exception as exc:
            ran_on, error = [], f"{type(exc).__name__}: {exc}"
    if error is None and ran_on and ran_on[0] == CUDA_PROVIDER:
        return None
    said = [str(w.message).strip() for w in caught]
    said += [re.sub(r"\x1b\[[0-9;]*m", "", line).strip() for line in log.getvalue().splitlines() if line.strip()]
    parts = [f"onnxruntime {version}: a Conv + MatMul session asking for {CUDA_PROVIDER}, run once, "
             + (f"failed ({error})" if error else f"ran on {', '.join(ran_on)}")]
    if said:
        parts.append("ONNX Runtime said: " + " | ".join(dict.fromkeys(said)))
    if CUDA_PROVIDER not in ort.get_available_providers():
        parts.append(f"this onnxruntime is a build without {CUDA_PROVIDER} (available: "
                     f"{', '.join(ort.get_available_providers())}); install the GPU build: pip uninstall "
                     "onnxruntime && pip install 'turbo-trt[onnxruntime-cuda]'")
    else:
        library = Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"
        if library.is_file():
            try:
                ctypes.CDLL(str(library))
            except OSError as exc:
                parts.append(f"loading {library.name} fails: {exc}; put the folders nvidia/*/lib of the CUDA 13 / "
                             "cuDNN 9 wheels on LD_LIBRARY_PATH (or pip install 'onnxruntime-gpu[cuda,cudnn]')")
        parts += [f"preload: {line}" for line in preloaded]
        from turbo_trt.gpu import current_gpu

        if current_gpu() is None:
            parts.append("no NVIDIA GPU is visible (cuda-python and nvidia-smi found none)")
    return "; ".join(parts)


class OnnxRuntimeCudaExecutor(Executor):
    name = "onnxruntime-cuda"

    def __init__(self, bundle: Bundle, cache_size: int = 8, device: str = "cuda", cuda_graphs: bool = True,
                 sessions: dict[str, Any] | None = None) -> None:
        super().__init__(bundle, cache_size)
        import onnxruntime as ort

        if device == "cuda":
            reason = cuda_unavailable_reason()
            if reason:
                raise ExecutorUnavailable(f"the onnxruntime-cuda executor cannot run: {reason}")
        elif device != "cpu":
            raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r}")
        self.ort = ort
        self.device = device
        self.cuda_graphs = cuda_graphs and device == "cuda"
        self.io = manifest_io(bundle.manifest["components"])
        self.graphs = {name: self.cuda_graphs for name in bundle.components()}  # per session: graphs still on
        self.sessions = sessions if sessions is not None else {
            name: self._session(name, self.cuda_graphs) for name in bundle.components()}
        scheduler = bundle.manifest["scheduler"]
        self.max_steps = int(scheduler["max_steps"])
        self.ancestral = bool(scheduler["ancestral"])
        self._allocate()
        self._bind()
        self._slots: dict[int, dict[str, np.ndarray]] = {}
        if self.cuda_graphs:
            with _GRAPH_LOCK:
                self._capture_all()

    # -- load ---------------------------------------------------------------------------------------------
    def _session(self, name: str, graphs: bool) -> Any:
        ort = self.ort
        options = ort.SessionOptions()
        options.log_severity_level = 3
        path = self.bundle.path / self.bundle.component(name)["onnx"]
        try:
            session = ort.InferenceSession(str(path), options, providers=session_providers(self.device, graphs))
        except Exception as exc:
            if not graphs:
                raise
            # ONNX Runtime refuses CUDA graphs at session creation when some node runs on the CPU
            warnings.warn(f"{name}: ONNX Runtime cannot use CUDA graphs for this graph ({exc}); running it "
                          "without graphs", GraphFallbackWarning, stacklevel=3)
            self.graphs[name] = False
            return self._session(name, graphs=False)
        if self.device == "cuda" and session.get_providers()[0] != CUDA_PROVIDER:
            raise ExecutorUnavailable(
                f"ONNX Runtime could not start its CUDA provider for {name} (providers: {session.get_providers()}): "
                "the CUDA 13 / cuDNN 9 libraries it loads are missing; install them (pip install "
                "'onnxruntime-gpu[cuda,cudnn]') or put them on LD_LIBRARY_PATH")
        return session

    def _value(self, component: str, tensor: str) -> Any:
        """A device buffer for `tensor`, zero-filled (the warm-up runs read every input once)."""
        t = self.io[component][tensor]
        value = self.ort.OrtValue.ortvalue_from_shape_and_type(list(t.shape), np.dtype(t.dtype), self.device, 0)
        value.update_inplace(np.zeros(t.shape, np.dtype(t.dtype)))
        return value

    def _allocate(self) -> None:
        b = self.bundle
        value = self._value
        self.ids = {e: value(e, "input_ids") for e in b.encoders}
        self.embeddings = {unet_input: value("unet", unet_input) for _, _, unet_input in EMBEDDING_FEEDS[b.family]}
        self.latents = [value("unet", "latents") for _ in range(self.max_steps + 1)]
        self.timesteps = [value("unet", "timestep") for _ in range(self.max_steps)]
        self.coeffs = [value("unet", "step_coeffs") for _ in range(self.max_steps)]
        self.step_noise = [value("unet", "step_noise") for _ in range(self.max_steps if self.ancestral else 1)]
        # ControlNet bundles: one control image buffer read by every step, one scale buffer per step position
        self.controlnets = int(b.shapes.get("controlnets", 0))
        if self.controlnets:
            self.control_image = value("unet", "control_image")
            self.control_scale = [value("unet", "control_scale") for _ in range(self.max_steps)]
        self.image = value("vae_decoder", "image")
        self.nonfinite = value("vae_decoder", "nonfinite")
        if b.img2img:
            self.init_image = value("vae_encoder", "image")
            self.sample_noise = value("vae_encoder", "sample_noise")
            self.latent_noise = value("vae_encoder", "latent_noise")
            self.noise_sigma = value("vae_encoder", "noise_sigma")

    def _binding(self, name: str, values: dict[str, Any]) -> Any:
        binding = self.sessions[name].io_binding()
        for tensor, ortvalue in values.items():
            if self.io[name][tensor].is_input:
                binding.bind_ortvalue_input(tensor, ortvalue)
            else:
                binding.bind_ortvalue_output(tensor, ortvalue)
        return binding

    def _bind(self) -> None:
        """Every session's bindings, made once: binding i of a session replays CUDA graph id i + 1."""
        b = self.bundle
        self.bindings: dict[str, list[Any]] = {}
        for encoder in b.encoders:
            outputs = {output: self.embeddings[unet_input] for enc, output, unet_input in EMBEDDING_FEEDS[b.family]
                       if enc == encoder}
            self.bindings[encoder] = [self._binding(encoder, {"input_ids": self.ids[encoder], **outputs})]
        control = lambda j: {"control_image": self.control_image, "control_scale": self.control_scale[j]} \
            if self.controlnets else {}  # noqa: E731
        self.bindings["unet"] = [self._binding("unet", {
            "latents": self.latents[j + 1], "next_latents": self.latents[j], "timestep": self.timesteps[j],
            "step_coeffs": self.coeffs[j], "step_noise": self.step_noise[j if self.ancestral else 0],
            **self.embeddings, **control(j)}) for j in range(self.max_steps)]
        if b.img2img:  # binding r - 1 writes latents[r], where a plan of r UNet runs starts
            self.bindings["vae_encoder"] = [self._binding("vae_encoder", {
                "image": self.init_image, "sample_noise": self.sample_noise, "latent_noise": self.latent_noise,
                "noise_sigma": self.noise_sigma, "latents": self.latents[r]}) for r in range(1, self.max_steps + 1)]
        self.bindings["vae_decoder"] = [self._binding("vae_decoder", {
            "latents": self.latents[0], "image": self.image, "nonfinite": self.nonfinite})]

    # -- per image ----------------------------------------------------------------------------------------
    def _run(self, name: str, index: int, timings: Timings | None = None, label: str | None = None) -> None:
        start = time.perf_counter()
        options = run_options(self.ort, index + 1 if self.graphs[name] else None)
        try:
            self.sessions[name].run_with_iobinding(self.bindings[name][index], options)
        except Exception as exc:
            raise ExecutionError(f"ONNX Runtime failed to run {label or name}: {exc}", stage=label or name) from exc
        if timings is not None:
            timings.append((label or name, time.perf_counter() - start))

    def _capture_all(self) -> None:
        """Run every binding WARM_RUNS times at load, so ONNX Runtime (which captures a graph id after a
        couple of plain runs) has captured every graph before the first image; a session whose capture
        fails is re-created without graphs."""
        for name in list(self.sessions):
            for index in range(len(self.bindings[name])):
                for _ in range(WARM_RUNS):
                    try:
                        self._run(name, index)
                    except ExecutionError as exc:
                        if not self.graphs[name]:
                            raise
                        warnings.warn(f"{name}: CUDA graph capture failed in ONNX Runtime ({exc}); running it "
                                      "without graphs", GraphFallbackWarning, stacklevel=2)
                        self.graphs[name] = False
                        self.sessions[name] = self._session(name, graphs=False)
                        self._bind()

    def _fill(self, plan: Plan, noise: Noise, image: np.ndarray | None, control: Control | None = None) -> None:
        runs = plan.runs
        control = self.control_or_off(control, runs)
        if control is not None:
            self.control_image.update_inplace(np.ascontiguousarray(control.images))
            for k in range(runs):
                self.control_scale[runs - 1 - k].update_inplace(np.ascontiguousarray(control.scales[k]))
        if plan.mode == "img2img":
            assert image is not None and noise.sample is not None
            self.init_image.update_inplace(np.ascontiguousarray(image))
            self.sample_noise.update_inplace(noise.sample)
            self.latent_noise.update_inplace(noise.latents)
            self.noise_sigma.update_inplace(np.array([plan.noise_sigma], np.float32))
        else:
            self.latents[runs].update_inplace(noise.latents)
        for k in range(runs):
            j = runs - 1 - k
            self.timesteps[j].update_inplace(plan.timesteps[k:k + 1])
            self.coeffs[j].update_inplace(np.ascontiguousarray(plan.coeffs[k]))
            if self.ancestral:
                step = noise.steps[k] if noise.steps else np.zeros_like(noise.latents)
                self.step_noise[j].update_inplace(step)

    def _generate(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise, image: np.ndarray | None,
                  use_cache: bool, timings: Timings | None = None,
                  control: Control | None = None) -> tuple[np.ndarray, int]:
        self._fill(plan, noise, image, control)
        key = self.prompt_key(ids)
        slot = self._lru.lookup(key) if use_cache else None
        if slot is not None:
            for name, array in self._slots[slot].items():
                self.embeddings[name].update_inplace(array)
        else:
            for encoder in self.bundle.encoders:
                self.ids[encoder].update_inplace(ids[encoder])
                self._run(encoder, 0, timings)
        if plan.mode == "img2img":
            self._run("vae_encoder", plan.runs - 1, timings)
        for k in range(plan.runs):
            self._run("unet", plan.runs - 1 - k, timings, f"unet[{k}]")
        self._run("vae_decoder", 0, timings)
        start = time.perf_counter()
        # .numpy() of a CPU OrtValue is a view of the live buffer: copy (on a GPU it is a fresh host copy)
        result = self.image.numpy().copy(), int(self.nonfinite.numpy()[0])
        if timings is not None:
            timings.append(("download", time.perf_counter() - start))
        if slot is None and use_cache:  # stored only once the whole image succeeded
            new_slot = self._lru.assign(key)
            if new_slot is not None:
                self._slots[new_slot] = {name: value.numpy().copy() for name, value in self.embeddings.items()}
        return result

    def _turn(self) -> contextlib.AbstractContextManager[Any]:
        return _GRAPH_LOCK if self.cuda_graphs else contextlib.nullcontext()

    def run(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
            image: np.ndarray | None, control: Control | None = None) -> tuple[np.ndarray, int]:
        with self._turn():
            return self._generate(ids, plan, noise, image, use_cache=True, control=control)

    def run_profiled(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
                     image: np.ndarray | None, control: Control | None = None) -> Timings:
        """Wall time per session run (each includes ONNX Runtime's own sync at the end of the run)."""
        timings: Timings = []
        with self._turn():
            self._generate(ids, plan, noise, image, use_cache=False, timings=timings, control=control)
        return timings

    def fork(self) -> OnnxRuntimeCudaExecutor:
        """Own buffers and bindings; on the CPU the sessions (and weights) are shared. On the GPU each fork
        opens its own sessions: a session's CUDA graphs belong to it, so two executors cannot share one."""
        shared = self.sessions if self.device == "cpu" else None
        return OnnxRuntimeCudaExecutor(self.bundle, self.cache_size, self.device, self.cuda_graphs, shared)

    def graph_stats(self) -> dict[str, int]:
        return {"sessions_with_graphs": sum(self.graphs.values()),
                "sessions_without_graphs": sum(not on for on in self.graphs.values())}
