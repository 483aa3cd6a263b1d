"""Architecture specs: the tiny presets (trained weights shipped in the package) and the full-size configs.

A :class:`ModelSpec` holds everything needed to build a pipeline without downloading anything:
the diffusers / transformers config of every part, the pad token of every tokenizer and a seed.
Weights are drawn with ``torch.manual_seed(seed + PART_SEED_OFFSETS[part])`` inside ``fork_rng``,
one seed per part, so that the weights of one part do not depend on the configs of the others
(the per-part fingerprints rely on that) and every build gives bit-identical weights. The tiny
presets then load the weights that ``train_tiny`` trained on the shapes language
(``tiny_weights/<preset>/``, shipped in the package), so their images follow prompts such as
"a red circle on a blue background"; ``--random-weights`` keeps seeded random weights (full-size configs).

Tiny presets keep the real models' block types, the VAE's four levels (down-sampling factor 8), the
SDXL "text_time" conditioning and two text encoders, at toy widths; they were trained at 64x64
(:data:`TINY_NATIVE_SIZE`, latents 8x8), so a call runs in milliseconds on a CPU.
torch / diffusers / transformers are imported inside functions only.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .tiny_tokenizer import tiny_vocab_size

# Bump whenever the tiny configs or the way weights are drawn change.
PRESET_VERSION = 3
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
#: Trained weights of the tiny presets (``python -m turbo_trt.builder.train_tiny`` writes them).
WEIGHTS_DIR = Path(__file__).resolve().parent / "tiny_weights"
PRESET_FAMILIES = ("sd", "sdxl")
#: The image size the tiny presets were trained at (their default build size).
TINY_NATIVE_SIZE = 64
PRESET_NAMES = ("tiny-sd-turbo", "tiny-sdxl-turbo")
SHIPPED_CONFIGS = {"stabilityai/sd-turbo": "sd-turbo", "stabilityai/sdxl-turbo": "sdxl-turbo"}
PART_SEED_OFFSETS = {"unet": 0, "vae": 1, "text_encoder": 2, "text_encoder_2": 3}
SD_PAD_TOKENS = {"tokenizer": "!"}
SDXL_PAD_TOKENS = {"tokenizer": "<|endoftext|>", "tokenizer_2": "!"}


@dataclass(frozen=True)
class ModelSpec:
    """Configs, tokenizer pad tokens and seed of a pipeline built from code."""

    name: str
    family: str  # "sd" | "sdxl"
    seed: int
    model_index: dict[str, Any]
    configs: dict[str, dict[str, Any]]  # part -> config dict (unet, vae, text_encoder[_2], scheduler)
    pad_tokens: dict[str, str] = field(default_factory=dict)  # tokenizer part -> pad token
    weights: Path | None = None  # trained weights (one save_pretrained folder per part); None: seeded random

    def config(self, part: str) -> dict[str, Any]:
        """A deep copy of one part's config."""
        return copy.deepcopy(self.configs[part])


def _text_encoder(arch: str, hidden: int, layers: int, heads: int, act: str, proj: int) -> dict[str, Any]:
    return {
        "architectures": [arch], "model_type": "clip_text_model", "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "intermediate_size": 2 * hidden,
        "hidden_act": act, "projection_dim": proj, "vocab_size": tiny_vocab_size(),
        "max_position_embeddings": 77, "layer_norm_eps": 1e-05, "attention_dropout": 0.0, "dropout": 0.0,
        "initializer_range": 0.02, "initializer_factor": 1.0,
        # As in the real configs: eos_token_id 2 selects the legacy pooling (argmax of the ids), which
        # finds <|endoftext|> because it is the highest id of the tiny vocabulary too.
        "bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "torch_dtype": "float32",
    }


def _tiny_vae(scaling_factor: float) -> dict[str, Any]:
    """The tiny AutoencoderKL: four levels (factor 8) of 16 channels and one GroupNorm group. GroupNorm takes
    out each group's per-image mean, and a flat background's colour is exactly such a mean: with 4 groups
    over 8 channels at full resolution the trained autoencoder still blurred colours and shapes (its own
    reconstructions of the held-back scenes scored 0.82 of attributes right); one group of 16 channels
    reaches 0.96 in the same training time (builder/train_tiny.py)."""
    return {
        "_class_name": "AutoencoderKL", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [16, 16, 16, 16], "layers_per_block": 1, "norm_num_groups": 1,
        "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4,
        "act_fn": "silu", "sample_size": TINY_NATIVE_SIZE, "scaling_factor": scaling_factor, "force_upcast": True,
    }


