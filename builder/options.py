"""Build options: the one source of defaults (the CLI reads its defaults from here)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .engine import EngineOptions
from .validate import DEFAULT_MIN_COSINE

DEFAULT_ENGINES_ROOT = Path("engines")


def default_size(model: str) -> int:
    """The default --height / --width for a model: the tiny presets' training size (64), else 512."""
    from .presets import PRESET_NAMES, TINY_NATIVE_SIZE

    return TINY_NATIVE_SIZE if model in PRESET_NAMES else BuildOptions.height


@dataclass(frozen=True)
class BuildOptions:
    model: str
    revision: str | None = None
    random_weights: bool = False
    out: Path | None = None  # bundle directory; default engines/<slug>
    batch: int = 1
    height: int = 512  # the CLI's default is default_size(model): 64 for the tiny presets
    width: int = 512
    flavor: str | None = None  # None: the first installed of tensorrt, tensorrt-rtx
    onnx_only: bool = False
    force: bool = False
    img2img: bool = True  # also build the VAE encoder
    min_cosine: float = DEFAULT_MIN_COSINE
    validation_seed: int = 0
    engine: EngineOptions = field(default_factory=EngineOptions)
    # --vae: "tiny", a hub id or a local directory in place of the pipeline's VAE (see vae.py); None: its own
    vae: str | None = None
    vae_fp32: bool = False  # --vae-fp32: export the VAE in FP32 whatever its config says
    # LoRAs fused into the weights before export: (path or hub id, scale), in order (see lora_bake.py)
    loras: tuple[tuple[str, float], ...] = ()
    # --controlnet: ControlNets fused into the UNet graph, in order (hub id, local directory or "random")
    controlnets: tuple[str, ...] = ()
