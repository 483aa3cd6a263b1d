"""`--controlnet`: diffusers `ControlNetModel`s fused into the UNet graph (see wrappers.ControlledUNetStepGraph).

Each `--controlnet` argument (repeatable, in order) is a hub id, a local directory written by
`save_pretrained` (the folder itself or its `controlnet/` subfolder), or `random`: a net with the pipeline
UNet's architecture (as `ControlNetModel.from_unet` makes it) and seeded random weights, output convolutions
included, for offline speed work with `--random-weights` and the tiny presets.

Everything here but `ControlNetChoice.load` is cheap and runs before any export: resolving the argument,
reading the config, checking that the net fits the UNet (`check_controlnet_fits`, naming what differs) and
hashing its files (the fingerprint that makes a changed set of nets rebuild only the UNet).
torch / diffusers / huggingface_hub load on use.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from turbo_trt.errors import SourceError

from .vae import HUB_ID, folder_digest, model_folder, read_model_config, weight_files

RANDOM = "random"
CLASS_NAME = "ControlNetModel"
#: Seed offset of `--controlnet random` nets (net i draws with seed + RANDOM_SEED_OFFSET + i).
RANDOM_SEED_OFFSET = 100
#: The fused graph reads RGB conditioning images: nets with another number of conditioning channels are refused.
CONDITIONING_CHANNELS = 3


@dataclass(frozen=True)
class ControlNetChoice:
    """One resolved `--controlnet`; `config` is its config.json as a dict."""

    argument: str  # what --controlnet said
    kind: str  # "seeded" (config + seed, no download) | "hub" | "local"
    model_id: str  # hub id, absolute directory, or "random"
    revision: str | None  # hub: the resolved commit
    config: dict[str, Any] = field(hash=False)
    folder: Path | None = None  # folder holding config.json and the weights
    seed: int | None = None  # seeded kind: torch seed of the weights
    unet_config: dict[str, Any] | None = field(default=None, hash=False)  # seeded kind: the UNet it copies

    def fingerprint(self) -> str:
        """sha256 that changes whenever the net's config or weights change."""
        if self.folder is None:
            versions = {p: metadata.version(p).split("+")[0] for p in ("torch", "diffusers")}
            payload = {"config": self.config, "seed": self.seed, "versions": versions, "init": "seeded-output-convs"}
            return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return folder_digest(CLASS_NAME, self.folder)

    def record(self, fingerprint: str) -> dict[str, Any]:
        """The manifest's entry for this net."""
        return {"argument": self.argument, "kind": self.kind, "id": self.model_id, "revision": self.revision,
                "class": CLASS_NAME, "fingerprint": fingerprint,
                "conditioning_channels": int(self.config.get("conditioning_channels", 3)),
                "conditioning_channel_order": self.config.get("controlnet_conditioning_channel_order", "rgb")}

    def load(self, dtype: Any = None) -> Any:
        """The ControlNetModel (float32 unless `dtype`)."""
        import torch
        from diffusers import ControlNetModel

        dtype = dtype or torch.float32
        if self.folder is None:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.seed or 0))
                model = ControlNetModel.from_config(self.config)
                seed_output_convs(model)
            return model.to(dtype=dtype).eval()
        variant = None if any(".fp16." not in f for f in weight_files(self.folder)) else "fp16"
        try:
            model = ControlNetModel.from_pretrained(self.folder, torch_dtype=dtype, variant=variant)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise SourceError(f"could not load the ControlNet in {self.folder}: {exc}") from exc
        return model.eval()


def seed_output_convs(model: Any, std: float = 0.02) -> None:
    """Give the zero-initialized output convolutions (`controlnet_down_blocks`, `controlnet_mid_block`) random
    weights from the current torch RNG: a trained net's are non-zero, and an all-zero net would add nothing
    to the UNet (a fused graph that ignored the nets would look right)."""
    import torch

    with torch.no_grad():
        for conv in [*model.controlnet_down_blocks, model.controlnet_mid_block]:
            conv.weight.normal_(0.0, std)
            conv.bias.normal_(0.0, std)


