"""A dependency-free progress line for long steps (export, validation, engine builds)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    """Prints `label [#####.....] 3/6 phase` on one line when attached to a terminal, plain lines otherwise."""

    def __init__(self, stream: TextIO | None = None, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = hasattr(self.stream, "isatty") and self.stream.isatty()
        self._last = 0.0

    def info(self, message: str) -> None:
        if self.enabled:
            self._clear()
            print(message, file=self.stream, flush=True)

    def bar(self, label: str, done: int, total: int, detail: str = "") -> None:
        if not self.enabled or not self.tty:
            return
        now = time.monotonic()
        if done < total and now - self._last < 0.1:
            return
        self._last = now
        width = 24
        filled = int(width * done / total) if total else width
        line = f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total} {detail}"[:120]
        self.stream.write(line.ljust(120))
        self.stream.flush()

    def _clear(self) -> None:
        if self.tty:
            self.stream.write("\r" + " " * 120 + "\r")
