"""LoRA files: read, map their keys onto a model's modules, and compute merged weights. Torch-free.

A LoRA adds `scale * (alpha / rank) * up @ down` to the weight of each module it names (for a convolution,
`down` is a k x k convolution to `rank` channels and `up` a 1 x 1 one; their product is reshaped to the
kernel). Two key styles are read, for the UNet and the text encoder(s):

- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (also `lora.down` / `lora.up` and
  the older `processor.to_q_lora.down` spellings), `text_encoder.<module>...`, `text_encoder_2.<module>...`;
  alpha from the file's `lora_adapter_metadata` (`<part>.lora_alpha`, `<part>.alpha_pattern`) or an
  `<module>.alpha` tensor, else alpha = rank (what diffusers assumes).
- kohya (sd-scripts): `lora_unet_<module with _>.lora_down.weight` / `.lora_up.weight` / `.alpha`,
  `lora_te_` (SD) or `lora_te1_` / `lora_te2_` (SDXL). The UNet names may be diffusers' (`down_blocks_0_
  attentions_0_...`) or the original SD checkpoint's (kohya's SDXL naming: `input_blocks_4_1_...`,
  `middle_block_1_...`, `output_blocks_3_1_...` for the attention blocks, `input_blocks_1_0_in_layers_2`,
  `..._emb_layers_1`, `..._out_layers_3`, `..._skip_connection` for ResNet blocks, `input_blocks_3_0_op` /
  `output_blocks_2_2_conv` for down/up-samplers, `input_blocks_0_0`, `out_2`, `time_embed_0/2`,
  `label_emb_0_0/2`); underscores are resolved against the model's real module names, never guessed.

Module paths are relative to the diffusers part (`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q`,
`encoder.layers.0.self_attn.q_proj`); a text encoder's `text_model.` prefix (transformers 4) is dropped so
both transformers generations name the same module the same way.

Every check (family, unknown keys, shapes) runs while a file is read, before anything is changed: a bad
LoRA raises `LoraError` naming the key.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import threading
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from turbo_trt.errors import InputError

#: Model parts a LoRA may touch, and the bundle component each part's weights live in.
LORA_PARTS = ("unet", "text_encoder", "text_encoder_2")
PART_COMPONENT = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
_KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                   "lora_te2_": "text_encoder_2"}
_DTYPES = {"F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": np.uint16}

#: module path -> weight shape, per part: what a LoRA is checked against.
ModuleShapes = Mapping[str, Mapping[str, tuple[int, ...]]]


class LoraError(InputError):
    """A LoRA that cannot be applied: unreadable, for another model, unknown keys or mismatched shapes."""


class LoraWarning(UserWarning):
    """A LoRA names modules whose weights the exported graph does not hold (so they change nothing)."""


@dataclass(frozen=True)
class LoraLayer:
    """One module's low-rank pair: down (rank, in[, kh, kw]), up (out, rank[, 1, 1]), alpha."""

    down: np.ndarray
    up: np.ndarray
    alpha: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self, scale: float) -> np.ndarray:
        """`scale * alpha / rank * up @ down` in float32, shaped like the module's weight."""
        up = self.up.astype(np.float32).reshape(self.up.shape[0], self.rank)
        down = self.down.astype(np.float32).reshape(self.rank, -1)
        product = up @ down
        shape = (self.up.shape[0], *self.down.shape[1:])
        return (product * np.float32(scale * self.alpha / self.rank)).reshape(shape)


@dataclass
class LoraFile:
    """A parsed LoRA: (part, module path) -> layer, plus where it came from."""

    path: Path
    sha256: str
    layers: dict[tuple[str, str], LoraLayer] = field(default_factory=dict)

    @property
    def parts(self) -> list[str]:
        return sorted({part for part, _ in self.layers})


def parse_lora_argument(text: str) -> tuple[str, float]:
    """`PATH[:SCALE]` -> (path, scale); scale defaults to 1.0. Only a trailing `:number` is a scale; a
    non-finite one (nan, inf) is refused."""
    head, sep, tail = text.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        return head, check_scale(scale, head)
    return text, 1.0


