"""Input checks and per-call host data, done before any GPU work.

Seeded noise: `numpy.random.Generator(numpy.random.PCG64(seed))`, `standard_normal` in float32, drawn in
this order: the initial latent noise (B, C, h, w); for img2img the VAE posterior sample's noise, then the
noise added at the first img2img timestep (so an img2img call draws the latent noise last, like
diffusers); for Euler-ancestral one array per step run. The same seed gives the same image on every
machine and executor (up to the executor's arithmetic). `noise=` replaces the initial latent noise (or the
add-noise array of img2img) with the caller's own, used exactly as diffusers uses `latents=`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from turbo_trt.errors import InputError

MAX_SEED = 2**63


@dataclass
class Noise:
    """All random arrays of one call, each float32 standard normal of the latent shape."""

    latents: np.ndarray  # txt2img: initial latents (x = init_sigma * latents); img2img: add_noise noise
    sample: np.ndarray | None = None  # img2img: VAE posterior sample noise
    steps: list[np.ndarray] | None = None  # Euler-ancestral: one per step run


def check_prompts(prompt: Any, batch: int) -> list[str]:
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)):
        raise InputError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
    if len(prompts) == 0:
        raise InputError("prompt list is empty")
    bad = [i for i, p in enumerate(prompts) if not isinstance(p, str)]
    if bad:
        raise InputError(f"prompt {bad[0]} is a {type(prompts[bad[0]]).__name__}, not a string")
    if len(prompts) > batch:
        raise InputError(f"{len(prompts)} prompts, but the bundle was built for batch {batch}; "
                         f"rebuild with --batch {len(prompts)} or pass at most {batch}")
    return list(prompts)


def check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or not 0 <= int(seed) < MAX_SEED:
        raise InputError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    return int(seed)


def latent_shape(shapes: dict[str, int]) -> tuple[int, int, int, int]:
    return (shapes["batch"], shapes["latent_channels"], shapes["latent_height"], shapes["latent_width"])


def check_noise(noise: Any, shape: tuple[int, ...]) -> np.ndarray:
    array = np.asarray(noise)
    if array.shape == shape[1:] and shape[0] == 1:
        array = array[None]
    if array.shape != shape:
        raise InputError(f"noise has shape {array.shape}, the bundle needs {shape} (batch, 4, height/8, width/8)")
    if not np.issubdtype(array.dtype, np.floating) or not np.isfinite(array).all():
        raise InputError("noise must be finite floating-point values")
    return np.ascontiguousarray(array, dtype=np.float32)


def make_noise(seed: int, shape: tuple[int, ...], img2img: bool, ancestral_steps: int,
               noise: np.ndarray | None = None) -> Noise:
    rng = np.random.Generator(np.random.PCG64(seed))
    draw = lambda: rng.standard_normal(shape, dtype=np.float32)  # noqa: E731
    initial = draw()
    sample = None
    if img2img:
        sample = initial
        initial = draw()
    steps = [draw() for _ in range(ancestral_steps)] if ancestral_steps else None
    if noise is not None:
        initial = check_noise(noise, shape)
    return Noise(latents=initial, sample=sample, steps=steps)


def check_image(image: Any, height: int, width: int, batch: int) -> np.ndarray:
    """An init image -> uint8 (batch, H, W, 3).

    Accepted: a PIL image (mode L and RGBA are converted to RGB explicitly: L replicated, RGBA composited
    on white), or a uint8 array (H, W, 3) / (B, H, W, 3). Size rule: an image of another size is resized
    with Lanczos to the bundle's size when its aspect ratio matches within 1%; otherwise it is rejected
    (cropping silently would change the picture). A single image is repeated over the batch.
    """
    try:
        from PIL import Image
    except ImportError:  # pragma: no cover - Pillow is a dependency
        Image = None  # type: ignore[assignment]
    if Image is not None and isinstance(image, Image.Image):
        image = _pil_to_rgb(image, Image)
        if image.size != (width, height):
            _check_aspect(image.size[0], image.size[1], width, height)
            image = image.resize((width, height), Image.Resampling.LANCZOS)
        array = np.asarray(image, dtype=np.uint8)[None]
    elif isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise InputError(f"image arrays must be uint8 RGB, got {image.dtype}")
        array = image[None] if image.ndim == 3 else image
        if array.ndim != 4 or array.shape[-1] != 3:
            raise InputError(f"image array must be (H, W, 3) or (B, H, W, 3) RGB, got shape {image.shape}")
        if array.shape[1:3] != (height, width):
            raise InputError(f"image array is {array.shape[2]}x{array.shape[1]}, the bundle is {width}x{height}; "
                             "pass a PIL image to have it resized")
    else:
        raise InputError(f"image must be a PIL image or a uint8 numpy array, got {type(image).__name__}")
    if array.shape[0] == 1 and batch > 1:
        array = np.repeat(array, batch, axis=0)
    if array.shape[0] != batch:
        raise InputError(f"{array.shape[0]} images for a batch-{batch} bundle")
    return np.ascontiguousarray(array)


def _pil_to_rgb(image: Any, Image: Any) -> Any:
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "P"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if image.mode in ("L", "I", "I;16", "F", "1"):
        return image.convert("L").convert("RGB")
    raise InputError(f"image mode {image.mode} is not supported; convert it to RGB first")


def _check_aspect(w: int, h: int, width: int, height: int) -> None:
    if abs((w / h) / (width / height) - 1.0) > 0.01:
        raise InputError(f"image is {w}x{h}, the bundle is {width}x{height}: the aspect ratio differs; "
                         "crop it to the bundle's aspect ratio first")


@dataclass
class Control:
    """The ControlNet inputs of one call: uint8 (n, B, H, W, 3) images, one per net (in the build's order),
    and float32 (runs, n) scales, each net's scale for each UNet run (0 outside its guidance window)."""

    images: np.ndarray
    scales: np.ndarray


def no_control(nets: int, runs: int, shapes: dict[str, int]) -> Control:
    """What a ControlNet bundle runs without control images: black images at scale 0 (the plain UNet)."""
    return Control(np.zeros((nets, shapes["batch"], shapes["height"], shapes["width"], 3), np.uint8),
                   np.zeros((runs, nets), np.float32))


def per_net(value: Any, nets: int, name: str) -> list[float]:
    """A number, or a list with one number per net -> one finite float per net."""
    values = list(value) if isinstance(value, (list, tuple)) else [value] * nets
    if len(values) != nets:
        raise InputError(f"{name} has {len(values)} values, the bundle has {nets} ControlNet(s)")
    out = []
    for i, v in enumerate(values):
        if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)) or not np.isfinite(v):
            raise InputError(f"{name}[{i}] must be a finite number, got {v!r}")
        out.append(float(v))
    return out


