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


def _controlnet_bundle(tmp_path_factory: pytest.TempPathFactory, base: Path, model: str, nets: int):
    """A copy of a session tiny bundle rebuilt with `nets` tiny ControlNets (ControlNetModel.from_unet of the
    preset's UNet, weights moved by seeded noise, seeded non-zero output convolutions; save_pretrained
    directories). The rebuild is incremental: only the UNet is exported and compiled again."""
    from turbo_trt.builder import sources
    from turbo_trt.builder.controlnet import save_test_controlnet

    root = tmp_path_factory.mktemp(f"controlnet-{model}")
    unet = sources.load_pipeline(sources.resolve_source(model)).unet
    dirs = [save_test_controlnet(unet, root / f"net{i}", seed=100 + i) for i in range(nets)]
    out = copy_bundle(base, root / "bundle")
    report = quiet_build(tiny_options(model, out, controlnets=tuple(str(d) for d in dirs)))
    return out, report, dirs


@pytest.fixture(scope="session")
def sd_control_bundle(tmp_path_factory: pytest.TempPathFactory, sd_bundle):
    """tiny-sd-turbo with two ControlNets: (bundle, build report, net directories)."""
    return _controlnet_bundle(tmp_path_factory, sd_bundle[0], "tiny-sd-turbo", 2)


@pytest.fixture(scope="session")
def sdxl_control_bundle(tmp_path_factory: pytest.TempPathFactory, sdxl_bundle):
    """tiny-sdxl-turbo with one ControlNet: (bundle, build report, net directories)."""
    return _controlnet_bundle(tmp_path_factory, sdxl_bundle[0], "tiny-sdxl-turbo", 1)


# -- frames and direct calls shared by the stream and live-server tests -------------------------------------
def smooth_frame(seed: int, size: tuple[int, int] = (64, 64)):
    """A smooth random picture (an upsampled 8x8 grid, PIL RGB), so nearby seeds give different content."""
    import numpy as np
    from PIL import Image

    small = np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def direct_image(pipe, prompt: str, seed: int, steps: int, image=None, strength: float = 0.5):
    """The pipeline's own call for one stream input: uint8 (H, W, 3)."""
    return pipe(prompt, image=image, strength=strength, num_inference_steps=steps, seed=seed, output_type="np")[0]
