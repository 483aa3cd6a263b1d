"""The bundle manifest: the contract between the builder and the runner.

A bundle directory holds `manifest.json`, `onnx/<component>.onnx` (+ external data), `<component>.plan`
and the tokenizer folders. The manifest is plain JSON; this module names its keys, checks its shape and
reads/writes it atomically. See README.md ("The bundle") for the schema in prose.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import BundleError
from .fsutil import atomic_write_json

SCHEMA_VERSION = 1
MANIFEST_NAME = "manifest.json"

#: Top-level keys every complete manifest has.
REQUIRED_KEYS = ("schema_version", "model", "shapes", "scheduler", "vae", "tokenizers", "components")
#: Keys of a component entry once its ONNX graph is exported and validated.
COMPONENT_ONNX_KEYS = ("onnx", "onnx_sha256", "onnx_fingerprint", "inputs", "outputs", "precision", "validation")
#: Keys added once the component's engine is built.
COMPONENT_ENGINE_KEYS = ("engine", "engine_sha256", "engine_fingerprint", "build_seconds")


def manifest_path(bundle: Path) -> Path:
    return bundle / MANIFEST_NAME


def read_manifest(bundle: Path) -> dict[str, Any]:
    """Read and check a bundle's manifest; raise BundleError saying exactly what is wrong."""
    path = manifest_path(bundle)
    if not path.is_file():
        raise BundleError(f"{bundle} is not a turbo-trt bundle: {MANIFEST_NAME} is missing")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not readable JSON: {exc}") from exc
    check_manifest(data, path)
    return data


def read_manifest_or_none(bundle: Path) -> dict[str, Any] | None:
    """The manifest if present and well-formed, else None (a build then starts afresh)."""
    try:
        return read_manifest(bundle)
    except BundleError:
        return None


def check_manifest(data: Any, where: Path | str = MANIFEST_NAME) -> None:
    if not isinstance(data, dict):
        raise BundleError(f"{where}: expected a JSON object")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise BundleError(
            f"{where}: schema version {version!r}, this turbo-trt reads {SCHEMA_VERSION}; rebuild the bundle"
        )
    missing = [key for key in REQUIRED_KEYS if key not in data]
    if missing:
        raise BundleError(f"{where}: missing keys {', '.join(missing)}")
    if not isinstance(data["components"], dict):
        raise BundleError(f"{where}: 'components' must be an object")
    for name, entry in data["components"].items():
        absent = [key for key in COMPONENT_ONNX_KEYS if key not in entry]
        if absent:
            raise BundleError(f"{where}: component {name} lacks {', '.join(absent)}")


def write_manifest(bundle: Path, data: dict[str, Any]) -> None:
    data["schema_version"] = SCHEMA_VERSION
    atomic_write_json(manifest_path(bundle), data)