def control_scales(runs: int, scales: list[float], starts: list[float], ends: list[float]) -> np.ndarray:
    """float32 (runs, n): diffusers' controlnet_keep times the scales. For UNet run i of `runs` (img2img:
    of the runs left after the skipped steps, as diffusers counts its truncated timesteps), net j is kept
    unless i / runs < start_j or (i + 1) / runs > end_j."""
    for j, (start, end) in enumerate(zip(starts, ends)):
        if start >= end:
            raise InputError(f"control_guidance_start[{j}] ({start}) must be smaller than control_guidance_end[{j}] "
                             f"({end})")
        if start < 0.0 or end > 1.0:
            raise InputError(f"control guidance window {j} is [{start}, {end}]; it must lie within [0, 1]")
    keep = [[1.0 - float(i / runs < s or (i + 1) / runs > e) for s, e in zip(starts, ends)] for i in range(runs)]
    return np.asarray([[k * c for k, c in zip(row, scales)] for row in keep], np.float32).reshape(runs, len(scales))


def check_control_images(control_image: Any, nets: int, height: int, width: int, batch: int) -> np.ndarray:
    """`control_image` -> uint8 (n, batch, H, W, 3). One net: an image (PIL, or a uint8 (H, W, 3) /
    (B, H, W, 3) array) or a list holding one; several nets: a list with one such image per net, in the
    build's order. Each obeys the img2img image rules (`check_image`: sizes, modes, batch)."""
    if nets == 0:
        raise InputError("control_image given, but this bundle has no ControlNet; build one with "
                         "`turbo-trt build --controlnet ID_OR_DIR`")
    items = list(control_image) if isinstance(control_image, (list, tuple)) else [control_image]
    if len(items) != nets:
        raise InputError(f"{len(items)} control image(s) for a bundle with {nets} ControlNet(s); pass one per net, "
                         "in the order they were built")
    out = []
    for i, item in enumerate(items):
        try:
            out.append(check_image(item, height, width, batch))
        except InputError as exc:
            raise InputError(f"control_image[{i}]: {exc}") from exc
    return np.ascontiguousarray(np.stack(out))
