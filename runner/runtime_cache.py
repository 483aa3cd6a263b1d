"""TensorRT-RTX's runtime (JIT) cache, kept beside a bundle's engines so a second process starts warm.

TensorRT-RTX compiles kernels for the GPU at hand when an execution context first runs; its runtime cache
holds those kernels. The cache is only valid for one GPU model, driver major and TensorRT-RTX version
(`IRuntimeCache.deserialize` checks and refuses a mismatch), so the file is named after the GPU and version:
`runtime_cache/<gpu>-<version>.bin` inside the bundle. It is not part of the manifest and never verified by
sha256: it is a cache that TensorRT-RTX itself validates, rebuilt whenever it is missing or refused.

Several processes may share a bundle: a reader takes a shared lock, a writer an exclusive one and writes
temp + rename, so a reader sees either the old file or the new one, never a torn one.

Within a process, `RuntimeCacheFile` is what an EngineSet saves through: the cache is serialized while no
context runs (the engines' readers-writer lock held exclusive: forks in other threads may be compiling
kernels into the same cache), and the file is written only when the serialized bytes differ from what was
loaded or last written (a sha256 is kept), so closing executors and repeated saves rewrite nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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


class RuntimeCacheFile:
    """One process's view of a bundle's runtime-cache file: load once, save only what changed.

    `save(serialize, exclusive)` calls `serialize()` inside `exclusive` (a context manager that keeps every
    context of the engines from running), then writes the bytes atomically under the file lock unless they
    equal what was loaded or last written. `mark_changed()` records that kernels were compiled, for a later
    `save_if_changed` from a place that holds no image lock."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.digest: str | None = None  # sha256 of the bytes loaded or last written
        self.writes = 0  # files written by this object
        self.pending = False  # kernels compiled since the last save
        self._lock = threading.Lock()  # one save at a time within the process

    def load(self) -> bytes | None:
        data = read_cache(self.path)
        self.digest = hashlib.sha256(data).hexdigest() if data else None
        return data

    def accepted(self, serialize: Callable[[], Any]) -> None:
        """The loaded bytes were deserialized: the digest becomes that of `serialize()` now (TensorRT-RTX may
        serialize an equal cache to other bytes than the file's), so a save with nothing compiled since
        rewrites nothing."""
        blob = serialize()
        data = bytes(memoryview(blob)) if blob is not None else b""
        self.digest = hashlib.sha256(data).hexdigest() if data else self.digest

    def mark_changed(self) -> None:
        self.pending = True

    def save(self, serialize: Callable[[], Any], exclusive: contextlib.AbstractContextManager[Any]) -> bool:
        """True when the file holds the current cache afterwards (written now, or unchanged); False when there
        was nothing to serialize or the bundle directory is not writable."""
        with self._lock:
            with exclusive:
                self.pending = False
                blob = serialize()
                data = bytes(memoryview(blob)) if blob is not None else b""
            if not data:
                return False
            digest = hashlib.sha256(data).hexdigest()
            if digest == self.digest:
                return True
            if not write_cache(self.path, data):
                return False
            self.digest = digest
            self.writes += 1
            return True

    def save_if_changed(self, serialize: Callable[[], Any],
                        exclusive: contextlib.AbstractContextManager[Any]) -> bool:
        return self.save(serialize, exclusive) if self.pending else False
