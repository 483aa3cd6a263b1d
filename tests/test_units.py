"""Tier 0: units that need no model export (specs, shape rules, manifest, files, flavors, CLI)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from turbo_trt.builder.build import check_model_shapes, check_shape_options
from turbo_trt.builder.engine import EngineOptions
from turbo_trt.builder.options import BuildOptions
from turbo_trt.builder.specs import TOKENS, dims_from_configs, specs_for
from turbo_trt.builder.validate import compare, validate_outputs
from turbo_trt.errors import BundleError, FlavorError, UsageError, ValidationError
from turbo_trt.flavors import load_flavor
from turbo_trt.fsutil import BundleLock, atomic_path, atomic_write_bytes
from turbo_trt.manifest import SCHEMA_VERSION, check_manifest

from .conftest import write_import_blocker

SD_CONFIGS = {"unet": {"in_channels": 4, "block_out_channels": [320, 640, 1280, 1280]},
              "vae": {"block_out_channels": [128, 256, 512, 512]},
              "text_encoder": {"hidden_size": 1024}}
SDXL_CONFIGS = {"unet": {"in_channels": 4, "block_out_channels": [320, 640, 1280]},
                "vae": {"block_out_channels": [128, 256, 512, 512]},
                "text_encoder": {"hidden_size": 768},
                "text_encoder_2": {"hidden_size": 1280, "projection_dim": 1280}}


def test_specs_per_family():
    assert [s.name for s in specs_for("sd")] == ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
    assert [s.name for s in specs_for("sdxl", img2img=False)] == ["text_encoder", "text_encoder_2", "unet",
                                                                  "vae_decoder"]
    unet = specs_for("sdxl")[2]
    sd_in, _ = unet.io("sd")
    sdxl_in, _ = unet.io("sdxl")
    assert [t.name for t in sdxl_in if t not in sd_in] == ["prompt_embeds_2", "text_embeds"]
    with pytest.raises(ValueError):
        specs_for("flux")


def test_dims_resolve_full_size_shapes():
    dims = dims_from_configs(SDXL_CONFIGS, batch=2, height=512, width=768, vae_scale=8)
    specs = {s.name: s for s in specs_for("sdxl")}
    inputs, outputs = specs["unet"].io("sdxl")
    shapes = {t.name: dims.shape(t) for t in inputs + outputs}
    assert shapes["latents"] == (2, 4, 64, 96)
    assert shapes["prompt_embeds"] == (2, TOKENS, 768)
    assert shapes["prompt_embeds_2"] == (2, TOKENS, 1280)
    assert shapes["text_embeds"] == (2, 1280)
    assert shapes["step_coeffs"] == (4,)
    _, dec_out = specs["vae_decoder"].io("sdxl")
    assert dims.shape(dec_out[0]) == (2, 512, 768, 3)


@pytest.mark.parametrize("kwargs", [dict(height=500), dict(width=0), dict(batch=0), dict(min_cosine=1.5),
                                    dict(engine=EngineOptions(optimization_level=9)),
                                    dict(engine=EngineOptions(targets=("9.9",)))])
def test_bad_options_rejected_before_work(kwargs):
    with pytest.raises(UsageError):
        check_shape_options(BuildOptions(model="tiny-sd-turbo", **kwargs))


def test_down_sampling_rule_names_a_fix():
    # SD: VAE /8 and UNet /8 more -> multiples of 64; SDXL: UNet /4 -> multiples of 32.
    check_model_shapes(BuildOptions(model="x", height=576, width=512), SD_CONFIGS)
    with pytest.raises(UsageError, match="multiple of 64.*try 512 or 576"):
        check_model_shapes(BuildOptions(model="x", height=544, width=512), SD_CONFIGS)
    check_model_shapes(BuildOptions(model="x", height=544, width=512), SDXL_CONFIGS)


def test_compare_and_validation_gate():
    ref = np.linspace(-1, 1, 100, dtype=np.float32)
    good = compare(ref, ref + 1e-3)
    assert good["finite"] and good["cosine"] > 0.9999 and good["max_abs"] == pytest.approx(1e-3, rel=1e-3)
    assert compare(ref, -ref)["cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValidationError, match="NaN"):
        validate_outputs("unet", {"x": ref}, {"x": np.full_like(ref, np.nan)}, 0.99)
    with pytest.raises(ValidationError, match="cosine"):
        validate_outputs("unet", {"x": ref}, {"x": np.roll(ref, 37)}, 0.99)
    figures = validate_outputs("unet", {"x": ref}, {"x": ref.copy()}, 0.99)
    assert figures["outputs"]["x"]["cosine"] == pytest.approx(1.0)


def test_manifest_check_names_what_is_wrong():
    with pytest.raises(BundleError, match="schema version"):
        check_manifest({"schema_version": 999})
    with pytest.raises(BundleError, match="missing keys.*components"):
        check_manifest({"schema_version": SCHEMA_VERSION, "model": {}, "shapes": {}, "scheduler": {},
                        "vae": {}, "tokenizers": {}})


def test_atomic_write_leaves_nothing_on_failure(tmp_path: Path):
    target = tmp_path / "a.plan"
    atomic_write_bytes(target, b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("killed")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.plan"]


def test_lock_excludes_a_second_build(tmp_path: Path):
    with BundleLock(tmp_path):
        with pytest.raises(BundleError, match="another build"):
            with BundleLock(tmp_path):
                pass
        # A second process is refused too (flock is per open file description).
        code = ("import sys; from pathlib import Path; from turbo_trt.fsutil import BundleLock\n"
                "try:\n    BundleLock(Path(sys.argv[1])).__enter__()\nexcept Exception as e:\n"
                "    print(e); sys.exit(3)\n")
        done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
        assert done.returncode == 3 and "another build" in done.stdout
    with BundleLock(tmp_path):  # released
        pass


def test_missing_flavor_message_names_onnx_only(monkeypatch):
    monkeypatch.setattr("turbo_trt.flavors.installed_flavors", lambda: [])
    with pytest.raises(FlavorError, match="--onnx-only") as info:
        load_flavor(None)
    assert "turbo-trt[tensorrt-rtx]" in str(info.value)
    with pytest.raises(FlavorError, match="unknown engine flavor"):
        load_flavor("openvino")


def test_rtx_flavor_is_found_and_strongly_typed():
    flavor = load_flavor("tensorrt-rtx")
    assert flavor.ahead_of_time and not flavor.uses_timing_cache
    assert flavor.network_flags() != 0
    assert flavor.compute_capability_enum("8.9") == flavor.trt.ComputeCapability.SM89


def test_import_and_help_need_no_torch(tmp_path: Path):
    """`import turbo_trt` and `turbo-trt --help` work where torch, TensorRT and diffusers cannot import."""
    env = write_import_blocker(tmp_path, ("torch", "diffusers", "transformers", "tensorrt", "tensorrt_rtx",
                                          "onnx", "onnxruntime"))
    for args in (["-c", "import turbo_trt, turbo_trt.manifest, turbo_trt.flavors; print('ok')"],
                 ["-m", "turbo_trt.cli", "--help"], ["-m", "turbo_trt.cli", "build", "--help"]):
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    assert "--random-weights" in done.stdout


def test_cli_reports_usage_errors_without_traceback():
    done = subprocess.run([sys.executable, "-m", "turbo_trt.cli", "build", "--model", "tiny-sd-turbo",
                           "--height", "100", "--onnx-only"], capture_output=True, text=True)
    assert done.returncode == 2
    assert "multiple of 8" in done.stderr and "Traceback" not in done.stderr


def test_readme_test_command_is_what_ci_runs():
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    ci = (root / ".ci" / "run").read_text()
    command = "python -m pytest -q"
    assert command in readme and command in ci
