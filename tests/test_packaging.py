"""A regular (non-editable) install carries every module and data file of the source tree.

The folders builder/, runner/ and benchmarks/ are mapped to turbo_trt.* by setuptools' package-dir, and
an editable install (what the other tests run on) resolves them from the tree, so a subpackage missing
from pyproject's list would only break `pip install .`. This test installs the project for real into a
temporary target and imports every module from there.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MAPPED = {"turbo_trt": ROOT / "turbo_trt", "turbo_trt.builder": ROOT / "builder",
          "turbo_trt.runner": ROOT / "runner", "turbo_trt.benchmarks": ROOT / "benchmarks"}


def _source_modules() -> list[str]:
    modules = []
    for package, folder in MAPPED.items():
        for file in sorted(folder.rglob("*.py")):
            if "__pycache__" in file.parts or "results" in file.relative_to(folder).parts:
                continue
            parts = list(file.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules.append(".".join([package, *parts]))
    return modules


def test_regular_install_has_every_module_and_config(tmp_path):
    target = tmp_path / "site"
    # From a copy of the sources: setuptools would otherwise reuse a stale build/ folder of the tree.
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*_cache", "engines", ".wh*", ".site", ".wheels"))
    # Offline with the environment's own setuptools where it has one (Python 3.12+ venvs do not).
    offline = ["--no-build-isolation", "--no-index"] if importlib.util.find_spec("setuptools") else []
    done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", *offline,
                           "--target", str(target), str(source)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    modules = _source_modules()
    assert "turbo_trt.runner.executors.tensorrt" in modules and len(modules) > 40
    installed = target / "turbo_trt"
    missing = []
    for module in modules:
        relative = Path(*module.split(".")[1:])
        if not ((installed / relative).with_suffix(".py").is_file() or (installed / relative / "__init__.py").is_file()):
            missing.append(module)
    assert missing == []
    configs = sorted(p.relative_to(ROOT / "builder") for p in (ROOT / "builder" / "configs").rglob("*.json"))
    assert configs and all((installed / "builder" / c).is_file() for c in configs)
    page = sorted(p.relative_to(ROOT / "runner") for p in (ROOT / "runner" / "live" / "static").iterdir())
    assert len(page) >= 3 and all((installed / "runner" / f).is_file() for f in page)  # the live page
    # The tiny presets' trained weights (safetensors, configs, training.json) ship too.
    weights = sorted(p.relative_to(ROOT / "builder") for p in (ROOT / "builder" / "tiny_weights").rglob("*")
                     if p.is_file())
    assert any(w.suffix == ".safetensors" for w in weights) and all((installed / "builder" / w).is_file() for w in weights)
    # Import from the installed copy (not the tree): run elsewhere, with the target first on the path.
    code = ("import importlib, sys; mods = sys.argv[1:]; files = [importlib.import_module(m).__file__ for m in mods];"
            f"bad = [f for f in files if not f.startswith({str(target)!r})]; print(len(files), bad)")
    light = [m for m in modules if m.split(".")[1:2] not in (["builder"], ["benchmarks"])]  # no torch needed
    done = subprocess.run([sys.executable, "-c", code, *light], capture_output=True, text=True, cwd=tmp_path,
                          env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"{len(light)} []"
