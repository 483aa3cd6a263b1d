"""The run stage's public API, shaped like diffusers:

    pipe = TurboPipeline.from_bundle("engines/sd-turbo")
    image = pipe("a cat", num_inference_steps=1, seed=0)[0]

Pipeline logic lives here once (tokenize, noise, scheduler coefficients, img2img rules, output checks);
executors only run graphs. No torch, diffusers or transformers is imported by this package.
"""

from __future__ import annotations

import secrets
import sys
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from turbo_trt.errors import InputError, TurboTrtError

from .bundle import Bundle, open_bundle
from .executor_choice import EXECUTORS, ExecutorChoice, choose_executor
from .executors.base import Executor
from .inputs import (
    Control,
    Noise,
    check_control_images,
    check_image,
    check_prompts,
    check_seed,
    control_scales,
    latent_shape,
    make_noise,
    no_control,
    per_net,
)
from .schedule import Plan, img2img_plan, txt2img_plan
from .tokenizer import PromptTokenizer

if TYPE_CHECKING:
    from .lora import BundleLoras
    from .stream import Stream



class NonFiniteOutputError(TurboTrtError):
    """The decoder saw NaN/inf: the image would have been black. Usually an FP16 overflow."""


def check_finite(nonfinite: int) -> None:
    """Raise NonFiniteOutputError when the decoder counted NaN/inf values."""
    if nonfinite:
        raise NonFiniteOutputError(
            f"the VAE decoder produced {nonfinite} NaN/inf values (the image would be black); this is "
            "usually an FP16 overflow: check the bundle's validation figures or rebuild"
        )


