"""Tier 1: tiny presets through the whole build stage on the CPU: real dynamo ONNX export, ONNX Runtime
validation against PyTorch FP32, real TensorRT-RTX engine builds, manifest, rebuild rules."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from turbo_trt.builder import sources
from turbo_trt.errors import BundleError, FlavorError, SourceError
from turbo_trt.fsutil import BundleLock, sha256_file
from turbo_trt.manifest import read_manifest

from .conftest import TINY_SIZE, copy_bundle, quiet_build, tiny_options

SD_COMPONENTS = ["text_encoder", "unet", "vae_decoder", "vae_encoder"]
SDXL_COMPONENTS = ["text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"]


def _recorded_files(bundle: Path, manifest: dict) -> dict[str, str]:
    files = {}
    for entry in manifest["components"].values():
        files.update(zip(entry["onnx_files"], entry["onnx_file_sha256"]))
        files.update(zip(entry["engine_files"], entry["engine_file_sha256"]))
    return files


def _mtimes(bundle: Path) -> dict[str, int]:
    return {str(p.relative_to(bundle)): p.stat().st_mtime_ns for p in bundle.rglob("*") if p.is_file()
            and p.name != ".lock"}


def test_sd_bundle_contents(sd_bundle):
    bundle, report = sd_bundle
    manifest = read_manifest(bundle)
    assert report.exported == SD_COMPONENTS and report.engines_built == SD_COMPONENTS
    assert list(manifest["components"]) == SD_COMPONENTS
    assert manifest["model"]["family"] == "sd" and manifest["model"]["kind"] == "preset"
    assert manifest["shapes"] == {"batch": 1, "height": 64, "width": 64, "tokens": 77, "latent_channels": 4,
                                  "latent_height": 8, "latent_width": 8, "vae_scale_factor": 8}
    assert manifest["engine"]["flavor"] == "tensorrt-rtx"
    import tensorrt_rtx

    assert manifest["engine"]["version"] == tensorrt_rtx.__version__
    assert manifest["engine"]["targets"] == ["8.0", "8.6", "8.9", "12.0", "12.1"]
    assert manifest["engine"]["targets_source"] == "tensorrt-rtx default"
    for name, entry in manifest["components"].items():
        assert entry["precision"] == "fp16", name  # the SD pipelines never upcast the VAE
        for output in entry["validation"]["outputs"].values():
            assert output["finite"] and output["cosine"] >= 0.99
        assert entry["build_seconds"] > 0 and entry["export_seconds"] > 0
    for rel, digest in _recorded_files(bundle, manifest).items():
        assert sha256_file(bundle / rel) == digest, rel
    unet = manifest["components"]["unet"]
    assert [t["name"] for t in unet["inputs"]] == ["latents", "timestep", "step_coeffs", "step_noise",
                                                   "prompt_embeds"]
    assert unet["outputs"] == [{"name": "next_latents", "shape": [1, 4, 8, 8], "dtype": "float32"}]
    decoder = manifest["components"]["vae_decoder"]
    assert decoder["outputs"] == [{"name": "image", "shape": [1, 64, 64, 3], "dtype": "uint8"},
                                  {"name": "nonfinite", "shape": [1], "dtype": "int32"}]


def test_onnx_graphs_declare_the_manifest_io(sd_bundle):
    """Each exported graph's IO names, static shapes and dtypes are exactly what the manifest records (the
    engines are built from these graphs; reading a plan back needs a GPU)."""
    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    bundle, _ = sd_bundle
    manifest = read_manifest(bundle)
    for name, entry in manifest["components"].items():
        model = onnx.load(str(bundle / entry["onnx"]), load_external_data=False)
        onnx_io = [(v.name, [d.dim_value for d in v.type.tensor_type.shape.dim],
                    tensor_dtype_to_np_dtype(v.type.tensor_type.elem_type).name)
                   for v in list(model.graph.input) + list(model.graph.output)]
        assert onnx_io == [(t["name"], t["shape"], t["dtype"]) for t in entry["inputs"] + entry["outputs"]], name


def test_scheduler_tables_come_from_diffusers(sd_bundle):
    from diffusers import EulerDiscreteScheduler

    bundle, _ = sd_bundle
    manifest = read_manifest(bundle)
    config = sources.part_configs(sources.resolve_source("tiny-sd-turbo"))["scheduler"]
    scheduler = EulerDiscreteScheduler.from_config(config)
    assert manifest["scheduler"]["class"] == "EulerDiscreteScheduler"
    for steps in range(1, 5):
        scheduler.set_timesteps(steps)
        table = manifest["scheduler"]["tables"][str(steps)]
        np.testing.assert_allclose(table["timesteps"], scheduler.timesteps.numpy())
        np.testing.assert_allclose(table["sigmas"], scheduler.sigmas.numpy())
        assert len(table["sigmas"]) == steps + 1 and table["sigmas"][-1] == 0.0
    assert manifest["scheduler"]["tables"]["1"]["timesteps"] == [999.0]  # trailing spacing


def test_bundle_tokenizer_matches_pipeline(sd_bundle):
    from tokenizers import Tokenizer

    bundle, _ = sd_bundle
    manifest = read_manifest(bundle)
    info = manifest["tokenizers"]["text_encoder"]
    pipe_tok = sources.load_pipeline(sources.resolve_source("tiny-sd-turbo")).tokenizer
    tok = Tokenizer.from_file(str(bundle / info["file"]))
    prompt = "a photo of an astronaut riding a horse on mars"
    expected = pipe_tok(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    ids = tok.encode(prompt).ids
    ids = ids + [info["pad_id"]] * (77 - len(ids))
    assert ids == expected
    assert info["pad_token"] == "!" and expected[0] == info["bos_id"]


def test_sdxl_bundle_contents(sdxl_bundle):
    bundle, report = sdxl_bundle
    manifest = read_manifest(bundle)
    assert report.exported == SDXL_COMPONENTS
    assert manifest["model"]["family"] == "sdxl"
    assert manifest["scheduler"]["class"] == "EulerAncestralDiscreteScheduler" and manifest["scheduler"]["ancestral"]
    comps = manifest["components"]
    assert comps["vae_decoder"]["precision"] == "fp32" and comps["vae_encoder"]["precision"] == "fp32"
    assert comps["unet"]["precision"] == "fp16" and comps["text_encoder_2"]["precision"] == "fp16"
    assert [t["name"] for t in comps["text_encoder_2"]["outputs"]] == ["prompt_embeds", "text_embeds"]
    unet_inputs = {t["name"]: t for t in comps["unet"]["inputs"]}
    d1 = comps["text_encoder"]["outputs"][0]["shape"][2]
    d2 = comps["text_encoder_2"]["outputs"][0]["shape"][2]
    assert unet_inputs["prompt_embeds"]["shape"][2] == d1 and unet_inputs["prompt_embeds_2"]["shape"][2] == d2
    assert unet_inputs["text_embeds"]["shape"] == comps["text_encoder_2"]["outputs"][1]["shape"]
    assert set(manifest["tokenizers"]) == {"text_encoder", "text_encoder_2"}
    assert manifest["tokenizers"]["text_encoder_2"]["pad_token"] == "!"
    for rel, digest in _recorded_files(bundle, manifest).items():
        assert sha256_file(bundle / rel) == digest, rel


def test_unchanged_rebuild_does_nothing(sd_bundle, tmp_path):
    bundle = copy_bundle(sd_bundle[0], tmp_path / "b")
    before = _mtimes(bundle)
    report = quiet_build(tiny_options("tiny-sd-turbo", bundle))
    assert report.up_to_date and report.exported == [] and report.engines_built == []
    assert _mtimes(bundle) == before


def test_engine_option_change_rebuilds_engines_only(sd_bundle, tmp_path):
    bundle = copy_bundle(sd_bundle[0], tmp_path / "b")
    onnx_before = {p: t for p, t in _mtimes(bundle).items() if p.startswith("onnx/")}
    report = quiet_build(tiny_options("tiny-sd-turbo", bundle, engine=_engine(optimization_level=1)))
    assert report.exported == [] and report.engines_built == SD_COMPONENTS
    assert {p: t for p, t in _mtimes(bundle).items() if p.startswith("onnx/")} == onnx_before
    assert read_manifest(bundle)["build_config"]["optimization_level"] == 1


def test_corrupted_engine_is_rebuilt_alone(sd_bundle, tmp_path):
    bundle = copy_bundle(sd_bundle[0], tmp_path / "b")
    plan = bundle / "unet.plan"
    data = bytearray(plan.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte: same size, same mtime order, different content
    plan.write_bytes(bytes(data))
    report = quiet_build(tiny_options("tiny-sd-turbo", bundle))
    assert report.exported == [] and report.engines_built == ["unet"]
    assert sha256_file(plan) == read_manifest(bundle)["components"]["unet"]["engine_sha256"]


def test_force_rebuilds_everything(sd_bundle, tmp_path):
    bundle = copy_bundle(sd_bundle[0], tmp_path / "b")
    report = quiet_build(tiny_options("tiny-sd-turbo", bundle, force=True, onnx_only=True))
    assert report.exported == SD_COMPONENTS and report.engines_built == []


def _engine(**kwargs):
    from turbo_trt.builder.engine import EngineOptions

    return EngineOptions(**kwargs)


def test_local_directory_and_changed_part(tmp_path):
    """A `save_pretrained` directory builds like the preset; changing the VAE's weights re-exports and
    rebuilds only the two VAE components."""
    import safetensors.torch

    pipeline_dir = sources.save_preset_pipeline("tiny-sd-turbo", tmp_path / "pipe")
    bundle = tmp_path / "bundle"
    opts = tiny_options(str(pipeline_dir), bundle)
    first = quiet_build(opts)
    manifest = read_manifest(bundle)
    assert first.exported == SD_COMPONENTS and manifest["model"]["kind"] == "local"
    assert manifest["model"]["id"] == str(pipeline_dir.resolve())

    weights = sorted((pipeline_dir / "vae").glob("*.safetensors"))
    assert weights, "save_pretrained wrote no VAE weights"
    tensors = safetensors.torch.load_file(str(weights[0]))
    key = next(k for k in tensors if k.endswith("conv_in.weight"))
    tensors[key] = tensors[key] * 1.5
    safetensors.torch.save_file(tensors, str(weights[0]))

    second = quiet_build(opts)
    assert second.exported == ["vae_decoder", "vae_encoder"]
    assert second.engines_built == ["vae_decoder", "vae_encoder"]
    assert quiet_build(opts).up_to_date


def test_interrupted_build_leaves_nothing_partial_and_resumes(tmp_path):
    """SIGKILL a real `turbo-trt build` once its first component is recorded; every file under a final name
    is then whole (matches the manifest) and the next build finishes only what is missing."""
    bundle = tmp_path / "b"
    cmd = [sys.executable, "-m", "turbo_trt.cli", "build", "--model", "tiny-sd-turbo", "--out", str(bundle),
           "--height", str(TINY_SIZE), "--width", str(TINY_SIZE), "--flavor", "tensorrt-rtx", "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    try:
        while time.monotonic() < deadline:
            manifest_file = bundle / "manifest.json"
            if manifest_file.is_file() and len(json.loads(manifest_file.read_text()).get("components", {})) >= 1:
                break
            time.sleep(0.05)
        else:
            pytest.fail("the build recorded no component within 300 s")
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    manifest = read_manifest(bundle)
    done = list(manifest["components"])
    assert 1 <= len(done) < len(SD_COMPONENTS)
    for entry in manifest["components"].values():
        for rel, digest in zip(entry["onnx_files"], entry["onnx_file_sha256"]):
            assert sha256_file(bundle / rel) == digest
    report = quiet_build(tiny_options("tiny-sd-turbo", bundle))
    assert report.exported == [c for c in SD_COMPONENTS if c not in done]
    assert report.engines_built == SD_COMPONENTS  # the kill came before any engine was built
    leftovers = [p for p in bundle.rglob("*") if p.name.endswith(".tmp")]
    assert leftovers == []
    assert quiet_build(tiny_options("tiny-sd-turbo", bundle)).up_to_date


def test_a_held_lock_refuses_a_second_build(tmp_path):
    bundle = tmp_path / "b"
    with BundleLock(bundle):
        with pytest.raises(BundleError, match="another build"):
            quiet_build(tiny_options("tiny-sd-turbo", bundle, onnx_only=True))
    assert not (bundle / "manifest.json").exists()


@pytest.mark.parametrize("model, message", [
    ("no-such-model", "tiny-sd-turbo"),
    ("stabilityai/sd-turbo", "offline"),
])
def test_bad_models_fail_clearly_and_write_nothing(model, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    bundle = tmp_path / "b"
    with pytest.raises(SourceError, match=message):
        quiet_build(tiny_options(model, bundle))
    assert not bundle.exists()


def test_not_a_pipeline_directory(tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "notes.txt").write_text("hello")
    with pytest.raises(SourceError, match="model_index.json"):
        quiet_build(tiny_options(str(tmp_path / "stuff"), tmp_path / "b"))


def test_missing_flavor_is_reported_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setattr("turbo_trt.flavors.installed_flavors", lambda: [])
    with pytest.raises(FlavorError, match="--onnx-only"):
        quiet_build(tiny_options("tiny-sd-turbo", tmp_path / "b", flavor=None))
    assert not (tmp_path / "b").exists()


def test_unwritable_output_fails_clearly(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    done = subprocess.run([sys.executable, "-m", "turbo_trt.cli", "build", "--model", "tiny-sd-turbo", "--out",
                           str(blocker / "bundle"), "--height", "64", "--width", "64", "--onnx-only"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "cannot create the bundle directory" in done.stderr and "Traceback" not in done.stderr
    assert blocker.read_text() == "not a directory"
