"""File helpers: atomic writes, hashing, and the bundle lock.

Every file of a bundle is written under a temporary name in the same directory and renamed into place, so
a build killed at any moment never leaves a partial file under a final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .errors import BundleError

_CHUNK = 4 << 20


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(value: Any) -> str:
    """Hex sha256 of a JSON-serializable value (keys sorted, so dict order does not matter)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@contextlib.contextmanager
def atomic_path(final: Path) -> Iterator[Path]:
    """Yield a temporary path beside `final`; rename it onto `final` only if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; bundles are ordinary shared files
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def public_dir(path: Path) -> None:
    """Give a mkdtemp() folder (0700) the permissions of an ordinary folder."""
    os.chmod(path, 0o777 & ~_umask())


def atomic_write_bytes(final: Path, data: bytes | memoryview) -> None:
    try:
        with atomic_path(final) as tmp:
            tmp.write_bytes(data)
    except OSError as exc:
        raise BundleError(f"could not write {final}: {exc.strerror or exc}") from exc


def atomic_write_json(final: Path, value: Any) -> None:
    atomic_write_bytes(final, (json.dumps(value, indent=2, sort_keys=False) + "\n").encode())


def atomic_copy(src: Path, final: Path) -> None:
    try:
        with atomic_path(final) as tmp:
            shutil.copyfile(src, tmp)
    except OSError as exc:
        raise BundleError(f"could not copy {src} to {final}: {exc.strerror or exc}") from exc


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete temporaries a killed build left behind (names start with '.' and end with '.tmp')."""
    removed = []
    if directory.is_dir():
        for path in directory.rglob(".*.tmp"):
            if path.is_file():
                path.unlink(missing_ok=True)
                removed.append(path)
            elif path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
                removed.append(path)
    return removed


class BundleLock:
    """An exclusive, non-blocking lock on a bundle directory (fcntl.flock on `<dir>/.lock`).

    The OS drops the lock when the holder dies, so a killed build never leaves a stale lock behind.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> BundleLock:
        import fcntl

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise BundleError(f"cannot create the bundle directory {self.path.parent}: {exc.strerror or exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise BundleError(
                f"another build is writing {self.path.parent} (lock held by pid {holder}); "
                "wait for it to finish"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB (Linux ru_maxrss is in KiB)."""
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