def tiny_taesd_config() -> dict[str, Any]:
    """The tiny presets' `--vae tiny`: AutoencoderTiny (TAESD) with its real structure (three 2x stages,
    down-sampling factor 8, relu, the tanh latent clamp) at toy width, one block per stage."""
    return {
        "_class_name": "AutoencoderTiny", "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "encoder_block_out_channels": [8, 8, 8, 8], "decoder_block_out_channels": [8, 8, 8, 8],
        "num_encoder_blocks": [1, 1, 1, 1], "num_decoder_blocks": [1, 1, 1, 1], "act_fn": "relu",
        "upsample_fn": "nearest", "upsampling_scaling_factor": 2, "latent_magnitude": 3, "latent_shift": 0.5,
        "scaling_factor": 1.0, "shift_factor": 0.0, "force_upcast": False,
    }


def shipped_taesd_config(family: str) -> dict[str, Any]:
    """The full-size TAESD architecture config (madebyollin/taesd or taesdxl) shipped in configs/."""
    return _shipped_json("taesdxl" if family == "sdxl" else "taesd", "config.json")


def _tiny_unet(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "_class_name": "UNet2DConditionModel", "sample_size": TINY_NATIVE_SIZE // 8, "in_channels": 4, "out_channels": 4,
        "block_out_channels": [32, 64, 64], "layers_per_block": 1, "attention_head_dim": [2, 4, 4],
        "norm_num_groups": 8, "use_linear_projection": True, "flip_sin_to_cos": True, "freq_shift": 0,
        "act_fn": "silu", "mid_block_type": "UNetMidBlock2DCrossAttn",
    }
    base.update(overrides)
    return base


def _shipped_json(folder: str, rel: str) -> dict[str, Any]:
    with open(CONFIGS_DIR / folder / rel, encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def _tiny_scheduler(folder: str) -> dict[str, Any]:
    """The real model's scheduler (Euler / Euler-ancestral, trailing spacing), predicting v instead of epsilon:
    at the first trailing timestep (sigma 14.6) an epsilon model must give back its own input to better than
    1 % for a usable 1-step image, which a toy UNet trained for minutes does not reach; v at that timestep is
    nearly the clean latent, so its errors reach the image one to one. The runner's fused step and the
    diffusers pipelines handle both."""
    config = _shipped_json(folder, "scheduler/scheduler_config.json")
    config["prediction_type"] = "v_prediction"
    return config


def _tiny_sd() -> ModelSpec:
    model_index = _shipped_json("sd-turbo", "model_index.json")
    return ModelSpec(
        name="tiny-sd-turbo", family="sd", seed=1234, model_index=model_index, pad_tokens=SD_PAD_TOKENS,
        configs={
            "unet": _tiny_unet(
                down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
                up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
                cross_attention_dim=32, transformer_layers_per_block=1,
            ),
            "vae": _tiny_vae(0.18215),
            "text_encoder": _text_encoder("CLIPTextModel", 32, 3, 4, "gelu", 32),
            "scheduler": _tiny_scheduler("sd-turbo"),
        },
    )


def _tiny_sdxl() -> ModelSpec:
    model_index = _shipped_json("sdxl-turbo", "model_index.json")
    te1 = _text_encoder("CLIPTextModel", 32, 3, 4, "quick_gelu", 32)  # CLIP-L-like
    te2 = _text_encoder("CLIPTextModelWithProjection", 64, 4, 4, "gelu", 48)  # OpenCLIP-bigG-like
    time_dim = 16
    return ModelSpec(
        name="tiny-sdxl-turbo", family="sdxl", seed=5678, model_index=model_index, pad_tokens=SDXL_PAD_TOKENS,
        configs={
            "unet": _tiny_unet(
                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
                up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
                transformer_layers_per_block=[1, 1, 2],
                cross_attention_dim=te1["hidden_size"] + te2["hidden_size"],  # penultimate states concatenated
                addition_embed_type="text_time", addition_time_embed_dim=time_dim,
                projection_class_embeddings_input_dim=te2["projection_dim"] + 6 * time_dim,
            ),
            "vae": _tiny_vae(0.13025),
            "text_encoder": te1,
            "text_encoder_2": te2,
            "scheduler": _tiny_scheduler("sdxl-turbo"),
        },
    )


def preset_spec(name: str, trained: bool = True) -> ModelSpec:
    """The spec of a tiny preset (``tiny-sd-turbo`` or ``tiny-sdxl-turbo``); ``trained=False``: seeded random
    weights (what training starts from)."""
    builders = {"tiny-sd-turbo": _tiny_sd, "tiny-sdxl-turbo": _tiny_sdxl}
    if name not in builders:
        raise KeyError(f"unknown preset {name!r}; presets: {', '.join(builders)}")
    spec = builders[name]()
    if not trained:
        return spec
    weights = WEIGHTS_DIR / name
    if not (weights / "training.json").is_file():
        raise FileNotFoundError(
            f"the trained weights of {name} are missing ({weights}); train them with "
            f"`python -m turbo_trt.builder.train_tiny --family {spec.family}`"
        )
    return dataclasses.replace(spec, weights=weights)


def training_record(spec: ModelSpec) -> dict[str, Any]:
    """The ``training.json`` of a trained preset (settings, sha256 of every file, ...)."""
    if spec.weights is None:
        raise ValueError(f"{spec.name} has no trained weights")
    with open(spec.weights / "training.json", encoding="utf-8") as f:
        data: dict[str, Any] = json.load(f)
    return data


def part_weights_digest(spec: ModelSpec, part: str) -> str | None:
    """The recorded sha256 of a trained part's files (for the fingerprints); None for seeded weights."""
    if spec.weights is None:
        return None
    files = training_record(spec)["files"]
    return json.dumps({k: v for k, v in sorted(files.items()) if k.startswith(part + "/")})


def shipped_spec(model_id: str) -> ModelSpec:
    """The full-size spec of ``stabilityai/sd-turbo`` / ``stabilityai/sdxl-turbo`` from ``configs/``.

    Used by ``--random-weights``. There is no real vocabulary offline, so its tokenizers are the tiny
    synthetic ones: their ids (< 1000) are valid rows of the full 49408-row embedding tables.
    """
    folder = SHIPPED_CONFIGS[model_id]
    model_index = _shipped_json(folder, "model_index.json")
    family = "sdxl" if "text_encoder_2" in model_index else "sd"
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    configs = {p: _shipped_json(folder, f"{p}/config.json") for p in parts}
    configs["scheduler"] = _shipped_json(folder, "scheduler/scheduler_config.json")
    pads = SDXL_PAD_TOKENS if family == "sdxl" else SD_PAD_TOKENS
    return ModelSpec(name=model_id, family=family, seed=42, model_index=model_index, configs=configs, pad_tokens=pads)


def build_part(spec: ModelSpec, part: str, dtype: Any = None, device: Any = None) -> Any:
    """Instantiate one weight-bearing part: seeded random weights, then a trained preset's shipped ones
    (``device="meta"``: the architecture only, no memory)."""
    import torch

    dtype = dtype or torch.float32
    config = spec.config(part)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed + PART_SEED_OFFSETS[part])
        with torch.device(device or "cpu"):
            if part == "unet":
                from diffusers import UNet2DConditionModel

                model = UNet2DConditionModel.from_config(config)
            elif part == "vae":
                model = build_vae(config)
            else:
                import transformers

                arch = config["architectures"][0]
                if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
                    raise ValueError(f"unsupported text encoder architecture {arch!r}")
                model = getattr(transformers, arch)(transformers.CLIPTextConfig(**config))
    if spec.weights is not None and str(device) != "meta":
        _load_trained(model, spec.weights / part)
    # transformers may honour the config's torch_dtype for some submodules: cast whatever differs
    # (only then: diffusers warns on every .to(dtype)).
    if any(p.dtype != dtype for p in model.parameters()):
        model = model.to(dtype=dtype)
    return model.eval()


