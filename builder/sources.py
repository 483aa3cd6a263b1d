"""Model resolution and loading: presets, ``--random-weights``, hub ids and local diffusers directories.

``resolve_source`` turns what the user passed to ``--model`` into a :class:`ResolvedSource` (cheap: no
torch, no weights). ``part_configs`` reads the configs of every part, ``part_fingerprints`` hashes every
part (the builder rebuilds only the components whose parts changed) and ``load_pipeline`` builds the
diffusers pipeline. Only stdlib at module level; torch / diffusers / huggingface_hub load on use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import tempfile
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from turbo_trt.errors import SourceError

from .controlnet import ControlNetChoice, check_controlnet_fits, controlnets_fingerprint, resolve_controlnets
from .presets import (
    PART_SEED_OFFSETS,
    PRESET_NAMES,
    PRESET_VERSION,
    SHIPPED_CONFIGS,
    ModelSpec,
    part_weights_digest,
    preset_spec,
    shipped_spec,
)
from .tiny_tokenizer import tiny_tokenizer_fingerprint, write_tiny_clip_tokenizer
from .vae import HUB_ID, VaeChoice, check_vae_fits, normalized_config, resolve_vae

ALIASES = {"sd-turbo": "stabilityai/sd-turbo", "sdxl-turbo": "stabilityai/sdxl-turbo"}
PRESETS = PRESET_NAMES
SD_PARTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
SDXL_PARTS = SD_PARTS + ("text_encoder_2", "tokenizer_2")
WEIGHT_PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
OFFLINE_HINT = (
    "Without network access these work offline: --random-weights with sd-turbo or sdxl-turbo, a tiny preset "
    f"({', '.join(PRESETS)}) or a local diffusers pipeline directory."
)
_WEIGHT_EXT = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".msgpack", ".onnx", ".onnx_data", ".pb", ".h5")
_SHARD = r"(-\d{5}-of-\d{5})?"
# A part folder counts as present when it holds one of these (default: config.json).
_PART_FILES = {"tokenizer": ("tokenizer_config.json", "tokenizer.json", "vocab.json"),
               "scheduler": ("scheduler_config.json",)}


def parts_for(family: str) -> tuple[str, ...]:
    """The pipeline parts of a family ("sd" or "sdxl")."""
    return SDXL_PARTS if family == "sdxl" else SD_PARTS


@dataclass(frozen=True)
class ResolvedSource:
    """Where a pipeline comes from; see :func:`resolve_source`."""

    argument: str  # what the user passed to --model
    kind: str  # "preset" | "random" | "hub" | "local"
    model_id: str  # "stabilityai/sd-turbo", "tiny-sd-turbo" or the absolute local path
    revision: str | None  # hub: the resolved commit hash
    family: str  # "sd" | "sdxl"
    local_dir: Path | None  # pipeline directory on disk (hub snapshot or local); None for preset/random
    vae: VaeChoice | None = None  # --vae: a replacement for the pipeline's VAE
    vae_fp32: bool = False  # --vae-fp32: the VAE graphs are exported in FP32 whatever the config says
    controlnets: tuple[ControlNetChoice, ...] = ()  # --controlnet: nets fused into the UNet graph, in order

    @property
    def parts(self) -> tuple[str, ...]:
        return parts_for(self.family)

    def part_fingerprints(self) -> dict[str, str]:
        """Part name -> sha256 that changes whenever that part's config or weights change (the "vae" part:
        the replacement VAE's, and the precision override)."""
        if self.local_dir is None:
            out = _spec_fingerprints(_spec(self))
        else:
            model_index = _read_json(self.local_dir / "model_index.json")
            variant = choose_variant(self.local_dir, self.parts)
            out = {
                part: _dir_part_fingerprint(self.local_dir / part, model_index.get(part), variant)
                for part in self.parts
            }
        if self.vae is not None:
            out["vae"] = self.vae.fingerprint()
        if self.vae_fp32:
            out["vae"] = hashlib.sha256(f"{out['vae']}:fp32".encode()).hexdigest()
        if self.controlnets:
            out["controlnet"] = controlnets_fingerprint([net.fingerprint() for net in self.controlnets])
        return out

    def controlnet_records(self) -> list[dict[str, Any]]:
        """Where each fused ControlNet comes from, for the manifest (in the build's order)."""
        return [net.record(net.fingerprint()) for net in self.controlnets]

    def vae_record(self, fingerprint: str, config: dict[str, Any]) -> dict[str, Any]:
        """Where the bundle's VAE comes from, for the manifest."""
        if self.vae is None:
            record = {"argument": None, "kind": "pipeline", "id": self.model_id, "revision": self.revision}
        else:
            record = {"argument": self.vae.argument, "kind": self.vae.kind, "id": self.vae.model_id,
                      "revision": self.vae.revision}
        return {**record, "class": config.get("_class_name", "AutoencoderKL"), "fingerprint": fingerprint,
                "fp32_override": self.vae_fp32}


