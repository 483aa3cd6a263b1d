"""Peak host memory of a phase (Linux): reset the process's resident-set high-water mark, run the phase,
read the mark. Writing 5 to /proc/self/clear_refs resets VmHWM (Linux >= 4.0), so the figure is the
phase's own peak, not the process's peak so far."""

from __future__ import annotations

from pathlib import Path


def reset_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def peak_mib() -> float | None:
    """VmHWM of this process in MiB, or None where /proc is not there."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None
