"""Parity with diffusers: tiny bundles through the ONNX Runtime executor against
AutoPipelineForText2Image / AutoPipelineForImage2Image on the same weights and the same noise.

Tolerance: at most 2 of 255 levels per pixel, and a mean absolute difference below 0.25 level. The bundle
runs FP16 graphs (SDXL's VAE FP32) while the reference is the FP32 pipeline: FP16 keeps 11 significant
bits, so outputs differ by ~1e-3 relative, about a quarter of a level on the 0..255 scale; rounding to
uint8 turns that into 0 or 1 level on a few pixels (measured: max 1, mean 0.01-0.03). 2 levels gives
margin for other ONNX Runtime builds; a wrong coefficient, timestep or noise order moves most pixels by
tens of levels.

diffusers draws its random arrays from one torch.Generator in a fixed order (VAE posterior sample, then
the add-noise array, then one array per Euler-ancestral step); the tests draw the same arrays from an
identically seeded generator and hand them to the runner, so both sides see identical noise.
"""

from __future__ import annotations

import numpy as np
import pytest

from turbo_trt.builder import sources
from turbo_trt.runner import TurboPipeline
from turbo_trt.runner.inputs import Noise, check_image

PROMPTS = ["a photo of an astronaut riding a horse on mars", "a red cat on a green sofa"]
MAX_LEVELS = 2
MAX_MEAN = 0.25


def _ours_vs_reference(ours: np.ndarray, reference: np.ndarray) -> None:
    ref8 = (reference * 255).round().astype(np.int32)
    diff = np.abs(ours.astype(np.int32) - ref8)
    assert ours.shape == ref8.shape
    assert diff.max() <= MAX_LEVELS, f"max diff {diff.max()} levels"
    assert diff.mean() < MAX_MEAN, f"mean diff {diff.mean():.3f} levels"
    assert ours.std() > 1.0  # a real picture, not a constant


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def pair(request, sd_bundle, sdxl_bundle):
    bundle = sd_bundle[0] if request.param == "sd" else sdxl_bundle[0]
    model = "tiny-sd-turbo" if request.param == "sd" else "tiny-sdxl-turbo"
    reference = sources.load_pipeline(sources.resolve_source(model))
    return TurboPipeline.from_bundle(bundle, executor="onnxruntime"), reference


def _draw(generator, shape, count):
    import torch

    return [torch.randn(shape, generator=generator) for _ in range(count)]


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_txt2img_matches_diffusers(pair, steps, prompt):
    import torch
    from diffusers import AutoPipelineForText2Image

    ours_pipe, reference = pair
    text2img = AutoPipelineForText2Image.from_pipe(reference)
    size = ours_pipe.shapes["height"]
    shape = (1, 4, size // 8, size // 8)
    plan = ours_pipe.plan(steps, None)
    ancestral = ours_pipe.scheduler["ancestral"]

    generator = torch.Generator().manual_seed(7)
    (latents,) = _draw(generator, shape, 1)
    expected = text2img(prompt, num_inference_steps=steps, guidance_scale=0.0, latents=latents.clone(),
                        height=size, width=size, output_type="np", generator=generator).images

    generator = torch.Generator().manual_seed(7)
    (latents,) = _draw(generator, shape, 1)
    step_noise = [t.numpy() for t in _draw(generator, shape, plan.runs)] if ancestral else None
    ours = ours_pipe.run_with_noise([prompt], plan, Noise(latents=latents.numpy(), steps=step_noise), None)
    _ours_vs_reference(ours, expected)


@pytest.mark.parametrize("prompt", PROMPTS)
def test_img2img_matches_diffusers(pair, prompt):
    import torch
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    ours_pipe, reference = pair
    img2img = AutoPipelineForImage2Image.from_pipe(reference)
    size = ours_pipe.shapes["height"]
    shape = (1, 4, size // 8, size // 8)
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8))
    steps, strength = 2, 0.5
    plan = ours_pipe.plan(steps, strength)
    assert plan.runs == 1 and plan.start == 1

    generator = torch.Generator().manual_seed(11)
    expected = img2img(prompt, image=init, num_inference_steps=steps, strength=strength, guidance_scale=0.0,
                       output_type="np", generator=generator).images

    generator = torch.Generator().manual_seed(11)
    sample, latents = (t.numpy() for t in _draw(generator, shape, 2))
    step_noise = [t.numpy() for t in _draw(generator, shape, plan.runs)] if ours_pipe.scheduler["ancestral"] else None
    noise = Noise(latents=latents, sample=sample, steps=step_noise)
    ours = ours_pipe.run_with_noise([prompt], plan, noise, check_image(init, size, size, 1))
    _ours_vs_reference(ours, expected)


def test_noise_argument_is_diffusers_latents(pair):
    """`noise=` is used exactly as diffusers' `latents=`. With one step no other randomness counts (an
    Euler-ancestral last step has sigma_up = 0), so no generator is needed on either side."""
    import torch
    from diffusers import AutoPipelineForText2Image

    ours_pipe, reference = pair
    size = ours_pipe.shapes["height"]
    noise = np.random.default_rng(5).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32)
    expected = AutoPipelineForText2Image.from_pipe(reference)(
        PROMPTS[0], num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(noise.copy()),
        height=size, width=size, output_type="np").images
    ours = ours_pipe(PROMPTS[0], num_inference_steps=1, seed=123, noise=noise, output_type="np")
    _ours_vs_reference(ours, expected)