def resolve_source(
    model: str, revision: str | None = None, random_weights: bool = False, cache_dir: Path | None = None,
    vae: str | None = None, vae_fp32: bool = False, controlnets: tuple[str, ...] = (),
) -> ResolvedSource:
    """Resolve ``--model`` (preset, alias, hub id or directory), ``--vae`` (see vae.py) and ``--controlnet``
    (see controlnet.py); downloads hub snapshots (configs, tokenizers and one weight variant). Raises
    :class:`SourceError` with what to do instead."""
    src = _resolve_model(model, revision, random_weights, cache_dir)
    if controlnets:
        unet = _spec(src).config("unet") if src.local_dir is None else _read_json(src.local_dir / "unet" / "config.json")
        net_seed = _spec(src).seed if src.local_dir is None else 0
        src = dataclasses.replace(src, controlnets=resolve_controlnets(tuple(controlnets), src.kind, unet, net_seed,
                                                                       cache_dir))
    if vae is None and not vae_fp32:
        return src
    choice = None
    if vae is not None:
        seed = _spec(src).seed + PART_SEED_OFFSETS["vae"] if src.local_dir is None else None
        choice = resolve_vae(vae, src.kind, src.family, seed, cache_dir)
    return dataclasses.replace(src, vae=choice, vae_fp32=vae_fp32)


def _resolve_model(
    model: str, revision: str | None, random_weights: bool, cache_dir: Path | None
) -> ResolvedSource:
    if model in PRESETS:
        _no_revision(model, revision, "a tiny preset")
        return ResolvedSource(model, "preset", model, None, preset_spec(model).family, None)
    repo_id = ALIASES.get(model, model)
    if random_weights:
        if repo_id not in SHIPPED_CONFIGS:
            raise SourceError(
                f"--random-weights supports {', '.join(ALIASES)} ({', '.join(SHIPPED_CONFIGS)}) and the tiny "
                f"presets ({', '.join(PRESETS)}), not {model!r}"
            )
        _no_revision(model, revision, "--random-weights")
        return ResolvedSource(model, "random", repo_id, None, shipped_spec(repo_id).family, None)
    path = Path(model).expanduser()
    if model not in ALIASES and path.exists():
        if not path.is_dir():
            raise SourceError(f"{model} is a file; --model takes a diffusers pipeline directory")
        _no_revision(model, revision, "a local directory")
        path = path.resolve()
        return ResolvedSource(model, "local", str(path), None, inspect_pipeline_dir(path), path)
    if model.startswith((".", "/", "~")):
        raise SourceError(f"no such directory: {model}")
    if not HUB_ID.match(repo_id):
        raise SourceError(
            f"unknown model {model!r}: not a preset ({', '.join(PRESETS)}), an alias "
            f"({', '.join(f'{k} = {v}' for k, v in ALIASES.items())}), an existing directory or a hub id "
            "of the form owner/name"
        )
    snapshot, commit = _download(repo_id, revision, cache_dir)
    return ResolvedSource(model, "hub", repo_id, commit, inspect_pipeline_dir(snapshot), snapshot)