class TurboPipeline:
    """Text-to-image (and image-to-image) on a bundle. One execution state per pipeline; calls from
    several threads are serialized by a lock (use `fork()` for one pipeline per thread sharing weights)."""

    def __init__(self, bundle: Bundle, executor: Executor) -> None:
        self.bundle = bundle
        self.executor = executor
        manifest = bundle.manifest
        self.scheduler = manifest["scheduler"]
        self.shapes = bundle.shapes
        self.tokenizers = {
            encoder: PromptTokenizer(bundle.path / manifest["tokenizers"][encoder]["file"],
                                     manifest["tokenizers"][encoder])
            for encoder in bundle.encoders
        }
        self._lock = threading.Lock()
        self.executor_choice = ExecutorChoice(executor.name)  # from_bundle's "auto" records what it passed over
        # Run-time LoRA state, created by the first set_loras and shared with forks (they share the weights).
        self._lora_state: list[BundleLoras] = []

    @classmethod
    def from_bundle(cls, path: Path | str, executor: str = "auto", cache_size: int = 8,
                    verify: bool = True, strict_targets: bool = True) -> TurboPipeline:
        """Open and check a bundle, then load it with the chosen executor: "tensorrt", "onnxruntime-cuda",
        "onnxruntime" (CPU), or "auto" (the first of those that can run here; `pipe.executor_choice` says
        which ran and why the others were passed over). strict_targets=False only warns when the GPU is not
        among the engines' build targets."""
        if executor not in EXECUTORS:
            raise InputError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
        choice = choose_executor(path, strict_targets) if executor == "auto" else ExecutorChoice(executor)
        if choice.name == "tensorrt":
            from .executors.tensorrt import TensorRTExecutor

            bundle = open_bundle(path, files="engine", verify=verify)
            pipe = cls(bundle, TensorRTExecutor.load(bundle, cache_size=cache_size, strict_targets=strict_targets))
        elif choice.name == "onnxruntime-cuda":
            from .executors.onnxruntime_cuda import OnnxRuntimeCudaExecutor

            bundle = open_bundle(path, files="onnx", verify=verify)
            pipe = cls(bundle, OnnxRuntimeCudaExecutor(bundle, cache_size=cache_size))
        else:
            from .executors.onnxruntime import OnnxRuntimeExecutor

            bundle = open_bundle(path, files="onnx", verify=verify)
            pipe = cls(bundle, OnnxRuntimeExecutor(bundle, cache_size=cache_size))
        pipe.executor_choice = choice
        return pipe

    def fork(self) -> TurboPipeline:
        """Another pipeline on the same weights with its own execution state (for another thread)."""
        twin = TurboPipeline(self.bundle, self.executor.fork())
        twin._lora_state = self._lora_state
        return twin

    @property
    def batch(self) -> int:
        return int(self.shapes["batch"])

    @property
    def controlnets(self) -> int:
        """How many ControlNets the bundle's UNet holds (0 for a plain bundle)."""
        return int(self.shapes.get("controlnets", 0))

    def control(self, plan: Plan, control_image: Any, controlnet_conditioning_scale: Any = 1.0,
                control_guidance_start: Any = 0.0, control_guidance_end: Any = 1.0) -> Control | None:
        """The checked ControlNet inputs of a call with `plan` (None for a bundle without nets and no control
        image). Without a control image a ControlNet bundle runs every net at scale 0: the plain UNet."""
        nets = self.controlnets
        if control_image is None:
            given = [name for name, value, default in (
                ("controlnet_conditioning_scale", controlnet_conditioning_scale, 1.0),
                ("control_guidance_start", control_guidance_start, 0.0),
                ("control_guidance_end", control_guidance_end, 1.0)) if value != default]
            if given:
                raise InputError(f"{', '.join(given)} given without control_image")
            return no_control(nets, plan.runs, self.shapes) if nets else None
        images = check_control_images(control_image, nets, self.shapes["height"], self.shapes["width"], self.batch)
        scales = per_net(controlnet_conditioning_scale, nets, "controlnet_conditioning_scale")
        starts = per_net(control_guidance_start, nets, "control_guidance_start")
        ends = per_net(control_guidance_end, nets, "control_guidance_end")
        return Control(images, control_scales(plan.runs, scales, starts, ends))

    def plan(self, steps: int, strength: float | None) -> Plan:
        """The step plan (checked): txt2img when strength is None. A few microseconds of numpy."""
        return txt2img_plan(self.scheduler, steps) if strength is None else img2img_plan(self.scheduler, steps, strength)

    def __call__(
        self,
        prompt: str | list[str],
        num_inference_steps: int = 1,
        seed: int | None = None,
        noise: np.ndarray | None = None,
        image: Any = None,
        strength: float = 0.5,
        output_type: str = "pil",
        control_image: Any = None,
        controlnet_conditioning_scale: float | list[float] = 1.0,
        control_guidance_start: float | list[float] = 0.0,
        control_guidance_end: float | list[float] = 1.0,
    ) -> list[Any] | np.ndarray:
        """Generate images. Returns a list of PIL images, or with output_type="np" a uint8 array
        (n, H, W, 3), n = number of prompts. Every input is checked before any engine runs.

        ControlNet bundles (`turbo-trt build --controlnet ...`), with diffusers' meaning: `control_image` one
        image per net (a list for several nets, in the build's order; PIL or uint8 arrays, the img2img image
        rules), `controlnet_conditioning_scale` a scale (or one per net), and each net acts on the UNet runs
        within its [control_guidance_start, control_guidance_end] fraction of them. Without control_image
        the nets are off (scale 0: the plain UNet's image)."""
        prompts = check_prompts(prompt, self.batch)
        if output_type not in ("pil", "np"):
            raise InputError(f"output_type must be 'pil' or 'np', got {output_type!r}")
        seed = secrets.randbelow(2**63) if seed is None else check_seed(seed)
        img2img = image is not None
        if img2img and not self.bundle.img2img:
            raise InputError(f"{self.bundle.path} has no VAE encoder (built with --no-img2img): img2img is unavailable")
        plan = self.plan(num_inference_steps, strength if img2img else None)
        pixels = check_image(image, self.shapes["height"], self.shapes["width"], self.batch) if img2img else None
        control = self.control(plan, control_image, controlnet_conditioning_scale, control_guidance_start,
                               control_guidance_end)
        shape = latent_shape(self.shapes)
        noise_set = make_noise(seed, shape, img2img, plan.runs if self.scheduler["ancestral"] else 0, noise)
        images = self.run_with_noise(prompts, plan, noise_set, pixels, control)[: len(prompts)]
        if output_type == "np":
            return images
        from PIL import Image

        return [Image.fromarray(frame) for frame in images]

    def token_ids(self, prompts: list[str]) -> dict[str, np.ndarray]:
        """encoder -> int32 (batch, 77) ids; a short list is padded with its last prompt."""
        padded = prompts + [prompts[-1]] * (self.batch - len(prompts))
        return {name: np.stack([tok.encode(p) for p in padded]) for name, tok in self.tokenizers.items()}

    def run_with_noise(self, prompts: list[str], plan: Plan, noise_set: Noise, pixels: np.ndarray | None,
                       control: Control | None = None) -> np.ndarray:
        """The step under `__call__`, with every random array given (also for reproducing another
        implementation's draws). Inputs must already be checked (`control`: from `self.control`; None on a
        ControlNet bundle runs the nets at scale 0). Returns uint8 (B, H, W, 3)."""
        ids = self.token_ids(prompts)
        if control is None and self.controlnets:
            control = no_control(self.controlnets, plan.runs, self.shapes)
        with self._lock:
            images, nonfinite = self.executor.run(ids, plan, noise_set, pixels, control)
        check_finite(nonfinite)
        return images

    def stream(self, prompt: str = "", *, steps: int = 1, strength: float = 0.5, seed: int | None = None,
               queue: int = 1, similarity: float | None = None, max_skip: int = 10, control: str | None = None,
               controlnet_conditioning_scale: float | list[float] = 1.0,
               control_guidance_start: float | list[float] = 0.0,
               control_guidance_end: float | list[float] = 1.0) -> Stream:
        """A frame stream on a fork of this pipeline (its own execution state and worker thread, the same
        weights): push frames or prompts, get the newest results (runner/stream/; README, Real time).
        One seed for the whole stream (random when None: `stream.seed` says which). ControlNet bundles:
        `control="canny"` makes each frame's control image from the frame (Canny edges), or pass
        `push(frame, control_image=...)`; the scales and guidance window apply to every input."""
        from .stream import StreamPool

        pool = StreamPool([self.fork()])
        try:
            return pool.stream(prompt, steps=steps, strength=strength, seed=seed, queue=queue,
                               similarity=similarity, max_skip=max_skip, owns_pool=True, control=control,
                               controlnet_conditioning_scale=controlnet_conditioning_scale,
                               control_guidance_start=control_guidance_start,
                               control_guidance_end=control_guidance_end)
        except BaseException:
            pool.close()
            raise

    def set_loras(self, loras: Mapping[str | Path, float]) -> None:
        """Apply LoRAs at run time, {path: scale, ...} in order; `{}` restores the base weights bit for bit.

        Needs a bundle built with `--refittable`. Every LoRA is read and checked first (wrong model, unknown
        keys, mismatched shapes raise LoraError naming the key, and nothing changes); then merged weights
        are computed from the kept base values for exactly the graph weights that change, and the executor
        refits its engines (TensorRT) or re-creates the touched sessions (ONNX Runtime). Any sequence of
        calls gives the same images as the last set applied once. Forks share the weights, and concurrent calls
        on a pipeline and its forks apply one set after the other (an image never runs on a mix of two sets)."""
        import time

        from .lora import BundleLoras, LoraError

        set_weights = getattr(self.executor, "set_weights", None)
        if set_weights is None:  # before any LoRA is read or merged
            raise LoraError(f"the {self.executor.name} executor cannot change weights at run time; use the "
                            "tensorrt or onnxruntime executor, or bake the LoRA in with `turbo-trt build --lora`")
        state = BundleLoras.shared(self._lora_state, self.bundle.path, self.bundle.manifest)
        # One lock for this pipeline and all its forks, held from reading the LoRAs to the commit: two
        # concurrent calls cannot interleave their plans and leave some weights from the other's set.
        with state.lock:
            start = time.perf_counter()
            wanted = state.load(loras)
            updates = state.plan(wanted)
            count = sum(len(v) for v in updates.values())
            if time.perf_counter() - start > 1.0 or count > 50:
                print(f"turbo-trt: applying LoRAs: {count} weights in {', '.join(sorted(updates)) or 'none'} ...",
                      file=sys.stderr, flush=True)
            state.begin(wanted)
            try:
                set_weights(updates, state.current_weight)
            except BaseException:
                state.failed(wanted)
                raise
            state.commit(loras, wanted)

    @property
    def loras(self) -> dict[str, float]:
        """The LoRAs applied at run time now (path -> scale)."""
        return dict(self._lora_state[0].loras) if self._lora_state else {}

    def close(self) -> None:
        self.executor.close()