def controlnet_config_from_unet(unet: dict[str, Any]) -> dict[str, Any]:
    """The config `ControlNetModel.from_unet` gives a net for a UNet of this config (no weights made)."""
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    with torch.device("meta"):
        meta_unet = UNet2DConditionModel.from_config(unet)
        net = ControlNetModel.from_unet(meta_unet, load_weights_from_unet=False)
    config = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
    return json.loads(json.dumps({"_class_name": CLASS_NAME, **config}))


def resolve_controlnets(arguments: tuple[str, ...], source_kind: str, unet_config: dict[str, Any], seed: int,
                        cache_dir: Path | None = None) -> tuple[ControlNetChoice, ...]:
    """Resolve every `--controlnet` in order (no check against the UNet yet: `check_controlnet_fits`)."""
    out = []
    for index, argument in enumerate(arguments):
        if argument == RANDOM:
            if source_kind not in ("preset", "random"):
                raise SourceError("--controlnet random is for offline builds (--random-weights or a tiny preset); "
                                  "with real weights pass a ControlNet hub id or directory")
            out.append(ControlNetChoice(argument, "seeded", RANDOM, None, controlnet_config_from_unet(unet_config),
                                        seed=seed + RANDOM_SEED_OFFSET + index))
            continue
        path = Path(argument).expanduser()
        if path.exists():
            out.append(_local(argument, path))
        elif argument.startswith((".", "/", "~")):
            raise SourceError(f"--controlnet: no such directory: {argument}")
        elif not HUB_ID.match(argument):
            raise SourceError(f"--controlnet {argument!r}: expected a hub id of the form owner/name, a local "
                              "directory holding a ControlNetModel (save_pretrained) or 'random'")
        else:
            out.append(_hub(argument, cache_dir))
    return tuple(out)


def _controlnet_folder(path: Path) -> Path | None:
    return model_folder(path, "controlnet", (CLASS_NAME,))


def _local(argument: str, path: Path) -> ControlNetChoice:
    if not path.is_dir():
        raise SourceError(f"--controlnet {argument}: a file; --controlnet takes a directory written by "
                          "ControlNetModel.save_pretrained")
    folder = _controlnet_folder(path.resolve())
    if folder is None:
        raise SourceError(f"--controlnet {argument}: {path} holds no ControlNetModel (no config.json naming "
                          f"{CLASS_NAME} with diffusion_pytorch_model weights, neither there nor in controlnet/)")
    return ControlNetChoice(argument, "local", str(folder), None, read_model_config(folder), folder=folder)