def _no_revision(model: str, revision: str | None, what: str) -> None:
    if revision is not None:
        raise SourceError(f"--revision applies to hub models only; {model!r} is {what}")


def inspect_pipeline_dir(path: Path) -> str:
    """Check that ``path`` holds an SD- or SDXL-like diffusers pipeline; return its family."""
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise SourceError(f"{path} is not a diffusers pipeline directory (no model_index.json). {OFFLINE_HINT}")
    index = _read_json(index_file)
    present = {k for k, v in index.items() if isinstance(v, list) and len(v) == 2 and v[0] and v[1]}
    unet = _read_json(path / "unet" / "config.json") if (path / "unet" / "config.json").is_file() else {}
    xl = "text_encoder_2" in present or "XL" in str(index.get("_class_name")) or (
        unet.get("addition_embed_type") == "text_time")
    family = "sdxl" if xl else "sd"
    missing = [p for p in parts_for(family) if p not in present or not any(
        (path / p / f).is_file() for f in _PART_FILES.get(p.removesuffix("_2"), ("config.json",)))]
    if missing:
        raise SourceError(
            f"{path} ({index.get('_class_name')}) is not an SD/SDXL-like pipeline: missing "
            f"{', '.join(missing)}. turbo-trt needs {', '.join(parts_for(family))}."
        )
    if unet.get("_class_name", "UNet2DConditionModel") != "UNet2DConditionModel":
        raise SourceError(f"{path}: unet is a {unet['_class_name']}, turbo-trt needs a UNet2DConditionModel")
    return family