def check_scale(scale: object, source: object) -> float:
    """A LoRA's scale as a float; LoraError unless it is a finite real number."""
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)) \
            or not np.isfinite(scale):
        raise LoraError(f"LoRA {source}: scale must be a finite number, got {scale!r}")
    return float(scale)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors, metadata) of a .safetensors file, parsed here (8-byte header size, JSON header, data):
    no torch, no safetensors package. BF16 is widened to float32."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise LoraError(f"cannot read LoRA {path}: {exc}") from exc
    try:
        (size,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + size])
        if not isinstance(header, dict):
            raise ValueError("header is not an object")
    except (struct.error, ValueError, UnicodeDecodeError) as exc:
        raise LoraError(f"{path} is not a safetensors file ({exc})") from exc
    body = memoryview(data)[8 + size:]
    metadata = {str(k): str(v) for k, v in (header.pop("__metadata__", None) or {}).items()}
    tensors: dict[str, np.ndarray] = {}
    for key, info in header.items():
        if not isinstance(info, dict):
            raise LoraError(f"{path} is not a safetensors file (header entry {key} is not an object)")
        dtype = _DTYPES.get(str(info.get("dtype")))
        if dtype is None:
            raise LoraError(f"{path}: tensor {key} has dtype {info.get('dtype')}; LoRA tensors must be F16, BF16, F32 or F64")
        try:
            start, end = (int(v) for v in info["data_offsets"])
            shape = [int(d) for d in info["shape"]]
            if not 0 <= start <= end <= len(body):
                raise ValueError(f"data offsets {start}..{end} outside the {len(body)}-byte data section")
            array = np.frombuffer(body[start:end], dtype=dtype).reshape(shape)
        except (KeyError, TypeError, ValueError) as exc:
            raise LoraError(f"{path}: tensor {key} is damaged or not a safetensors entry ({exc})") from exc
        if info["dtype"] == "BF16":
            array = (array.astype(np.uint32) << 16).view(np.float32)
        tensors[key] = array
    return tensors, metadata


def canonical_module(part: str, module: str) -> str:
    """Text encoders: drop transformers 4's `text_model.` level (transformers 5 has none)."""
    if part.startswith("text_encoder") and module.startswith("text_model."):
        return module[len("text_model."):]
    return module


# --- key parsing -------------------------------------------------------------------------------------------

_PEFT_SUFFIXES = (
    (".lora_A.weight", "down"), (".lora_B.weight", "up"), (".lora.down.weight", "down"),
    (".lora.up.weight", "up"), (".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha"),
)
_OLD_PROCESSOR = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")


def _split_key(key: str) -> tuple[str, str, str] | None:
    """(prefix-bearing name, role, style) where role is down / up / alpha, or None if not a LoRA key."""
    if key.startswith(tuple(_KOHYA_PREFIXES)):
        for suffix, role in ((".lora_down.weight", "down"), (".lora_up.weight", "up"), (".alpha", "alpha")):
            if key.endswith(suffix):
                return key[: -len(suffix)], role, "kohya"
        return None
    old = _OLD_PROCESSOR.search(key)
    if old:
        target = old.group(1) + (".0" if old.group(1) == "to_out" else "")
        return key[: old.start()] + "." + target, old.group(2), "diffusers"
    for suffix, role in _PEFT_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role, "diffusers"
    return None


def _layers_per_block(unet_modules: Mapping[str, object]) -> int:
    """The UNet's layers_per_block: how many resnets its first down block has."""
    found = [int(m.group(1)) for name in unet_modules if (m := re.match(r"down_blocks\.0\.resnets\.(\d+)\.", name))]
    return max(found) + 1 if found else 2


#: Original-checkpoint ResBlock layers -> diffusers' ResnetBlock2D (the norms are no Linear / Conv).
_LDM_RESNET = {"in_layers_2": "conv1", "emb_layers_1": "time_emb_proj", "out_layers_3": "conv2",
               "skip_connection": "conv_shortcut"}