def _hub(argument: str, cache_dir: Path | None) -> ControlNetChoice:
    """Download a ControlNet repo's config and one set of weights (root folder or controlnet/)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(argument, timeout=30)
        files = [s.rfilename for s in info.siblings or []]
        sub = "" if "config.json" in files else "controlnet/"
        names = [f[len(sub):] for f in files if f.startswith(sub) and "/" not in f[len(sub):]]
        weights = [n for n in names if re.fullmatch(r"diffusion_pytorch_model.*\.(safetensors|bin)", n)]
        plain = [n for n in weights if ".fp16." not in n]
        chosen = [n for n in (plain or weights) if ".safetensors" in n] or plain or weights
        snapshot = Path(snapshot_download(argument, revision=info.sha, cache_dir=cache_dir,
                                          allow_patterns=[f"{sub}config.json"] + [sub + n for n in chosen]))
        commit = info.sha
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise SourceError(f"--controlnet {argument}: hub repo not found or not accessible ({type(exc).__name__})") from exc
    except Exception as exc:  # noqa: BLE001  no network: try the local cache before giving up
        try:
            snapshot = Path(snapshot_download(argument, cache_dir=cache_dir, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise SourceError(f"--controlnet {argument}: could not download it from the Hugging Face Hub and it is "
                              f"not in the local cache ({type(exc).__name__}: {exc}); offline, --controlnet takes a "
                              "local save_pretrained directory, or 'random' with --random-weights") from exc
        commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    folder = _controlnet_folder(snapshot)
    if folder is None:
        raise SourceError(f"--controlnet {argument}: the hub repo holds no {CLASS_NAME} in diffusers format")
    return ControlNetChoice(argument, "hub", argument, commit, read_model_config(folder), folder=folder)


def check_controlnet_fits(config: dict[str, Any], unet: dict[str, Any], family: str, vae_scale: int,
                          where: str) -> None:
    """Refuse, before any export, a net that cannot steer this UNet, naming what differs: another family
    (SDXL's text-time conditioning or not), cross-attention width, latent channels, the down-blocks whose
    residuals the UNet adds (widths, layers, count), SDXL's added-embedding sizes, the conditioning image's
    down-sampling (it must land on the latent grid) and its channels (RGB)."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise SourceError(f"{where}: a {name}; turbo-trt fuses {CLASS_NAME}s")
    net_sdxl = config.get("addition_embed_type") == "text_time"
    if net_sdxl != (family == "sdxl"):
        raise SourceError(f"{where}: an {'SDXL' if net_sdxl else 'SD 1.x/2.x'} ControlNet (addition_embed_type "
                          f"{config.get('addition_embed_type')!r}), but the model is "
                          f"{'SDXL' if family == 'sdxl' else 'SD'} (addition_embed_type {unet.get('addition_embed_type')!r})")

    def value(cfg: dict[str, Any], key: str, default: Any = None) -> Any:
        v = cfg.get(key, default)
        return list(v) if isinstance(v, tuple) else v

    checks = [("cross_attention_dim", "cross-attention width", None), ("in_channels", "latent channels", 4),
              ("block_out_channels", "down-block widths", None), ("layers_per_block", "layers per block", 2)]
    if family == "sdxl":
        checks += [("addition_time_embed_dim", "time-id embedding size", None),
                   ("projection_class_embeddings_input_dim", "added-embedding input size", None)]
    for key, what, default in checks:
        have, want = value(config, key, default), value(unet, key, default)
        if have != want:
            raise SourceError(f"{where}: {what} ({key}) is {have}, the UNet's is {want}")
    if len(config.get("down_block_types", ())) != len(unet.get("down_block_types", ())):
        raise SourceError(f"{where}: {len(config.get('down_block_types', ()))} down blocks, the UNet has "
                          f"{len(unet.get('down_block_types', ()))}")
    embedding = config.get("conditioning_embedding_out_channels", (16, 32, 96, 256))
    down = 2 ** (len(embedding) - 1)
    if down != vae_scale:
        raise SourceError(f"{where}: the conditioning image is down-sampled by {down} "
                          f"(conditioning_embedding_out_channels {list(embedding)}), the latents by {vae_scale}")
    channels = int(config.get("conditioning_channels", 3))
    if channels != CONDITIONING_CHANNELS:
        raise SourceError(f"{where}: the net takes {channels} conditioning channels; the bundle's control_image "
                          f"is RGB ({CONDITIONING_CHANNELS})")


def controlnets_fingerprint(fingerprints: list[str]) -> str:
    """The "controlnet" part: the nets' fingerprints in order."""
    return hashlib.sha256(json.dumps(fingerprints).encode()).hexdigest()


def save_test_controlnet(unet: Any, directory: Path, seed: int, perturb: float = 0.02) -> Path:
    """A ControlNet for tests, written with save_pretrained: `ControlNetModel.from_unet` (the UNet's encoder
    weights), every weight moved by seeded noise (a trained net differs from its UNet; identical weights would
    also be merged with the UNet's by the exporter) and seeded non-zero output convolutions."""
    import torch
    from diffusers import ControlNetModel

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ControlNetModel.from_unet(unet)
        with torch.no_grad():
            for param in net.parameters():
                param.add_(torch.randn_like(param) * perturb)
        seed_output_convs(net, std=0.3)  # strong enough to move the trained tiny presets' pictures
    net.save_pretrained(directory)
    return Path(directory)
