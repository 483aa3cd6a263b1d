"""`--vae`: building a bundle with a VAE other than the pipeline's own.

- `--vae tiny`: diffusers' `AutoencoderTiny` (TAESD) in place of the pipeline's VAE: `madebyollin/taesd` for
  the SD family, `madebyollin/taesdxl` for SDXL. Offline, the tiny presets get a toy-width TAESD built in
  code (presets.tiny_taesd_config) and `--random-weights` the full-size TAESD architecture from the configs
  shipped in builder/configs/taesd[xl]; both with seeded random weights, like the rest of those pipelines.
- `--vae ID_OR_DIR`: any `AutoencoderKL` or `AutoencoderTiny`, from a hub repo (e.g.
  `madebyollin/sdxl-vae-fp16-fix`) or a local directory written by `save_pretrained` (the directory itself,
  or a pipeline directory's `vae/` folder).

Everything here is cheap and happens before any export: resolving the argument, reading the config and
hashing the files (the fingerprint that makes a changed `--vae` rebuild only the VAE components). Loading the
weights (`VaeChoice.load`) happens in the export stage. torch / diffusers / huggingface_hub load on use.
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

TINY = "tiny"
TINY_REPOS = {"sd": "madebyollin/taesd", "sdxl": "madebyollin/taesdxl"}
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a hub repo id: owner/name
#: diffusers' weight file names for a single model folder.
_WEIGHTS = re.compile(r"diffusion_pytorch_model.*\.(safetensors|bin)$|diffusion_pytorch_model.*\.index(\.\w+)?\.json$")


@dataclass(frozen=True)
class VaeChoice:
    """A replacement VAE (see the module docstring); `config` is its config.json as a dict."""

    argument: str  # what --vae said
    kind: str  # "seeded" (config + seed, no download) | "hub" | "local"
    model_id: str  # hub id, absolute directory, or "tiny-taesd" / "taesd" / "taesdxl" for seeded weights
    revision: str | None  # hub: the resolved commit
    config: dict[str, Any] = field(hash=False)
    folder: Path | None = None  # the folder holding config.json and the weights (hub snapshot or local)
    seed: int | None = None  # seeded kind: torch seed of the weights

    @property
    def class_name(self) -> str:
        return str(self.config.get("_class_name", "AutoencoderKL"))

    def fingerprint(self) -> str:
        """sha256 that changes whenever the VAE's config or weights change."""
        if self.folder is None:
            versions = {p: metadata.version(p).split("+")[0] for p in ("torch", "diffusers")}
            payload = {"config": self.config, "seed": self.seed, "versions": versions, "init": "taesd-bias-0.5"}
            return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
        return folder_digest(self.class_name, self.folder)

    def load(self, dtype: Any = None) -> Any:
        """The VAE module (float32 unless `dtype`)."""
        import torch

        dtype = dtype or torch.float32
        if self.folder is None:
            from .presets import build_vae

            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(int(self.seed or 0))
                model = build_vae(self.config)
            if any(p.dtype != dtype for p in model.parameters()):  # diffusers warns on every .to(dtype)
                model = model.to(dtype=dtype)
            return model.eval()
        import diffusers

        cls = getattr(diffusers, self.class_name)
        files = weight_files(self.folder)
        variant = None if any(".fp16." not in f for f in files) else "fp16"
        try:
            model = cls.from_pretrained(self.folder, torch_dtype=dtype, variant=variant)
        except (OSError, ValueError, KeyError, TypeError, RuntimeError) as exc:
            raise SourceError(f"could not load the VAE in {self.folder}: {exc}") from exc
        return model.eval()