#: Original-checkpoint top-level layers -> diffusers'.
_LDM_TOP = {"input_blocks_0_0": "conv_in", "time_embed_0": "time_embedding_linear_1",
            "time_embed_2": "time_embedding_linear_2", "label_emb_0_0": "add_embedding_linear_1",
            "label_emb_0_2": "add_embedding_linear_2", "out_2": "conv_out"}
#: Prefixes of the original checkpoint's UNet naming.
_LDM_PREFIXES = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")


def _ldm_resnet(sub: str) -> str | None:
    return _LDM_RESNET.get(sub)


def _ldm_to_diffusers(name: str, layers: int) -> str:
    """Original SD checkpoint names of the UNet (kohya's SDXL naming) -> diffusers' (underscored): attention
    blocks, ResNet blocks, down/up-samplers, conv_in/conv_out and the time/label embeddings. Each level has
    `layers` + 1 input blocks (the last one down-samples) and `layers` + 1 output blocks (the last one
    up-samples). A name that matches none of these is returned unchanged (and then fails the lookup)."""
    for ldm, diffusers in _LDM_TOP.items():
        if name == ldm:
            return diffusers
    m = re.match(r"input_blocks_(\d+)_(\d+)_(.*)", name)
    if m:
        n, kind, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, index = (n - 1) // (layers + 1), (n - 1) % (layers + 1)
        if kind == 1:
            return f"down_blocks_{level}_attentions_{index}_{rest}"
        if kind == 0 and rest == "op" and index == layers:
            return f"down_blocks_{level}_downsamplers_0_conv"
        if kind == 0 and _ldm_resnet(rest):
            return f"down_blocks_{level}_resnets_{index}_{_ldm_resnet(rest)}"
        return name
    m = re.match(r"output_blocks_(\d+)_(\d+)_(.*)", name)
    if m:
        n, kind, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        level, index = n // (layers + 1), n % (layers + 1)
        if kind in (1, 2) and rest == "conv":  # the up-sampler: block 2 after an attention, else block 1
            return f"up_blocks_{level}_upsamplers_0_conv"
        if kind == 1:
            return f"up_blocks_{level}_attentions_{index}_{rest}"
        if kind == 0 and _ldm_resnet(rest):
            return f"up_blocks_{level}_resnets_{index}_{_ldm_resnet(rest)}"
        return name
    m = re.match(r"middle_block_(\d+)_(.*)", name)
    if m:
        kind, rest = int(m.group(1)), m.group(2)
        if kind == 1:
            return f"mid_block_attentions_0_{rest}"
        if kind in (0, 2) and _ldm_resnet(rest):
            return f"mid_block_resnets_{kind // 2}_{_ldm_resnet(rest)}"
    return name


def _kohya_tables(modules: ModuleShapes) -> dict[str, dict[str, str]]:
    """part -> {module path with "_" for "." -> module path}: kohya names resolved against real modules."""
    return {part: {module.replace(".", "_"): module for module in names} for part, names in modules.items()}


def _resolve(name: str, style: str, family: str, modules: ModuleShapes, key: str, path: Path,
             tables: dict[str, dict[str, str]]) -> tuple[str, str]:
    """(part, module path) of a key's module name, checked against the model's modules."""
    if style == "kohya":
        prefix = next(p for p in sorted(_KOHYA_PREFIXES, key=len, reverse=True) if name.startswith(p))
        part = _KOHYA_PREFIXES[prefix]
        _check_part(part, family, key, path)
        flat = name[len(prefix):]
        if part == "unet":
            flat = _ldm_to_diffusers(flat, _layers_per_block(modules.get("unet", {})))
        else:
            flat = flat.removeprefix("text_model_")
        table = tables.get(part, {})
        if flat not in table:
            original = name[len(prefix):]
            if part == "unet" and original.startswith(_LDM_PREFIXES) and flat == original:
                raise LoraError(
                    f"{path}: key {key}: {original!r} is in the original SD checkpoint's UNet naming, and no layer "
                    "of that naming this reader maps (attention blocks, ResNet in_layers_2 / emb_layers_1 / "
                    "out_layers_3 / skip_connection, down/up-sampler convolutions, conv_in, conv_out, time_embed, "
                    "label_emb) has this name; convert the LoRA to diffusers naming")
            raise LoraError(f"{path}: key {key}: no module of the {part} is named {flat!r} "
                            f"(kohya naming); is this LoRA for another model?")
        return part, table[flat]
    part, _, module = name.partition(".")
    if part not in LORA_PARTS:
        raise LoraError(f"{path}: key {key}: LoRAs may touch {', '.join(LORA_PARTS)}, not {part!r}")
    _check_part(part, family, key, path)
    module = canonical_module(part, module)
    if module not in modules.get(part, {}):
        raise LoraError(f"{path}: key {key}: the {part} has no module {module!r}; is this LoRA for another model?")
    return part, module


