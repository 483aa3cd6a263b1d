"""TensorRT-RTX's runtime (JIT) cache, kept beside a bundle's engines so a second process starts warm.

TensorRT-RTX compiles kernels for the GPU at hand when an execution context first runs; its runtime cache
holds those kernels. The cache is only valid for one GPU model, driver major and TensorRT-RTX version
(`IRuntimeCache.deserialize` checks and refuses a mismatch), so the file is named after the GPU and version:
`runtime_cache/<gpu>-<version>.bin` inside the bundle. It is not part of the manifest and never verified by
sha256: it is a cache that TensorRT-RTX itself validates, rebuilt whenever it is missing or refused.

Several processes may share a bundle: a reader takes a shared lock, a writer an exclusive one and writes
temp + rename, so a reader sees either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import contextlib
import fcntl
import re
from collections.abc import Iterator
from pathlib import Path

from turbo_trt.fsutil import atomic_write_bytes

DIRECTORY = "runtime_cache"


def cache_path(bundle_dir: Path, gpu_name: str, flavor_version: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.]+", "-", f"{gpu_name}-{flavor_version}").strip("-").lower() or "gpu"
    return bundle_dir / DIRECTORY / f"{slug}.bin"


@contextlib.contextmanager
def _locked(path: Path, exclusive: bool) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(path.name + ".lock"), "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def read_cache(path: Path) -> bytes | None:
    """The cache's bytes, or None when there is none yet (or the bundle directory is read-only and has none)."""
    if not path.is_file():
        return None
    try:
        with _locked(path, exclusive=False):
            return path.read_bytes()
    except OSError:  # a read-only bundle: no lock file can be made, and no writer can be there either
        try:
            return path.read_bytes()
        except OSError:
            return None


def write_cache(path: Path, data: bytes) -> bool:
    """Replace the cache atomically; False (not an error) when the bundle directory is not writable."""
    try:
        with _locked(path, exclusive=True):
            atomic_write_bytes(path, data)
    except OSError:
        return False
    return True