def weight_files(folder: Path) -> list[str]:
    """The weight files diffusers loads from a model folder: plain safetensors, else plain .bin, else the
    fp16 variant's."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and _WEIGHTS.fullmatch(p.name))
    plain = [n for n in names if ".fp16." not in n]
    chosen = plain or names
    safe = [n for n in chosen if ".safetensors" in n]
    return safe or chosen


def folder_digest(class_name: str, folder: Path) -> str:
    """sha256 of a save_pretrained folder: the class name, then config.json and every weight file, each
    named and streamed."""
    digest = hashlib.sha256(class_name.encode())
    for name in ["config.json", *weight_files(folder)]:
        digest.update(f"\0{name}\0".encode())
        with open(folder / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def resolve_vae(argument: str, source_kind: str, family: str, seed: int | None,
                cache_dir: Path | None = None) -> VaeChoice:
    """Resolve `--vae` for a pipeline of `family` from a source of `source_kind` (preset, random, hub,
    local); `seed` is the seeded sources' VAE seed. Raises SourceError saying what works instead."""
    if argument == TINY:
        if source_kind == "preset":
            from .presets import tiny_taesd_config

            return VaeChoice(argument, "seeded", "tiny-taesd", None, tiny_taesd_config(), seed=seed)
        if source_kind == "random":
            from .presets import shipped_taesd_config

            repo = TINY_REPOS[family]
            return VaeChoice(argument, "seeded", repo.split("/")[1], None, shipped_taesd_config(family), seed=seed)
        return _hub(argument, TINY_REPOS[family], cache_dir)
    path = Path(argument).expanduser()
    if path.exists():
        return _local(argument, path)
    if argument.startswith((".", "/", "~")):
        raise SourceError(f"--vae: no such directory: {argument}")
    if not HUB_ID.match(argument):
        raise SourceError(f"--vae {argument!r}: expected 'tiny', a hub id of the form owner/name or a local "
                          "directory holding an AutoencoderKL or AutoencoderTiny (save_pretrained)")
    return _hub(argument, argument, cache_dir)


def _local(argument: str, path: Path) -> VaeChoice:
    if not path.is_dir():
        raise SourceError(f"--vae {argument}: a file; --vae takes a VAE directory written by save_pretrained")
    path = path.resolve()
    folder = _vae_folder(path)
    if folder is None:
        raise SourceError(f"--vae {argument}: {path} holds no VAE (no config.json naming one of "
                          f"{', '.join(VAE_CLASSES)}, neither there nor in a vae/ folder)")
    return VaeChoice(argument, "local", str(folder), None, read_model_config(folder), folder=folder)


def model_folder(path: Path, subfolder: str, classes: tuple[str, ...] | frozenset[str]) -> Path | None:
    """`path` or `path/<subfolder>` (a pipeline directory's component), whichever has a config.json naming one
    of `classes` and weight files diffusers loads; None when neither does."""
    for folder in (path, path / subfolder):
        config = folder / "config.json"
        if config.is_file():
            try:
                name = json.loads(config.read_text(encoding="utf-8")).get("_class_name")
            except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
                continue
            if name in classes and weight_files(folder):
                return folder
    return None


def _vae_folder(path: Path) -> Path | None:
    return model_folder(path, "vae", tuple(VAE_CLASSES))