def _download(repo_id: str, revision: str | None, cache_dir: Path | None) -> tuple[Path, str | None]:
    """Snapshot configs, tokenizers and one weight variant of a hub repo; fall back to the local cache."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError

    try:
        info = HfApi().model_info(repo_id, revision=revision, timeout=30)
        files = [s.rfilename for s in info.siblings or []]
        path = snapshot_download(repo_id, revision=info.sha, cache_dir=cache_dir,
                                 allow_patterns=hub_allow_patterns(files))
    except (RepositoryNotFoundError, RevisionNotFoundError, GatedRepoError) as exc:
        raise SourceError(f"hub repo {repo_id!r} (revision {revision or 'main'}) not found or not accessible: "
                          f"{type(exc).__name__}. {OFFLINE_HINT}") from exc
    except Exception as exc:  # noqa: BLE001  offline, no network, hub down: try the cache before giving up
        try:
            path = snapshot_download(repo_id, revision=revision, cache_dir=cache_dir, local_files_only=True)
        except Exception:  # noqa: BLE001  not cached (or a broken cache): say what works offline
            raise SourceError(f"could not download {repo_id!r} from the Hugging Face Hub and it is not in the "
                              f"local cache ({type(exc).__name__}: {exc}). {OFFLINE_HINT}") from exc
    snapshot = Path(path)
    commit = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else revision
    return snapshot, commit


def hub_allow_patterns(files: list[str]) -> list[str]:
    """Patterns for what to download: model_index, configs, tokenizers and, per weight-bearing part, the
    fp16 safetensors if the repo has them (half the download; the engines are FP16 anyway), else fp32."""
    patterns = ["model_index.json", "*/*.json", "*/*.txt", "tokenizer/*", "tokenizer_2/*"]
    for part in WEIGHT_PARTS:
        names = [f.split("/", 1)[1] for f in files if f.startswith(part + "/") and f.count("/") == 1]
        patterns += [f"{part}/{n}" for n in select_weight_files(names, "fp16")]
    return patterns


def _variant_of(name: str) -> str | None:
    """"" for a plain weight file diffusers/transformers load, the variant for a variant file, else None."""
    m = re.fullmatch(rf"[^.]+(?:\.(\w+){_SHARD})?\.(safetensors|bin)", name) or re.fullmatch(
        r"[^.]+\.(?:safetensors|bin)\.index(?:\.(\w+))?\.json", name)
    return None if m is None else (m.group(1) or "")


def is_weight_file(name: str) -> bool:
    return name.endswith(_WEIGHT_EXT) or bool(re.search(r"\.index(\.\w+)?\.json$", name))


def select_weight_files(names: list[str], variant: str | None) -> list[str]:
    """The weight files loaded from one part folder: the variant's if it has any, else the plain ones;
    safetensors over .bin (as diffusers and transformers do)."""
    plain = [n for n in names if _variant_of(n) == ""]
    chosen = [n for n in names if variant and _variant_of(n) == variant] or plain
    safe = [n for n in chosen if ".safetensors" in n]
    return sorted(safe or chosen)


def choose_variant(local_dir: Path, parts: tuple[str, ...]) -> str | None:
    """None when every weight-bearing part has plain weights; "fp16" when some part has only fp16 ones."""
    for part in parts:
        folder = local_dir / part
        if part in WEIGHT_PARTS and folder.is_dir():
            names = [p.name for p in folder.iterdir() if p.is_file()]
            if not any(_variant_of(n) == "" and not n.endswith(".json") for n in names):
                return "fp16"
    return None


def _dir_part_fingerprint(folder: Path, index_entry: Any, variant: str | None) -> str:
    """sha256 over the model_index entry and the part's files (names + content) that loading reads."""
    digest = hashlib.sha256(json.dumps(index_entry).encode())
    names = sorted(p.name for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))
    weights = set(select_weight_files([n for n in names if is_weight_file(n)], variant))
    for name in names:
        if is_weight_file(name) and name not in weights:
            continue
        digest.update(f"\0{name}\0".encode())
        with open(folder / name, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                digest.update(chunk)
    return digest.hexdigest()


def _spec(src: ResolvedSource) -> ModelSpec:
    return preset_spec(src.model_id) if src.kind == "preset" else shipped_spec(src.model_id)


def _spec_fingerprints(spec: ModelSpec) -> dict[str, str]:
    """Presets / random weights: hash config + seed + versions of what draws the weights, and the trained
    weights' recorded sha256 (read from training.json, not re-hashed)."""
    versions = {p: metadata.version(p).split("+")[0] for p in ("torch", "diffusers", "transformers")}
    out: dict[str, str] = {}
    for part in parts_for(spec.family):
        if part.startswith("tokenizer"):
            out[part] = tiny_tokenizer_fingerprint(spec.pad_tokens[part])
            continue
        payload = {"config": spec.configs[part], "preset_version": PRESET_VERSION, "versions": versions,
                   "seed": spec.seed + PART_SEED_OFFSETS.get(part, 0), "class": spec.model_index.get(part),
                   "trained": part_weights_digest(spec, part)}
        out[part] = hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()
    return out


def part_configs(src: ResolvedSource) -> dict[str, dict[str, Any]]:
    """Config dict of every model part and the scheduler (no weights are read). With ``--vae``, "vae" is the
    replacement's config, checked against the UNet here (before any export)."""
    if src.local_dir is None:
        spec = _spec(src)
        out = {p: spec.config(p) for p in spec.configs}
    else:
        out = {p: _read_json(src.local_dir / p / "config.json") for p in WEIGHT_PARTS if p in src.parts}
        scheduler = _read_json(src.local_dir / "scheduler" / "scheduler_config.json")
        # diffusers instantiates the class model_index names, whatever the scheduler config says.
        scheduler["_class_name"] = _read_json(src.local_dir / "model_index.json")["scheduler"][1]
        out["scheduler"] = scheduler
    if src.vae is not None:
        own = out["vae"]
        out["vae"] = normalized_config(src.vae.config)
        check_vae_fits(out["vae"], out["unet"], f"--vae {src.vae.argument}", own)
    vae_scale = 2 ** (len(out["vae"]["block_out_channels"]) - 1)
    for index, net in enumerate(src.controlnets):
        check_controlnet_fits(net.config, out["unet"], src.family, vae_scale,
                              f"--controlnet {net.argument} (net {index})")
    return out


class _DropTorchvisionNotices(logging.Filter):
    """transformers announces at import that its image processors fall back without torchvision; the build
    stage uses no image processor, so the notice is noise."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision" not in record.getMessage()


def import_diffusers_quietly() -> None:
    """Import diffusers with transformers' torchvision notices dropped (its other messages are kept)."""
    import transformers.utils.logging  # noqa: F401  (creates the "transformers" logger's handler)

    for handler in logging.getLogger("transformers").handlers:
        if not any(isinstance(f, _DropTorchvisionNotices) for f in handler.filters):
            handler.addFilter(_DropTorchvisionNotices())
    import diffusers  # noqa: F401


def load_pipeline(src: ResolvedSource, torch_dtype: Any = None) -> Any:
    """A ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` (float32 unless ``torch_dtype``)."""
    import torch

    import_diffusers_quietly()
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    dtype = torch_dtype or torch.float32
    sdxl = src.family == "sdxl"
    if src.local_dir is None:
        pipe = _assemble(_spec(src), dtype)
    else:
        cls = StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline
        extra: dict[str, Any] = {"add_watermarker": False} if sdxl else {
            "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        try:
            with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older lack dtype
                warnings.filterwarnings("ignore", message=".*use `dtype` instead", category=FutureWarning)
                pipe = cls.from_pretrained(src.local_dir, torch_dtype=dtype,
                                           variant=choose_variant(src.local_dir, src.parts), **extra)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise SourceError(f"could not load the pipeline in {src.local_dir}: {exc}") from exc
        _check_components(pipe, sdxl)
    if src.vae is not None:
        pipe.vae = src.vae.load(dtype)
    # The nets ride along on the pipeline object: the UNet's export wrapper fuses them (wrappers.build_wrapper).
    pipe.turbo_controlnets = [net.load(dtype) for net in src.controlnets]
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _check_components(pipe: Any, sdxl: bool) -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    expected: dict[str, Any] = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
    if sdxl:
        expected["text_encoder_2"] = CLIPTextModelWithProjection
    wrong = [f"{name} is {type(getattr(pipe, name, None)).__name__}, expected {cls.__name__}"
             for name, cls in expected.items() if not isinstance(getattr(pipe, name, None), cls)]
    if wrong:
        raise SourceError("not an SD/SDXL-like pipeline: " + "; ".join(wrong))


def _assemble(spec: ModelSpec, dtype: Any) -> Any:
    """Build a pipeline from a spec: seeded weights, tiny tokenizers, scheduler from the config."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
    from transformers import CLIPTokenizer

    from .presets import build_part, build_scheduler

    models = {p: build_part(spec, p, dtype) for p in WEIGHT_PARTS if p in spec.configs}
    tokenizers: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="turbo-trt-tok-") as tmp:
        for part, pad in spec.pad_tokens.items():
            write_tiny_clip_tokenizer(Path(tmp) / part, pad)
            tokenizers[part] = CLIPTokenizer.from_pretrained(Path(tmp) / part)
    scheduler = build_scheduler(spec)
    if spec.family == "sdxl":
        return StableDiffusionXLPipeline(**models, **tokenizers, scheduler=scheduler, add_watermarker=False,
                                         force_zeros_for_empty_prompt=True)
    return StableDiffusionPipeline(**models, **tokenizers, scheduler=scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)


def save_preset_pipeline(name: str, directory: Path) -> Path:
    """Write a preset (or ``--random-weights`` id) as a real ``save_pretrained`` directory (for tests)."""
    src = resolve_source(name, random_weights=name not in PRESETS)
    load_pipeline(src).save_pretrained(directory)
    return Path(directory)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data: dict[str, Any] = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise SourceError(f"cannot read {path}: {exc}") from exc
    return data
