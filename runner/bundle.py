"""Open a bundle and check it before anything is deserialized: manifest schema, components present,
every file's sha256, and (for engines) flavor, version and GPU compute capability."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from turbo_trt.errors import BundleError, FlavorError
from turbo_trt.fsutil import sha256_file
from turbo_trt.io_contract import EMBEDDING_FEEDS, ENCODERS, check_io, manifest_io
from turbo_trt.manifest import read_manifest

REQUIRED = {"sd": ("text_encoder", "unet", "vae_decoder"),
            "sdxl": ("text_encoder", "text_encoder_2", "unet", "vae_decoder")}
__all__ = ["EMBEDDING_FEEDS", "ENCODERS", "Bundle", "check_engine_compatibility", "open_bundle"]


@dataclass(frozen=True)
class Bundle:
    path: Path
    manifest: dict[str, Any]

    @property
    def family(self) -> str:
        return str(self.manifest["model"]["family"])

    @property
    def shapes(self) -> dict[str, int]:
        return dict(self.manifest["shapes"])

    @property
    def encoders(self) -> tuple[str, ...]:
        return ENCODERS[self.family]

    @property
    def img2img(self) -> bool:
        return "vae_encoder" in self.manifest["components"]

    def component(self, name: str) -> dict[str, Any]:
        return dict(self.manifest["components"][name])

    def components(self) -> list[str]:
        return list(self.manifest["components"])


def require_bundle_dir(path: Path | str) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise BundleError(f"{root} is not a directory; build one with `turbo-trt build --model ...`")
    return root


def open_bundle(path: Path | str, files: str = "onnx", verify: bool = True) -> Bundle:
    """Read the manifest and check the files an executor will load (`files`: "onnx" or "engine").

    With verify=True every such file's sha256 is compared with the manifest, so a truncated, replaced or
    bit-flipped file is reported by name before it reaches ONNX Runtime or TensorRT.
    """
    root = require_bundle_dir(path)
    manifest = read_manifest(root)
    family = manifest["model"].get("family")
    if family not in REQUIRED:
        raise BundleError(f"{root}: unknown model family {family!r} in the manifest")
    components = manifest["components"]
    missing = [name for name in REQUIRED[family] if name not in components]
    if missing:
        raise BundleError(f"{root}: the bundle lacks {', '.join(missing)}; finish it with `turbo-trt build`")
    for encoder in ENCODERS[family]:
        info = manifest["tokenizers"].get(encoder)
        if not info or not (root / info["file"]).is_file():
            raise BundleError(f"{root}: tokenizer file for {encoder} is missing")
    key_files, key_hashes = ("onnx_files", "onnx_file_sha256") if files == "onnx" else ("engine_files", "engine_file_sha256")
    for name, entry in components.items():
        names, hashes = entry.get(key_files), entry.get(key_hashes)
        if not names:
            what = "engine" if files == "engine" else "ONNX graph"
            raise BundleError(f"{root}: {name} has no {what} in the manifest"
                              + ("; build engines with `turbo-trt build` (without --onnx-only)" if files == "engine" else ""))
        for rel, digest in zip(names, hashes):
            file = root / rel
            if not file.is_file():
                raise BundleError(f"{root}: {rel} is missing (component {name})")
            if verify:
                actual = sha256_file(file)
                if actual != digest:
                    raise BundleError(
                        f"{root}: {rel} does not match the manifest (sha256 {actual[:12]}... != {digest[:12]}...): "
                        "the file is corrupted or was replaced; rebuild with `turbo-trt build`"
                    )
    check_io(manifest_io(components), family, manifest["shapes"], "vae_encoder" in components,
             f"{root}/manifest.json")
    return Bundle(root, manifest)


def check_engine_compatibility(bundle: Bundle, flavor_name: str, flavor_version: str, gpu: dict[str, Any] | None,
                               strict_targets: bool = True) -> None:
    """Raise FlavorError saying exactly what differs between the build and this machine.

    strict_targets=False turns a compute-capability mismatch into a warning (to try, say, TensorRT-RTX
    engines on a GPU outside their documented targets); flavor and version must always match."""
    engine = bundle.manifest.get("engine") or {}
    built_flavor, built_version = engine.get("flavor"), engine.get("version")
    if built_flavor != flavor_name:
        raise FlavorError(f"{bundle.path}: engines were built with {built_flavor}, but {flavor_name} is loaded; "
                          f"install {built_flavor} or rebuild with --flavor {flavor_name}")
    if built_version != flavor_version:
        raise FlavorError(f"{bundle.path}: engines were built with {built_flavor} {built_version}, but "
                          f"{flavor_version} is installed; TensorRT engines only load in the version that built "
                          "them: rebuild the bundle")
    if gpu is None:
        raise FlavorError("no NVIDIA GPU is available to run TensorRT engines; use --executor onnxruntime")
    have = str(gpu["compute_capability"])
    targets = [str(t) for t in engine.get("targets", [])]
    build_gpu = engine.get("build_gpu") or {}
    if "current" in targets:
        targets = [t for t in targets if t != "current"] + ([str(build_gpu["compute_capability"])] if build_gpu else [])
    if have not in targets:
        where = f"built for compute capability {', '.join(targets) or 'unknown'}"
        if build_gpu:
            where += f" on {build_gpu.get('name')}"
        message = (f"{bundle.path}: engines were {where}; this GPU ({gpu.get('name')}) is {have}: "
                   "rebuild on this GPU" + (" or with --targets " + have if flavor_name == "tensorrt-rtx" else ""))
        if strict_targets:
            raise FlavorError(message)
        warnings.warn(message + " (trying anyway)", RuntimeWarning, stacklevel=3)