def _check_part(part: str, family: str, key: str, path: Path) -> None:
    if part == "text_encoder_2" and family != "sdxl":
        raise LoraError(f"{path}: key {key} is for a second text encoder: this LoRA is for SDXL, the model is "
                        f"{family.upper()}")


def _peft_alphas(metadata: Mapping[str, str]) -> dict[str, dict[str, object]]:
    """part -> {"lora_alpha": float | None, "alpha_pattern": {pattern: alpha}} from diffusers' metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    out: dict[str, dict[str, object]] = {}
    for key, value in data.items():
        part, _, name = key.partition(".")
        if name in ("lora_alpha", "alpha_pattern"):
            out.setdefault(part, {})[name] = value
    return out


def _alpha_for(part: str, module: str, rank: int, explicit: float | None, peft: dict[str, dict[str, object]]) -> float:
    if explicit is not None:
        return explicit
    info = peft.get(part, {})
    pattern = info.get("alpha_pattern") or {}
    if isinstance(pattern, dict):
        # PEFT names a text encoder's modules as the model does (`text_model.encoder...` in transformers 4);
        # ours drop `text_model.`: a pattern may be written against either name.
        names = [module] + ([f"text_model.{module}"] if part.startswith("text_encoder") else [])
        for regex, alpha in pattern.items():
            try:
                compiled = re.compile(rf"(.*\.)?(?:{regex})")
            except re.error as exc:
                raise LoraError(f"{part} alpha_pattern {regex!r} is not a regular expression ({exc})") from exc
            if any(compiled.fullmatch(name) for name in names):
                return float(alpha)
    alpha = info.get("lora_alpha")
    return float(alpha) if isinstance(alpha, (int, float)) else float(rank)


def lora_parts(path: Path | str) -> list[str]:
    """The model parts a LoRA file names (from its keys alone; `load_lora` checks the rest)."""
    tensors, _ = read_safetensors(Path(path))
    parts = set()
    for key in tensors:
        split = _split_key(key)
        if split is None:
            raise LoraError(f"{path}: key {key} is not a LoRA weight this reader knows")
        name, _, style = split
        if style == "kohya":
            parts.add(next(part for prefix, part in sorted(_KOHYA_PREFIXES.items(), key=lambda kv: -len(kv[0]))
                           if name.startswith(prefix)))
        else:
            part = name.partition(".")[0]
            if part not in LORA_PARTS:
                raise LoraError(f"{path}: key {key}: LoRAs may touch {', '.join(LORA_PARTS)}, not {part!r}")
            parts.add(part)
    return sorted(parts)


def load_lora(path: Path | str, family: str, modules: ModuleShapes) -> LoraFile:
    """Read and check a LoRA against a model's modules (part -> module path -> weight shape)."""
    path = Path(path)
    if not path.is_file():
        raise LoraError(f"LoRA file not found: {path}")
    tensors, metadata = read_safetensors(path)
    peft = _peft_alphas(metadata)
    tables = _kohya_tables(modules)
    pieces: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    keys: dict[tuple[str, str, str], str] = {}
    for key in sorted(tensors):
        split = _split_key(key)
        if split is None:
            raise LoraError(f"{path}: key {key} is not a LoRA weight this reader knows (expected lora_A/lora_B, "
                            "lora.down/lora.up or kohya lora_down/lora_up/alpha names)")
        name, role, style = split
        target = _resolve(name, style, family, modules, key, path, tables)
        if role in pieces.setdefault(target, {}):
            raise LoraError(f"{path}: key {key}: {target[0]} module {target[1]} has two {role} tensors")
        pieces[target][role] = tensors[key]
        keys[(*target, role)] = key
    if not pieces:
        raise LoraError(f"{path} holds no tensors")
    lora = LoraFile(path=path, sha256=sha256_of(path))
    for (part, module), roles in pieces.items():
        key = keys[(part, module, next(iter(roles)))]
        if "down" not in roles or "up" not in roles:
            raise LoraError(f"{path}: key {key}: {part} module {module} lacks its "
                            f"{'down (lora_A)' if 'down' not in roles else 'up (lora_B)'} weight")
        down, up = roles["down"], roles["up"]
        shape = tuple(modules[part][module])
        rank = int(down.shape[0]) if down.ndim else 0
        expected_down = (rank, shape[1], *shape[2:])
        expected_up = (shape[0], rank, *((1, 1) if len(shape) == 4 else ()))
        if down.ndim != len(shape) or tuple(down.shape) != expected_down or tuple(up.shape) != expected_up:
            key = keys[(part, module, "up" if tuple(down.shape) == expected_down else "down")]
            raise LoraError(
                f"{path}: key {key}: shapes down {tuple(down.shape)} / up {tuple(up.shape)} do not fit {part} "
                f"module {module} with weight {shape}; is this LoRA for another model?")
        explicit = float(roles["alpha"].reshape(-1)[0]) if "alpha" in roles else None
        alpha = _alpha_for(part, module, rank, explicit, peft)
        lora.layers[(part, module)] = LoraLayer(np.asarray(down), np.asarray(up), alpha)
    return lora