def read_model_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json; SourceError naming the file when it cannot be read."""
    try:
        config: dict[str, Any] = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read {folder / 'config.json'}: {exc}") from exc
    return config


def _hub(argument: str, repo_id: str, cache_dir: Path | None) -> VaeChoice:
    """Download a VAE repo's config and one set of weights (root folder, or its vae/ subfolder)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    offline = ("offline, --vae tiny works with the tiny presets and --random-weights, and --vae takes a local "
               "directory written by save_pretrained")
    try:
        info = HfApi().model_info(repo_id, timeout=30)
        files = [s.rfilename for s in info.siblings or []]
        sub = "" if "config.json" in files else "vae/"
        names = [f[len(sub):] for f in files if f.startswith(sub) and "/" not in f[len(sub):]]
        weights = [n for n in names if _WEIGHTS.fullmatch(n)]
        plain = [n for n in weights if ".fp16." not in n]
        chosen = [n for n in (plain or weights) if ".safetensors" in n] or plain or weights
        snapshot = Path(snapshot_download(repo_id, revision=info.sha, cache_dir=cache_dir,
                                          allow_patterns=[f"{sub}config.json"] + [sub + n for n in chosen]))
        commit = info.sha
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise SourceError(f"--vae {argument}: hub repo {repo_id!r} not found or not accessible "
                          f"({type(exc).__name__})") from exc
    except Exception as exc:  # noqa: BLE001  no network: try the local cache before giving up
        try:
            snapshot = Path(snapshot_download(repo_id, cache_dir=cache_dir, local_files_only=True))
        except Exception:  # noqa: BLE001
            raise SourceError(f"--vae {argument}: could not download {repo_id!r} from the Hugging Face Hub and it "
                              f"is not in the local cache ({type(exc).__name__}: {exc}); {offline}") from exc
        commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else None
    folder = _vae_folder(snapshot)
    if folder is None:
        raise SourceError(f"--vae {argument}: hub repo {repo_id!r} holds no {' or '.join(VAE_CLASSES)} in diffusers "
                          "format (config.json + diffusion_pytorch_model weights)")
    return VaeChoice(argument, "hub", repo_id, commit, read_model_config(folder), folder=folder)


def check_vae_fits(config: dict[str, Any], unet: dict[str, Any], where: str, own: dict[str, Any]) -> None:
    """The VAE must be one turbo-trt can wrap and must speak the UNet's latent space: its latent channels and
    its down-sampling factor (that of `own`, the pipeline's VAE config) are the ones the UNet was trained on."""
    name = config.get("_class_name", "AutoencoderKL")
    if name not in VAE_CLASSES:
        raise SourceError(f"{where}: the VAE is a {name}; turbo-trt supports {', '.join(VAE_CLASSES)}")
    latent = int(config.get("latent_channels", 4))
    if latent != int(unet["in_channels"]) or latent != int(unet.get("out_channels", unet["in_channels"])):
        raise SourceError(f"{where}: the VAE has {latent} latent channels, the UNet takes {unet['in_channels']} "
                          "(a VAE of another model family?)")
    scale = 2 ** (len(normalized_config(config).get("block_out_channels", (0,) * 4)) - 1)
    own_scale = 2 ** (len(own["block_out_channels"]) - 1)
    if scale != own_scale:
        raise SourceError(f"{where}: the VAE down-samples by {scale}, the pipeline's VAE (and so the UNet's "
                          f"latent grid) by {own_scale}")
    channels = (int(config.get("in_channels", 3)), int(config.get("out_channels", 3)))
    if channels != (3, 3):
        raise SourceError(f"{where}: the VAE maps {channels[0]} -> {channels[1]} image channels; RGB (3) needed")
    # diffusers' SD / SDXL pipelines never apply a VAE's shift_factor (only SD3 / Flux pipelines do): with a
    # non-zero shift the bundle would either differ from diffusers with the same VAE or decode wrongly.
    shift = config.get("shift_factor")
    if shift is not None and float(shift) != 0.0:
        raise SourceError(f"{where}: the VAE's config has shift_factor {shift}; the SD / SDXL pipelines ignore "
                          "shift_factor (it belongs to SD3 / Flux VAEs), so this VAE does not fit this pipeline's "
                          "latent space; use a VAE with shift_factor 0 or null")


def normalized_config(config: dict[str, Any]) -> dict[str, Any]:
    """The config as the build reads it: AutoencoderTiny's `block_out_channels` (its decoder's, which set
    the down-sampling factor) filled in when the file lacks it."""
    out = dict(config)
    if "block_out_channels" not in out and out.get("_class_name") == "AutoencoderTiny":
        out["block_out_channels"] = list(out.get("decoder_block_out_channels", (64, 64, 64, 64)))
    return out
