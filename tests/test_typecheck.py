"""The TensorRT code path, type-checked against each flavor's API.

Full TensorRT cannot be installed here, so its API comes from `tensorrt-stubs`. Those stubs are generated
by pybind11-stubgen and have two syntax slips: a parameter named `in`, and a default-less parameter after
defaulted ones. The test copies them, mends just those, then runs mypy on the modules that speak the
TensorRT API.

TensorRT-RTX is installed, so mypy's stubgen reads its real module. The code's common-API annotations
(`import tensorrt as trt_api`) are then checked once more against those stubs, presented as `tensorrt`."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHECKED = ["builder/engine.py", "turbo_trt/flavors.py", "runner/executors/tensorrt.py", "runner/executors/tensorrt_engines.py",
           "runner/executors/tensorrt_layout.py", "runner/cuda.py"]


def _stubs(tmp_path: Path) -> Path:
    spec = importlib.util.find_spec("tensorrt_stubs")
    if spec is None or spec.origin is None:
        pytest.fail("tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs (see .ci/run)")
    site = Path(spec.origin).parent.parent
    out = tmp_path / "stubs"
    for name in ("tensorrt", "tensorrt_bindings"):
        shutil.copytree(site / name, out / name)
    stub = out / "tensorrt_bindings" / "tensorrt.pyi"
    text = stub.read_text()
    text = re.sub(r"(?m)^(\s*def .*?)\bin:", r"\1in_:", text)
    text = re.sub(r"(?m)^(\s*def add_scale_nd\(.*channel_axis: int)\)", r"\1 = ...)", text)
    stub.write_text(text)
    return out


def _mypy(stubs: Path, files: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MYPYPATH": str(stubs)}
    return subprocess.run([sys.executable, "-m", "mypy", "--no-incremental", "--follow-imports=silent", *files],
                          capture_output=True, text=True, cwd=ROOT, env=env)


def test_tensorrt_code_path_type_checks(tmp_path: Path):
    done = _mypy(_stubs(tmp_path), CHECKED)
    assert done.returncode == 0, done.stdout + done.stderr


def _mypy_on_misspelt_engine_py(stubs: Path, tmp_path: Path, right: str, wrong: str) -> subprocess.CompletedProcess[str]:
    """mypy on a copy of builder/engine.py with one TensorRT API use misspelt."""
    source = (ROOT / "builder" / "engine.py").read_text()
    assert right in source
    bad = tmp_path / "engine_bad.py"
    bad.write_text(source.replace(right, wrong))
    return _mypy(stubs, [str(bad)])


def test_type_check_catches_api_misuse(tmp_path: Path):
    """The check has teeth: a misspelt TensorRT attribute in a copy of engine.py is reported."""
    done = _mypy_on_misspelt_engine_py(_stubs(tmp_path), tmp_path, "config.builder_optimization_level",
                                       "config.builder_optimisation_level")
    assert done.returncode != 0 and "builder_optimisation_level" in done.stdout


def _rtx_stubs(tmp_path: Path) -> Path:
    """Stubs of the installed tensorrt_rtx bindings, generated now from the module itself, as `tensorrt`."""
    out = tmp_path / "rtx"
    done = subprocess.run([sys.executable, "-c", "import sys; from mypy.stubgen import main; main(sys.argv[1:])",
                           "-p", "tensorrt_rtx_bindings", "-o", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = (out / "tensorrt_rtx_bindings" / "tensorrt_rtx.pyi").read_text()
    text = text.replace("tensorrt_rtx_bindings.tensorrt_rtx", "tensorrt").replace("tensorrt_rtx_bindings", "tensorrt")
    # stubgen's two gaps: the same default-less parameter slip, and IHostMemory's buffer protocol.
    text = re.sub(r"(channel_axis: typing.SupportsInt)\)", r"\1 = ...)", text)
    buffer = "    def __buffer__(self, flags: int, /) -> memoryview: ...\n"
    text = text.replace("class IHostMemory:\n", "class IHostMemory:\n" + buffer)
    (out / "tensorrt").mkdir()
    (out / "tensorrt" / "__init__.pyi").write_text(text)
    shutil.rmtree(out / "tensorrt_rtx_bindings")
    return out


def test_tensorrt_rtx_api_type_checks(tmp_path: Path):
    stubs = _rtx_stubs(tmp_path)
    assert "def is_stream_capturable" in (stubs / "tensorrt" / "__init__.pyi").read_text()
    done = _mypy(stubs, CHECKED)
    assert done.returncode == 0, done.stdout + done.stderr
    done = _mypy_on_misspelt_engine_py(stubs, tmp_path, "parser.parse_from_file(", "parser.parse_file(")
    assert done.returncode != 0 and '"OnnxParser" has no attribute "parse_file"' in done.stdout


def test_whole_package_type_checks(tmp_path: Path):
    done = _mypy(_stubs(tmp_path), ["turbo_trt", "builder", "runner", "benchmarks"])
    assert done.returncode == 0, done.stdout + done.stderr
