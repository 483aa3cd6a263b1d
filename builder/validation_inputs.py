"""Realistic inputs for the validation gate: what each graph sees when the bundle makes a picture.

Random N(0, 1) inputs exercise a network away from its working range (a text encoder fed random token ids
sees no sentence, a decoder fed N(0, 1) latents decodes noise that no UNet would produce), so the figures
say little about real use. Instead, for the fixed PROMPTS:

1. text encoders: the prompts' token ids, from the pipeline's own tokenizers (padded to 77);
2. UNet: the first txt2img step of a 1-step plan (its real timestep and input scale, from the manifest's
   scheduler tables), with the embeddings the *exported* text encoders (ONNX Runtime) make of those ids;
   its step coefficients are (c_in, 0, 1, 0), so the output compared is the network's own prediction,
   not the a * x term that would dominate `next_latents`; with ControlNets fused in, each net gets a
   seeded edge map (white outlines of a few rectangles and circles on black, what a Canny or scribble net
   reads) and scale 1;
3. VAE decoder: the latents the model's own UNet step makes: x1 = a * x + b * prediction with that plan's
   real coefficients, from the exported UNet's prediction when the UNet was just validated, else from the
   pipeline's FP32 UNet;
4. VAE encoder: the image decoded from those latents (uint8), the posterior noise N(0, 1), and noise_sigma
   0: the added `sigma * latent_noise` term is exact in any precision and would hide the encoder's error.

Inputs are drawn once per build from `numpy.random.default_rng(seed)` in a fixed order.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .specs import ComponentSpec, Dims
from .validate import run_onnx

PROMPTS = (
    "a photo of an astronaut riding a horse on mars",
    "a red cat sitting on a green sofa, oil painting",
    "a busy city street at night in the rain, neon signs, 35mm photograph",
)
#: Tokenizer of each text encoder.
TOKENIZERS = {"text_encoder": "tokenizer", "text_encoder_2": "tokenizer_2"}


class ValidationInputs:
    """Builds (and caches) each component's validation feeds for one export stage."""

    def __init__(self, pipe: Any, family: str, dims: Dims, bundle: Path, seed: int) -> None:
        from turbo_trt.runner.schedule import txt2img_plan

        from .schedules import scheduler_tables

        self.pipe, self.family, self.dims, self.bundle = pipe, family, dims, bundle
        self.plan = txt2img_plan(scheduler_tables(pipe.scheduler), 1)
        batch = dims.values["B"]
        latents = (batch, dims.values["C"], dims.values["h"], dims.values["w"])
        rng = np.random.default_rng(seed)
        self.noise = rng.standard_normal(latents).astype(np.float32)  # initial txt2img noise
        self.step_noise = rng.standard_normal(latents).astype(np.float32)
        self.sample_noise = rng.standard_normal(latents).astype(np.float32)
        self.latent_noise = rng.standard_normal(latents).astype(np.float32)
        self.prompts = [PROMPTS[i % len(PROMPTS)] for i in range(batch)]
        self._prediction: np.ndarray | None = None  # the UNet's prediction on the unet feeds
        self._image: np.ndarray | None = None  # uint8 image decoded from the decoder feeds
        self._embeddings: dict[str, np.ndarray] | None = None
        self.controlnets = len(getattr(pipe, "turbo_controlnets", None) or [])
        self.control_image = np.stack([edge_map(rng, batch, dims.values["H"], dims.values["W"])
                                       for _ in range(self.controlnets)]) if self.controlnets else None

    # -- per component --------------------------------------------------------------------------------
    def feeds(self, spec: ComponentSpec) -> dict[str, np.ndarray]:
        """The component's inputs, in its spec's order and dtypes."""
        if spec.name in TOKENIZERS:
            return {"input_ids": self.token_ids(spec.name)}
        if spec.name == "unet":
            return self._unet_feeds()
        if spec.name == "vae_decoder":
            return {"latents": self.decoder_latents()}
        if spec.name == "vae_encoder":
            return {"image": self.image(), "sample_noise": self.sample_noise, "latent_noise": self.latent_noise,
                    "noise_sigma": np.zeros(1, np.float32)}
        raise KeyError(spec.name)

    def token_ids(self, encoder: str) -> np.ndarray:
        tokenizer = getattr(self.pipe, TOKENIZERS[encoder])
        ids = tokenizer(self.prompts, padding="max_length", max_length=self.dims.values["L"], truncation=True,
                        return_tensors="np").input_ids
        return np.asarray(ids, dtype=np.int32)

    def _unet_feeds(self) -> dict[str, np.ndarray]:
        c_in = float(self.plan.coeffs[0][0])
        feeds = {
            "latents": self.noise,
            "timestep": self.plan.timesteps[:1].astype(np.float32),
            "step_coeffs": np.array([c_in, 0.0, 1.0, 0.0], np.float32),
            "step_noise": self.step_noise,
        }
        feeds.update(self.embeddings())
        if self.control_image is not None:
            feeds.update(control_image=self.control_image, control_scale=np.ones(self.controlnets, np.float32))
        return feeds

    def embeddings(self) -> dict[str, np.ndarray]:
        """The UNet's text inputs, made by the bundle's exported (and already validated) text encoders."""
        if self._embeddings is not None:
            return self._embeddings
        out = run_onnx(self.bundle / "onnx" / "text_encoder.onnx", {"input_ids": self.token_ids("text_encoder")})
        feeds = {"prompt_embeds": out["prompt_embeds"]}
        if self.family == "sdxl":
            out2 = run_onnx(self.bundle / "onnx" / "text_encoder_2.onnx",
                            {"input_ids": self.token_ids("text_encoder_2")})
            feeds.update(prompt_embeds_2=out2["prompt_embeds"], text_embeds=out2["text_embeds"])
        self._embeddings = feeds
        return feeds

    # -- chaining ---------------------------------------------------------------------------------------
    def record_prediction(self, prediction: np.ndarray) -> None:
        """The validated UNet graph's output on the unet feeds (its raw prediction)."""
        self._prediction = prediction.astype(np.float32)

    def record_image(self, image: np.ndarray) -> None:
        self._image = image

    def decoder_latents(self) -> np.ndarray:
        """x1 = a * x + b * prediction: the latents a 1-step txt2img call hands the decoder."""
        if self._prediction is None:
            self._prediction = self._torch_prediction()
        _, a, b, _ = (float(v) for v in self.plan.coeffs[0])
        return (np.float32(a) * self.noise + np.float32(b) * self._prediction).astype(np.float32)

    def _torch_prediction(self) -> np.ndarray:
        """The pipeline's FP32 UNet on the unet feeds (when the UNet graph is up to date, not re-validated)."""
        import torch

        from .wrappers import build_wrapper

        wrapper = build_wrapper("unet", self.pipe, self.family, self.dims.values["H"], self.dims.values["W"])
        feeds = self._unet_feeds()
        with torch.no_grad():
            out = wrapper.eval()(*[torch.from_numpy(np.ascontiguousarray(v)) for v in feeds.values()])
        return np.asarray(out.numpy(), dtype=np.float32)

    def image(self) -> np.ndarray:
        """uint8 NHWC: the decoder's FP32 reference image of the decoder latents (recorded when the decoder
        was validated in this stage, else decoded with the bundle's decoder graph)."""
        if self._image is None:
            out = run_onnx(self.bundle / "onnx" / "vae_decoder.onnx", {"latents": self.decoder_latents()})
            self._image = out["image"]
        return self._image


def edge_map(rng: np.random.Generator, batch: int, height: int, width: int) -> np.ndarray:
    """uint8 (batch, H, W, 3): white outlines of two rectangles and a circle on black, placed by `rng`."""
    yy, xx = np.mgrid[0:height, 0:width]
    out = np.zeros((batch, height, width, 3), np.uint8)
    thick = max(1, min(height, width) // 64)
    for b in range(batch):
        mask = np.zeros((height, width), bool)
        for _ in range(2):
            y0, x0 = rng.integers(0, height // 2), rng.integers(0, width // 2)
            y1, x1 = y0 + rng.integers(height // 4, height // 2), x0 + rng.integers(width // 4, width // 2)
            inside = (yy >= y0) & (yy <= y1) & (xx >= x0) & (xx <= x1)
            core = (yy >= y0 + thick) & (yy <= y1 - thick) & (xx >= x0 + thick) & (xx <= x1 - thick)
            mask |= inside & ~core
        cy, cx, r = rng.integers(height // 4, 3 * height // 4), rng.integers(width // 4, 3 * width // 4), min(height, width) // 5
        mask |= np.abs(np.hypot(yy - cy, xx - cx) - r) <= thick
        out[b][mask] = 255
    return out