def merged_weight(base: np.ndarray, contributions: list[tuple[float, LoraLayer]]) -> np.ndarray:
    """`base + sum(deltas)` computed in float32 from the kept base value and rounded once to base's dtype.

    Always from the base, never from a previous merge: any sequence of swaps gives the same bits as
    applying the final set once, and an empty set gives back the base bit for bit."""
    if not contributions:
        return base
    total = base.astype(np.float32)
    for scale, layer in contributions:
        total += layer.delta(scale)
    return total.astype(base.dtype)


# --- bundles: weight maps, base values, run-time swaps ---------------------------------------------------

#: Version of the weight-map file written at export (onnx/<component>.weights.json).
WEIGHT_MAP_FORMAT = 1
Updates = dict[str, dict[str, "np.ndarray | None"]]


def weight_map_name(component: str) -> str:
    return f"{component}.weights.json"


@dataclass(frozen=True)
class Target:
    """An initializer of the exported graph that carries a module's weight (in `layout`)."""

    initializer: str
    layout: str  # "identity" | "transpose" (2-D: the graph holds weight.T)
    offset: int
    length: int
    shape: tuple[int, ...]


def _to_graph_layout(weight: np.ndarray, layout: str) -> np.ndarray:
    return np.ascontiguousarray(weight.T) if layout == "transpose" else np.ascontiguousarray(weight)


