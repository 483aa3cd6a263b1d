"""The tensor contract between a bundle's engines and the runner's preallocated buffers.

The TensorRT executor binds fixed device buffers by tensor name and computes addresses from the shapes
and dtypes below (for example one float32 timestep per UNet step, four float32 step coefficients).
`check_io` compares what an engine (or the network TensorRT parsed from the ONNX graph, or the
manifest) declares with this contract and names the first difference, so a bundle that does not fit
fails at load with a clear message instead of reading the wrong bytes on the GPU.

Written without numpy, torch or TensorRT so that the builder and the runner can both use it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from .errors import BundleError

#: Text encoders of each family, in the order they run.
ENCODERS: dict[str, tuple[str, ...]] = {"sd": ("text_encoder",), "sdxl": ("text_encoder", "text_encoder_2")}

#: (encoder, encoder output, UNet input) for every prompt embedding the UNet reads.
EMBEDDING_FEEDS: dict[str, tuple[tuple[str, str, str], ...]] = {
    "sd": (("text_encoder", "prompt_embeds", "prompt_embeds"),),
    "sdxl": (
        ("text_encoder", "prompt_embeds", "prompt_embeds"),
        ("text_encoder_2", "prompt_embeds", "prompt_embeds_2"),
        ("text_encoder_2", "text_embeds", "text_embeds"),
    ),
}


@dataclass(frozen=True)
class TensorIO:
    """One engine IO tensor: static shape, numpy dtype name, direction."""

    shape: tuple[int, ...]
    dtype: str
    is_input: bool

    def describe(self) -> str:
        return f"{'input' if self.is_input else 'output'} {self.dtype}{list(self.shape)}"


#: component -> tensor -> TensorIO, as declared by an engine, a parsed network or the manifest.
IOTable = Mapping[str, Mapping[str, TensorIO]]


def expected_io(family: str, shapes: Mapping[str, int], img2img: bool) -> dict[str, dict[str, TensorIO | None]]:
    """The contract. A value of None marks a prompt-embedding tensor, whose shape depends on the text
    encoder's hidden size: it is checked by `check_io` to agree between encoder output and UNet input.
    With n = shapes["controlnets"] > 0 the UNet also reads `control_image` uint8 (n, B, H, W, 3) and
    `control_scale` float32 (n)."""
    batch = shapes["batch"]
    latents = (batch, shapes["latent_channels"], shapes["latent_height"], shapes["latent_width"])
    image = (batch, shapes["height"], shapes["width"], 3)
    ids = (batch, shapes["tokens"])
    f32_in = lambda shape: TensorIO(shape, "float32", True)  # noqa: E731
    table: dict[str, dict[str, TensorIO | None]] = {e: {"input_ids": TensorIO(ids, "int32", True)}
                                                    for e in ENCODERS[family]}
    table["unet"] = {
        "latents": f32_in(latents), "timestep": f32_in((1,)), "step_coeffs": f32_in((4,)),
        "step_noise": f32_in(latents), "next_latents": TensorIO(latents, "float32", False),
    }
    nets = int(shapes.get("controlnets", 0))
    if nets:
        table["unet"]["control_image"] = TensorIO((nets, *image), "uint8", True)
        table["unet"]["control_scale"] = f32_in((nets,))
    table["vae_decoder"] = {"latents": f32_in(latents), "image": TensorIO(image, "uint8", False),
                            "nonfinite": TensorIO((1,), "int32", False)}
    if img2img:
        table["vae_encoder"] = {
            "image": TensorIO(image, "uint8", True), "sample_noise": f32_in(latents),
            "latent_noise": f32_in(latents), "noise_sigma": f32_in((1,)),
            "latents": TensorIO(latents, "float32", False),
        }
    for encoder, output, unet_input in EMBEDDING_FEEDS[family]:
        table[encoder][output] = None
        table["unet"][unet_input] = None
    return table


def check_io(actual: IOTable, family: str, shapes: Mapping[str, int], img2img: bool, source: str) -> None:
    """Raise BundleError naming the first tensor of `actual` that breaks the contract; `source` says
    where `actual` came from (an engine file, a parsed ONNX graph, the manifest)."""
    expected = expected_io(family, shapes, img2img)
    for component, tensors in expected.items():
        if component not in actual:
            raise BundleError(f"{source}: no {component} component")
        got = actual[component]
        missing = sorted(set(tensors) - set(got))
        extra = sorted(set(got) - set(tensors))
        if missing or extra:
            raise BundleError(f"{source}: {component} tensors differ from what the runner binds"
                              + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        for name, want in tensors.items():
            if want is not None and got[name] != want:
                raise BundleError(f"{source}: {component} tensor {name!r} is {got[name].describe()}, "
                                  f"the runner expects {want.describe()}")
    for encoder, output, unet_input in EMBEDDING_FEEDS[family]:
        made, read = actual[encoder][output], actual["unet"][unet_input]
        if made.is_input or not read.is_input or made.shape != read.shape or made.dtype != read.dtype \
                or made.shape[:1] != (shapes["batch"],):
            raise BundleError(f"{source}: {encoder} output {output!r} ({made.describe()}) does not fit unet "
                              f"input {unet_input!r} ({read.describe()}) for batch {shapes['batch']}")


def manifest_io(components: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, TensorIO]]:
    """The IO tables a manifest records (its components' "inputs" and "outputs" lists)."""
    table: dict[str, dict[str, TensorIO]] = {}
    for component, entry in components.items():
        rows: dict[str, TensorIO] = {}
        for key, is_input in (("inputs", True), ("outputs", False)):
            for t in entry.get(key) or []:  # type: ignore[attr-defined]
                rows[t["name"]] = TensorIO(tuple(int(d) for d in t["shape"]), str(t["dtype"]), is_input)
        table[component] = rows
    return table
