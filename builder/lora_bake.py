"""`turbo-trt build --lora PATH_OR_ID[:SCALE]`: LoRAs fused into the pipeline's weights before export.

Resolution (in the parent build process, cheap): a local .safetensors file, or a hub id `owner/name` (its
one .safetensors file) or `owner/name/file.safetensors`; each LoRA's sha256 and the parts it touches go
into the fingerprints of exactly those parts' components, so a changed LoRA or scale re-exports only them.

Fusing (in the export child, on the loaded FP32 pipeline): each touched weight becomes
`fp16(fp16(W) + sum(scale * alpha / rank * up @ down))`, the value diffusers' `load_lora_weights` +
`fuse_lora` give, rounded as the FP16 graph stores it. The math is the run-time swap's (runner/lora.py), so a
baked-in bundle and a refittable bundle with the same LoRAs swapped in hold the same bits.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from turbo_trt.fsutil import sha256_json
from turbo_trt.progress import Progress
from turbo_trt.runner.lora import (
    LORA_PARTS,
    LoraError,
    LoraLayer,
    canonical_module,
    check_scale,
    load_lora,
    lora_parts,
    merged_weight,
    sha256_of,
)

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/[\w./-]+\.safetensors)?$")


def resolve_lora(source: str, cache_dir: Path | None = None) -> Path:
    """A local LoRA file, or one downloaded from the hub; LoraError says what was tried."""
    path = Path(source).expanduser()
    if path.is_file():
        return path.resolve()
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if len(files) == 1:
            return files[0].resolve()
        raise LoraError(f"--lora {source}: the directory holds {len(files)} .safetensors files; name one")
    if source.startswith((".", "/", "~")) or not _HUB_ID.match(source):
        raise LoraError(f"--lora {source}: no such file, and not a hub id (owner/name[/file.safetensors])")
    parts = source.split("/")
    repo, filename = "/".join(parts[:2]), "/".join(parts[2:]) or None
    try:
        from huggingface_hub import HfApi, hf_hub_download

        if filename is None:
            names = [s.rfilename for s in HfApi().model_info(repo, timeout=30).siblings or []
                     if s.rfilename.endswith(".safetensors")]
            if len(names) != 1:
                raise LoraError(f"--lora {source}: the hub repo has {len(names)} .safetensors files ({', '.join(names)}); "
                                f"name one as {repo}/FILE.safetensors")
            filename = names[0]
        return Path(hf_hub_download(repo, filename, cache_dir=cache_dir))
    except LoraError:
        raise
    except Exception as exc:  # noqa: BLE001  offline, not found, gated: one clear message
        raise LoraError(f"--lora {source}: not a local file and could not be fetched from the Hugging Face Hub "
                        f"({type(exc).__name__}: {exc})") from exc


def resolve_baked_loras(loras: tuple[tuple[str, float], ...]) -> list[dict[str, Any]]:
    """The manifest's record of each LoRA to bake: source, resolved file, sha256, scale, parts touched."""
    out = []
    for source, scale in loras:
        scale = check_scale(scale, source)
        path = resolve_lora(source)
        out.append({"source": source, "file": str(path), "sha256": sha256_of(path), "scale": float(scale),
                    "parts": lora_parts(path)})
    return out


def lora_part_fingerprints(parts: dict[str, str], baked: list[dict[str, Any]]) -> dict[str, str]:
    """Part fingerprints with the baked LoRAs mixed into the parts they touch (the others unchanged)."""
    out = dict(parts)
    for part in LORA_PARTS:
        touching = [{"sha256": b["sha256"], "scale": b["scale"]} for b in baked if part in b["parts"]]
        if touching and part in out:
            out[part] = sha256_json({"base": parts[part], "loras": touching})
    return out


def module_shapes(pipe: Any) -> dict[str, dict[str, tuple[int, ...]]]:
    """part -> module path -> weight shape of every Linear / Conv of the LoRA-touchable parts."""
    import torch

    out: dict[str, dict[str, tuple[int, ...]]] = {}
    for part in LORA_PARTS:
        model = getattr(pipe, part, None)
        if model is None:
            continue
        out[part] = {canonical_module(part, name): tuple(sub.weight.shape) for name, sub in model.named_modules()
                     if isinstance(sub, (torch.nn.Linear, torch.nn.Conv2d))}
    return out


def bake_loras(pipe: Any, baked: list[dict[str, Any]], family: str, progress: Progress) -> None:
    """Fuse the LoRAs into `pipe` in place (every LoRA is read and checked before any weight changes)."""
    if not baked:
        return
    import numpy as np
    import torch

    shapes = module_shapes(pipe)
    wanted: dict[tuple[str, str], list[tuple[float, LoraLayer]]] = {}
    for entry in baked:
        lora = load_lora(Path(entry["file"]), family, shapes)
        if lora.sha256 != entry["sha256"]:
            raise LoraError(f"--lora {entry['source']} changed during the build; run it again")
        for key, layer in lora.layers.items():
            wanted.setdefault(key, []).append((entry["scale"], layer))
    modules = {part: {canonical_module(part, name): sub for name, sub in getattr(pipe, part).named_modules()}
               for part in {part for part, _ in wanted}}
    with torch.no_grad():
        for (part, name), contributions in wanted.items():
            weight = modules[part][name].weight
            base = weight.detach().to(torch.float16).cpu().numpy()
            merged = merged_weight(base, contributions).astype(np.float32)
            weight.copy_(torch.from_numpy(merged).to(weight.dtype))
    progress.info(f"baked {len(baked)} LoRA(s) into {len(wanted)} weights of "
                  f"{', '.join(sorted({part for part, _ in wanted}))}")