def _load_trained(model: Any, folder: Path) -> None:
    """Load a part's shipped safetensors into the model built from the spec's config: every tensor must
    match (a config that differs from what was trained fails here, naming the tensors)."""
    from safetensors.torch import load_file

    files = sorted(folder.glob("*.safetensors"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one .safetensors file in {folder}, found {len(files)}")
    state = load_file(files[0])
    missing, unexpected = model.load_state_dict(state, strict=False)
    # transformers keeps position_ids as a non-persistent buffer in recent versions; anything else is an error.
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"{files[0]} does not fit the preset's config: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def build_vae(config: dict[str, Any]) -> Any:
    """An AutoencoderKL or AutoencoderTiny (config's `_class_name`) with the current RNG's weights.

    AutoencoderTiny's default initialization decodes to a nearly constant near-black image (its decoder
    ends in a plain conv after a stack of small-gain ones, then maps [0, 1] to [-1, 1]); the last conv's
    bias is set to 0.5, the middle of its output range, so random weights decode to a textured mid-grey
    picture that the parity tests can compare. Trained weights (hub, local) are never touched."""
    import diffusers
    import torch

    name = config.get("_class_name", "AutoencoderKL")
    if name not in ("AutoencoderKL", "AutoencoderTiny"):
        raise ValueError(f"unsupported VAE class {name!r}")
    model = getattr(diffusers, name).from_config(config)
    if name == "AutoencoderTiny":
        with torch.no_grad():
            model.decoder.layers[-1].bias.fill_(0.5)
    return model


def build_scheduler(spec: ModelSpec) -> Any:
    """The scheduler named by the config's ``_class_name``, built from that config."""
    import diffusers

    config = spec.config("scheduler")
    return getattr(diffusers, config["_class_name"]).from_config(config)
