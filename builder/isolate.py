"""Run a heavy build step in a fresh child process.

The export stage holds a whole pipeline and peaks near 20 GB for SDXL (its UNet export), and glibc does not
hand freed heap back to the OS; a TensorRT-RTX build of the SDXL UNet peaks near 17 GB on its own. In one
process the two ran a 24 GB machine out of memory. In children, each step starts clean and a child's death
is reported as an error instead of taking the whole build with it. Children die with the parent
(PR_SET_PDEATHSIG on Linux), so a killed build leaves no orphan writing into the bundle.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

from turbo_trt.errors import TurboTrtError

T = TypeVar("T")


def _die_with_parent() -> None:
    try:
        import ctypes
        import signal

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux/glibc: children then outlive a killed parent
        pass


def run_isolated(what: str, fn: Callable[..., T], *args: Any) -> T:
    """`fn(*args)` in a spawned child; its exceptions come back as they are (TurboTrtErrors included)."""
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context, initializer=_die_with_parent) as pool:
        future = pool.submit(fn, *args)
        try:
            return future.result()
        except BrokenProcessPool as exc:
            raise TurboTrtError(
                f"the process {what} died (out of memory?); free memory and run the build again: "
                "finished steps are kept"
            ) from exc
