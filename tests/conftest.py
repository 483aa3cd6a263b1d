"""Shared fixtures: tiny bundles built once per test session (real export, real TensorRT-RTX builds)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from turbo_trt.builder.build import BuildReport, build
from turbo_trt.builder.options import BuildOptions
from turbo_trt.progress import Progress

#: Tiny presets at 64x64 (latents 8x8) keep each CPU build near a minute.
TINY_SIZE = 64


def tiny_options(model: str, out: Path, **overrides: object) -> BuildOptions:
    fields: dict[str, object] = dict(model=model, out=out, height=TINY_SIZE, width=TINY_SIZE,
                                     flavor="tensorrt-rtx")
    fields.update(overrides)
    return BuildOptions(**fields)  # type: ignore[arg-type]


def quiet_build(opts: BuildOptions) -> BuildReport:
    return build(opts, Progress(enabled=False))


@pytest.fixture(scope="session")
def sd_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildReport]:
    out = tmp_path_factory.mktemp("bundles") / "tiny-sd-turbo"
    return out, quiet_build(tiny_options("tiny-sd-turbo", out))


@pytest.fixture(scope="session")
def sdxl_bundle(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, BuildReport]:
    out = tmp_path_factory.mktemp("bundles") / "tiny-sdxl-turbo"
    return out, quiet_build(tiny_options("tiny-sdxl-turbo", out))


@pytest.fixture(scope="session")
def refit_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD-Turbo with refittable ONNX graphs (weights in external data, with weight maps), no engines:
    run-time LoRAs (test_lora.py), and a weight file corrupted under a running server (test_serve.py)."""
    from turbo_trt.builder.engine import EngineOptions

    out = tmp_path_factory.mktemp("refit-bundles") / "refit"
    quiet_build(tiny_options("tiny-sd-turbo", out, onnx_only=True, engine=EngineOptions(refittable=True)))
    return out


def copy_bundle(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest, ignore=shutil.ignore_patterns(".lock"))
    return dest


def write_import_blocker(directory: Path, modules: tuple[str, ...]) -> dict[str, str]:
    """A sitecustomize.py that makes `modules` unimportable in a child Python; returns the child's env."""
    (directory / "sitecustomize.py").write_text(
        "import sys\n"
        f"BLOCKED = {modules!r}\n"
        "class _Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ImportError('blocked for the test: ' + name)\n"
        "sys.meta_path.insert(0, _Block())\n"
    )
    return {"PYTHONPATH": str(directory), "PATH": "/usr/bin:/bin"}


#: Bundle variants that executors' dataflow tests run on: both families, and SD read as Euler-ancestral.
VARIANTS = ["sd", "sdxl", "sd-ancestral"]


def bundle_variant(name: str, sd_bundle: tuple[Path, BuildReport], sdxl_bundle: tuple[Path, BuildReport]):
    """The opened tiny bundle for a VARIANTS entry; "sd-ancestral" is the SD graphs with the scheduler read
    as Euler-ancestral (both sides of a comparison get the same plans and step noise)."""
    import copy

    from turbo_trt.runner.bundle import Bundle, open_bundle

    bundle = open_bundle((sdxl_bundle if name == "sdxl" else sd_bundle)[0], files="onnx")
    if name == "sd-ancestral":
        manifest = copy.deepcopy(bundle.manifest)
        manifest["scheduler"]["ancestral"] = True
        bundle = Bundle(bundle.path, manifest)
    return bundle