class BundleLoras:
    """Run-time LoRAs of one refittable bundle: the export-time weight maps, the kept base values of the
    weights touched so far, and the set applied now. `plan` computes what an executor must change.
    `lock` serializes swaps of every pipeline sharing this state (a pipeline and its forks)."""

    _creating = threading.Lock()

    @classmethod
    def shared(cls, holder: list[BundleLoras], path: Path, manifest: Mapping[str, object]) -> BundleLoras:
        """The state in `holder` (a list shared by a pipeline and its forks), created there on first use."""
        with cls._creating:
            if not holder:
                holder.append(cls(path, manifest))
            return holder[0]

    def __init__(self, path: Path, manifest: Mapping[str, object]) -> None:
        lora_info = manifest.get("lora") or {}
        if not isinstance(lora_info, dict) or not lora_info.get("refittable"):
            raise LoraError(f"{path} was not built refittable: rebuild it with `turbo-trt build --refittable` to swap "
                            "LoRAs at run time, or bake a LoRA in with `turbo-trt build --lora PATH[:SCALE]`")
        self.path = Path(path)
        self.family = str(manifest["model"]["family"])  # type: ignore[index]
        components = manifest["components"]
        assert isinstance(components, dict)
        self.maps: dict[str, dict[str, object]] = {}
        for part, component in PART_COMPONENT.items():
            entry = components.get(component)
            if entry is None:
                continue
            self.maps[part] = self._read_map(component, entry)
        self._base: dict[tuple[str, str], np.ndarray] = {}
        self.applied: dict[tuple[str, str], list[tuple[float, LoraLayer]]] = {}
        self.loras: dict[str, float] = {}
        # While a set is being applied: that set (current_weight answers for it). After a failed apply: the
        # modules whose weights may be half-changed, sent again in full by the next plan.
        self._pending: dict[tuple[str, str], list[tuple[float, LoraLayer]]] | None = None
        self._dirty: set[tuple[str, str]] = set()
        self.lock = threading.Lock()

    def _read_map(self, component: str, entry: Mapping[str, object]) -> dict[str, object]:
        rel = f"onnx/{weight_map_name(component)}"
        files = list(entry.get("onnx_files") or [])  # type: ignore[call-overload]
        if rel not in files:
            raise LoraError(f"{self.path}: {component} has no weight map ({rel}); rebuild with `turbo-trt build "
                            "--refittable`")
        digest = list(entry["onnx_file_sha256"])[files.index(rel)]  # type: ignore[call-overload]
        file = self.path / rel
        if not file.is_file() or sha256_of(file) != digest:
            raise LoraError(f"{self.path}: {rel} is missing or does not match the manifest; rebuild the bundle")
        data: dict[str, object] = json.loads(file.read_text())
        if data.get("format") != WEIGHT_MAP_FORMAT:
            raise LoraError(f"{file}: weight map format {data.get('format')!r}, this turbo-trt reads "
                            f"{WEIGHT_MAP_FORMAT}; rebuild the bundle")
        # Base values are read from the graph's data file (also on a GPU, where only engines were checked):
        # it must be there and long enough for every recorded offset.
        data_file = self.path / "onnx" / str(data.get("data_file"))
        spans = [t["offset"] + t["length"] for info in data["modules"].values() for t in info["targets"]]  # type: ignore[attr-defined]
        if not data_file.is_file() or data_file.stat().st_size < max(spans, default=0):
            raise LoraError(f"{self.path}: {data_file.name}, which holds {component}'s base weights, is missing or "
                            "truncated; rebuild the bundle")
        return data

    def module_shapes(self) -> dict[str, dict[str, tuple[int, ...]]]:
        out: dict[str, dict[str, tuple[int, ...]]] = {}
        for part, data in self.maps.items():
            modules = data["modules"]
            assert isinstance(modules, dict)
            out[part] = {name: tuple(info["shape"]) for name, info in modules.items()}
        return out

    def _targets(self, part: str, module: str) -> list[Target]:
        info = self.maps[part]["modules"][module]  # type: ignore[index]
        return [Target(t["initializer"], t["layout"], int(t["offset"]), int(t["length"]), tuple(t["shape"]))
                for t in info["targets"]]

    def base(self, part: str, module: str) -> np.ndarray:
        """The module's base weight (module layout), read once from the graph's data file and kept."""
        key = (part, module)
        if key not in self._base:
            target = self._targets(part, module)[0]
            data_file = self.path / "onnx" / str(self.maps[part]["data_file"])
            raw = np.fromfile(data_file, dtype=np.float16, count=target.length // 2, offset=target.offset)
            value = raw.reshape(target.shape)
            self._base[key] = np.ascontiguousarray(value.T) if target.layout == "transpose" else value
        return self._base[key]

    def current_weight(self, component: str, initializer: str) -> np.ndarray:
        """An initializer's value in the set being applied (between `begin` and `commit`; else the applied
        set): the merge of its LoRAs, or the base. In the graph's layout. For executors: the value of a
        None update (back to base), and of weights a refitter needs beyond the ones that change."""
        active = self._pending if self._pending is not None else self.applied
        part = next(p for p, c in PART_COMPONENT.items() if c == component)
        data = self.maps[part]
        for module, info in data["modules"].items():  # type: ignore[attr-defined]
            for t in info["targets"]:
                if t["initializer"] == initializer:
                    value = merged_weight(self.base(part, module), active.get((part, module), []))
                    return _to_graph_layout(value, t["layout"])
        other = data.get("other_initializers", {})
        assert isinstance(other, dict)
        if initializer in other:
            spec = other[initializer]
            data_file = self.path / "onnx" / str(data["data_file"])
            raw = np.fromfile(data_file, dtype=np.dtype(spec["dtype"]), count=int(np.prod(spec["shape"])),
                              offset=int(spec["offset"]))
            return raw.reshape(spec["shape"])
        raise LoraError(f"{self.path}: {component} has no initializer {initializer!r} in its weight map")

    def load(self, loras: Mapping[str | Path, float]) -> dict[tuple[str, str], list[tuple[float, LoraLayer]]]:
        """Read and check every LoRA (nothing is changed on error); (part, module) -> [(scale, layer)]."""
        shapes = self.module_shapes()
        wanted: dict[tuple[str, str], list[tuple[float, LoraLayer]]] = {}
        absent: dict[str, list[str]] = {}
        for source, scale in loras.items():
            scale = check_scale(scale, source)
            lora = load_lora(Path(source), self.family, shapes)
            for (part, module), layer in lora.layers.items():
                info = self.maps[part]["modules"][module]  # type: ignore[index]
                if info.get("unmapped"):
                    raise LoraError(f"{source}: {part} module {module} cannot be refitted ({info['unmapped']}); "
                                    "bake this LoRA in with `turbo-trt build --lora` instead")
                if not info["targets"]:
                    absent.setdefault(str(source), []).append(f"{part} {module}")
                    continue
                wanted.setdefault((part, module), []).append((float(scale), layer))
        for source, names in absent.items():
            warnings.warn(
                f"LoRA {source}: {len(names)} module(s) have no weight in the exported graph and are not applied: "
                f"{', '.join(names)}. The exporter found no initializer holding their base weight: usually it "
                "pruned them as unused by the graph (e.g. a text encoder layer after the hidden state the model "
                "reads), and then they change no image (a baked-in bundle skips them too); if they are used, this "
                "bundle cannot swap them: bake the LoRA in with `turbo-trt build --lora`.",
                LoraWarning, stacklevel=3)
        return wanted

    def plan(self, wanted: dict[tuple[str, str], list[tuple[float, LoraLayer]]]) -> Updates:
        """component -> {initializer: new value, or None for back to base} for every initializer whose
        value changes from the applied set to `wanted`."""
        from concurrent.futures import ThreadPoolExecutor

        keys = sorted(set(wanted) | set(self.applied) | self._dirty)
        for key in keys:
            if key in wanted:
                self.base(*key)  # read base values here, in order (file reads), before the parallel merge

        def values(key: tuple[str, str]) -> list[tuple[str, np.ndarray | None]]:
            part, module = key
            value = merged_weight(self.base(part, module), wanted[key]) if key in wanted else None
            return [(t.initializer, None if value is None else _to_graph_layout(value, t.layout))
                    for t in self._targets(part, module)]

        # numpy releases the GIL in matmul, add and the FP16 casts: merge the weights on every core
        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            merged = list(pool.map(values, keys))
        updates: Updates = {}
        for (part, _), pairs in zip(keys, merged):
            for initializer, value in pairs:
                updates.setdefault(PART_COMPONENT[part], {})[initializer] = value
        return updates

    def begin(self, wanted: dict[tuple[str, str], list[tuple[float, LoraLayer]]]) -> None:
        """`wanted` is being applied: current_weight now answers for it."""
        self._pending = wanted

    def commit(self, loras: Mapping[str | Path, float],
               wanted: dict[tuple[str, str], list[tuple[float, LoraLayer]]]) -> None:
        self.applied = wanted
        self.loras = {str(k): float(v) for k, v in loras.items()}
        self._pending = None
        self._dirty = set()

    def failed(self, wanted: dict[tuple[str, str], list[tuple[float, LoraLayer]]]) -> None:
        """Applying `wanted` failed part-way: the next plan re-sends every weight either set touches."""
        self._dirty |= set(wanted) | set(self.applied)
        self._pending = None
