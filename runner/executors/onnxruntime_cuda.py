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
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
from typing import Any

import numpy as np

from turbo_trt.errors import ExecutionError, ExecutorUnavailable
from turbo_trt.io_contract import EMBEDDING_FEEDS, manifest_io

from ..bundle import Bundle
from ..inputs import Noise
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


def cuda_unavailable_reason() -> str | None:
    """Why the ONNX Runtime CUDA provider cannot run here, or None when it can."""
    try:
        import onnxruntime as ort
    except ImportError:
        return "onnxruntime is not installed (pip install 'turbo-trt[onnxruntime-cuda]')"
    if CUDA_PROVIDER not in ort.get_available_providers():
        return (f"onnxruntime {ort.__version__} has no {CUDA_PROVIDER} (available: "
                f"{', '.join(ort.get_available_providers())}); install the GPU build: pip uninstall onnxruntime "
                "&& pip install 'turbo-trt[onnxruntime-cuda]'")
    from turbo_trt.gpu import current_gpu

    if current_gpu() is None:
        return "no NVIDIA GPU is visible (cuda-python and nvidia-smi found none)"
    return None


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
        if device == "cuda" and hasattr(ort, "preload_dlls"):
            ort.preload_dlls()  # CUDA / cuDNN from the nvidia-* wheels (torch's, or onnxruntime-gpu[cuda,cudnn])
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
        if self.device == "cuda":
            providers: list[Any] = [(CUDA_PROVIDER, {"device_id": 0, "enable_cuda_graph": "1" if graphs else "0"})]
        else:
            providers = ["CPUExecutionProvider"]
        path = self.bundle.path / self.bundle.component(name)["onnx"]
        try:
            session = ort.InferenceSession(str(path), options, providers=providers)
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
        self.bindings["unet"] = [self._binding("unet", {
            "latents": self.latents[j + 1], "next_latents": self.latents[j], "timestep": self.timesteps[j],
            "step_coeffs": self.coeffs[j], "step_noise": self.step_noise[j if self.ancestral else 0],
            **self.embeddings}) for j in range(self.max_steps)]
        if b.img2img:  # binding r - 1 writes latents[r], where a plan of r UNet runs starts
            self.bindings["vae_encoder"] = [self._binding("vae_encoder", {
                "image": self.init_image, "sample_noise": self.sample_noise, "latent_noise": self.latent_noise,
                "noise_sigma": self.noise_sigma, "latents": self.latents[r]}) for r in range(1, self.max_steps + 1)]
        self.bindings["vae_decoder"] = [self._binding("vae_decoder", {
            "latents": self.latents[0], "image": self.image, "nonfinite": self.nonfinite})]

    # -- per image ----------------------------------------------------------------------------------------
    def _run(self, name: str, index: int, timings: Timings | None = None, label: str | None = None) -> None:
        start = time.perf_counter()
        options = self.ort.RunOptions()
        if self.graphs[name]:
            options.add_run_config_entry("gpu_graph_id", str(index + 1))
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

    def _fill(self, plan: Plan, noise: Noise, image: np.ndarray | None) -> None:
        runs = plan.runs
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
                  use_cache: bool, timings: Timings | None = None) -> tuple[np.ndarray, int]:
        self._fill(plan, noise, image)
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
            image: np.ndarray | None) -> tuple[np.ndarray, int]:
        with self._turn():
            return self._generate(ids, plan, noise, image, use_cache=True)

    def run_profiled(self, ids: dict[str, np.ndarray], plan: Plan, noise: Noise,
                     image: np.ndarray | None) -> Timings:
        """Wall time per session run (each includes ONNX Runtime's own sync at the end of the run)."""
        timings: Timings = []
        with self._turn():
            self._generate(ids, plan, noise, image, use_cache=False, timings=timings)
        return timings

    def fork(self) -> OnnxRuntimeCudaExecutor:
        """Own buffers and bindings; on the CPU the sessions (and weights) are shared. On the GPU each fork
        opens its own sessions: a session's CUDA graphs belong to it, so two executors cannot share one."""
        shared = self.sessions if self.device == "cpu" else None
        return OnnxRuntimeCudaExecutor(self.bundle, self.cache_size, self.device, self.cuda_graphs, shared)

    def graph_stats(self) -> dict[str, int]:
        return {"sessions_with_graphs": sum(self.graphs.values()),
                "sessions_without_graphs": sum(not on for on in self.graphs.values())}
