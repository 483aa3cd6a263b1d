"""One declarative spec per subnetwork: what it depends on, its IO tensors, how to wrap it, its precision.

Shapes are written with symbolic dims resolved per build (see `Dims`): B batch, H/W image size,
h/w latent size, C latent channels, L tokens, D1/D2 text hidden sizes, P pooled size, N ControlNets. A tensor marked
`sdxl_only` exists only for the SDXL family; a component marked `sdxl_only` is built only for SDXL.
Bump SPEC_VERSION whenever a wrapper's math or a spec changes: it is part of every ONNX fingerprint.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

SPEC_VERSION = 2
TOKENS = 77


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[str, ...]
    dtype: str  # numpy dtype name: float16, float32, int32, uint8
    sdxl_only: bool = False


@dataclass(frozen=True)
class Dims:
    """Concrete values for the symbolic dims of one build."""

    values: dict[str, int]

    def shape(self, tensor: TensorSpec) -> tuple[int, ...]:
        return tuple(self.values[d] if not d.isdigit() else int(d) for d in tensor.shape)


@dataclass(frozen=True)
class ComponentSpec:
    name: str
    #: Pipeline parts whose config/weights the graph is built from (keys of part fingerprints).
    parts: tuple[str, ...]
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    #: Name of the factory in wrappers.py-building code (see export.make_module).
    wrapper: str
    sdxl_only: bool = False
    #: True when the family's config asks for FP32 (vae.config.force_upcast): the FP32 island.
    fp32_if_force_upcast: bool = False
    #: Only needed for img2img.
    img2img_only: bool = False

    def io(self, family: str) -> tuple[list[TensorSpec], list[TensorSpec]]:
        keep = lambda t: family == "sdxl" or not t.sdxl_only  # noqa: E731
        return [t for t in self.inputs if keep(t)], [t for t in self.outputs if keep(t)]


LATENTS = ("B", "C", "h", "w")

TEXT_ENCODER = ComponentSpec(
    name="text_encoder",
    parts=("text_encoder",),
    inputs=(TensorSpec("input_ids", ("B", "L"), "int32"),),
    outputs=(TensorSpec("prompt_embeds", ("B", "L", "D1"), "float16"),),
    wrapper="text_encoder",
)

TEXT_ENCODER_2 = ComponentSpec(
    name="text_encoder_2",
    parts=("text_encoder_2",),
    inputs=(TensorSpec("input_ids", ("B", "L"), "int32"),),
    outputs=(
        TensorSpec("prompt_embeds", ("B", "L", "D2"), "float16"),
        TensorSpec("text_embeds", ("B", "P"), "float16"),
    ),
    wrapper="text_encoder_2",
    sdxl_only=True,
)

UNET = ComponentSpec(
    name="unet",
    parts=("unet",),
    inputs=(
        TensorSpec("latents", LATENTS, "float32"),
        TensorSpec("timestep", ("1",), "float32"),
        TensorSpec("step_coeffs", ("4",), "float32"),
        TensorSpec("step_noise", LATENTS, "float32"),
        TensorSpec("prompt_embeds", ("B", "L", "D1"), "float16"),
        TensorSpec("prompt_embeds_2", ("B", "L", "D2"), "float16", sdxl_only=True),
        TensorSpec("text_embeds", ("B", "P"), "float16", sdxl_only=True),
    ),
    outputs=(TensorSpec("next_latents", LATENTS, "float32"),),
    wrapper="unet",
)

VAE_DECODER = ComponentSpec(
    name="vae_decoder",
    parts=("vae",),
    inputs=(TensorSpec("latents", LATENTS, "float32"),),
    # nonfinite: how many decoded values were NaN/inf before the uint8 cast (which would turn them into a
    # silent black image); the runner raises when it is not 0.
    outputs=(TensorSpec("image", ("B", "H", "W", "3"), "uint8"), TensorSpec("nonfinite", ("1",), "int32")),
    wrapper="vae_decoder",
    fp32_if_force_upcast=True,
)

VAE_ENCODER = ComponentSpec(
    name="vae_encoder",
    parts=("vae",),
    inputs=(
        TensorSpec("image", ("B", "H", "W", "3"), "uint8"),
        TensorSpec("sample_noise", LATENTS, "float32"),
        TensorSpec("latent_noise", LATENTS, "float32"),
        TensorSpec("noise_sigma", ("1",), "float32"),
    ),
    outputs=(TensorSpec("latents", LATENTS, "float32"),),
    wrapper="vae_encoder",
    fp32_if_force_upcast=True,
    img2img_only=True,
)

ALL_SPECS: tuple[ComponentSpec, ...] = (TEXT_ENCODER, TEXT_ENCODER_2, UNET, VAE_DECODER, VAE_ENCODER)

#: The UNet's extra inputs when ControlNets are fused into its graph (see wrappers.ControlledUNetStepGraph):
#: one uint8 RGB conditioning image per net and image, and one scale per net (0 switches a net off).
CONTROL_INPUTS = (
    TensorSpec("control_image", ("N", "B", "H", "W", "3"), "uint8"),
    TensorSpec("control_scale", ("N",), "float32"),
)


def unet_spec(controlnets: int = 0) -> ComponentSpec:
    """The UNet component; with ControlNets fused in it also depends on the "controlnet" part and reads
    the control inputs (after the text inputs)."""
    if controlnets <= 0:
        return UNET
    return dataclasses.replace(UNET, parts=UNET.parts + ("controlnet",), inputs=UNET.inputs + CONTROL_INPUTS)


def specs_for(family: str, img2img: bool = True, controlnets: int = 0) -> list[ComponentSpec]:
    """The components a bundle of this family holds, in build order."""
    if family not in ("sd", "sdxl"):
        raise ValueError(f"unknown family {family!r}")
    return [
        unet_spec(controlnets) if s is UNET else s for s in ALL_SPECS
        if (family == "sdxl" or not s.sdxl_only) and (img2img or not s.img2img_only)
    ]


def spec_by_name(name: str, controlnets: int = 0) -> ComponentSpec:
    for spec in ALL_SPECS:
        if spec.name == name:
            return unet_spec(controlnets) if spec is UNET else spec
    raise KeyError(name)


def dims_from_configs(
    configs: dict[str, dict[str, Any]], batch: int, height: int, width: int, vae_scale: int, controlnets: int = 0
) -> Dims:
    """Resolve the symbolic dims from the pipeline parts' configs (dicts, as in config.json)."""
    values = {
        "B": batch, "H": height, "W": width, "h": height // vae_scale, "w": width // vae_scale,
        "C": int(configs["unet"]["in_channels"]), "L": TOKENS, "N": controlnets,
        "D1": int(configs["text_encoder"]["hidden_size"]),
    }
    if "text_encoder_2" in configs:
        values["D2"] = int(configs["text_encoder_2"]["hidden_size"])
        values["P"] = int(configs["text_encoder_2"].get("projection_dim", values["D2"]))
    return Dims(values)

