"""`--vae`: a tiny VAE (TAESD) or any replacement keeps the runner's IO contract and matches diffusers with
the same VAE swapped in (`pipe.vae = ...`); changing `--vae` rebuilds only the VAE components; the
validation gate fails a VAE that overflows FP16, naming the component, the figure and the fix, with
nothing half-written; bad `--vae` arguments are clear errors before any export.

Parity tolerance: as in test_runner_parity.py (at most 2 of 255 levels per pixel, mean below 0.25 level).
The tiny VAE runs in FP16 in the bundle (AutoencoderTiny never asks for an upcast) against the FP32
pipeline, the same situation as the SD VAE there.

Noise order with AutoencoderTiny: it has no posterior, so diffusers' img2img draws no sample noise
(`retrieve_latents` takes `.latents`); its generator's first array is the add-noise one. The bundle's
encoder ignores `sample_noise` (it stays an input for the runner's IO contract), so the test hands the
runner an arbitrary array there.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from turbo_trt.builder import sources
from turbo_trt.builder.validate import FP16_MAX, MAX_REL_ERROR, compare, validate_outputs
from turbo_trt.errors import SourceError, ValidationError
from turbo_trt.manifest import read_manifest
from turbo_trt.runner import TurboPipeline
from turbo_trt.runner.inputs import Noise, check_image

from .conftest import copy_bundle, quiet_build, tiny_options
from .test_runner_parity import PROMPTS, _draw, _ours_vs_reference

VAE_COMPONENTS = ["vae_decoder", "vae_encoder"]


def _reference_with_vae(model: str, vae: object):
    """The FP32 diffusers pipeline of a preset, with its VAE replaced the way a user does it."""
    pipe = sources.load_pipeline(sources.resolve_source(model))
    pipe.vae = vae
    return pipe


@pytest.fixture(scope="module")
def sd_tiny_vae(sd_bundle, tmp_path_factory):
    """The SD session bundle, rebuilt with --vae tiny (engines included)."""
    bundle = copy_bundle(sd_bundle[0], tmp_path_factory.mktemp("vae") / "sd-taesd")
    report = quiet_build(tiny_options("tiny-sd-turbo", bundle, vae="tiny"))
    vae = sources.resolve_source("tiny-sd-turbo", vae="tiny").vae
    assert vae is not None
    return bundle, report, _reference_with_vae("tiny-sd-turbo", vae.load())


@pytest.fixture(scope="module")
def sdxl_dir_vae(sdxl_bundle, tmp_path_factory):
    """The SDXL session bundle, rebuilt with --vae DIR: a tiny TAESD written by save_pretrained."""
    from diffusers import AutoencoderTiny

    root = tmp_path_factory.mktemp("vae")
    choice = sources.resolve_source("tiny-sdxl-turbo", vae="tiny").vae
    assert choice is not None
    choice.load().save_pretrained(root / "taesd-dir")
    bundle = copy_bundle(sdxl_bundle[0], root / "sdxl-taesd")
    report = quiet_build(tiny_options("tiny-sdxl-turbo", bundle, vae=str(root / "taesd-dir")))
    vae = AutoencoderTiny.from_pretrained(root / "taesd-dir")
    return bundle, report, _reference_with_vae("tiny-sdxl-turbo", vae)


def test_changing_vae_rebuilds_only_the_vae(sd_bundle, sd_tiny_vae):
    bundle, report, _ = sd_tiny_vae
    assert report.exported == VAE_COMPONENTS and report.engines_built == VAE_COMPONENTS
    before, after = read_manifest(sd_bundle[0]), read_manifest(bundle)
    for name in ("text_encoder", "unet"):
        assert after["components"][name]["onnx_sha256"] == before["components"][name]["onnx_sha256"]
        assert after["components"][name]["engine_sha256"] == before["components"][name]["engine_sha256"]
    source = after["vae"]["source"]
    assert source["class"] == "AutoencoderTiny" and source["argument"] == "tiny" and source["kind"] == "seeded"
    assert source["fingerprint"] == after["model"]["parts"]["vae"] != before["model"]["parts"]["vae"]
    assert before["vae"]["source"]["kind"] == "pipeline" and before["vae"]["source"]["class"] == "AutoencoderKL"
    assert after["vae"]["scaling_factor"] == 1.0
    for name in VAE_COMPONENTS:  # same IO contract, FP16 (AutoencoderTiny never upcasts), gate passed
        entry, old = after["components"][name], before["components"][name]
        assert entry["inputs"] == old["inputs"] and entry["outputs"] == old["outputs"]
        assert entry["precision"] == "fp16"
        validation = entry["validation"]
        assert validation["max_rel_error"] == MAX_REL_ERROR[name]
        assert 0 < validation["fp32_peak_activation"] < FP16_MAX
        gated = validation["outputs"]["decoded" if name == "vae_decoder" else "latents"]
        assert gated["rel_error"] <= MAX_REL_ERROR[name]
    assert quiet_build(tiny_options("tiny-sd-turbo", bundle, vae="tiny")).up_to_date


def test_switching_only_vae_fp32_re_exports_only_the_vae(sd_bundle, tmp_path):
    """--vae-fp32 on a bundle that built fine in FP16 re-exports (and re-compiles) the VAE components alone,
    now in FP32, and the manifest records the precision used."""
    bundle = copy_bundle(sd_bundle[0], tmp_path / "b")
    report = quiet_build(tiny_options("tiny-sd-turbo", bundle, vae_fp32=True))
    assert report.exported == VAE_COMPONENTS and report.engines_built == VAE_COMPONENTS
    before, after = read_manifest(sd_bundle[0]), read_manifest(bundle)
    assert before["vae"]["precision"] == "fp16" and after["vae"]["precision"] == "fp32"
    assert before["vae"]["force_upcast"] is False  # the SD preset's config says True; SD pipelines never upcast
    for name in ("text_encoder", "unet"):
        assert after["components"][name]["onnx_sha256"] == before["components"][name]["onnx_sha256"]
        assert after["components"][name]["engine_sha256"] == before["components"][name]["engine_sha256"]
    for name in VAE_COMPONENTS:
        assert before["components"][name]["precision"] == "fp16" and after["components"][name]["precision"] == "fp32"


def _txt2img_parity(bundle: Path, reference, steps: int, prompt: str) -> None:
    import torch
    from diffusers import AutoPipelineForText2Image

    ours_pipe = TurboPipeline.from_bundle(bundle, executor="onnxruntime")
    size = ours_pipe.shapes["height"]
    shape = (1, 4, size // 8, size // 8)
    plan = ours_pipe.plan(steps, None)
    generator = torch.Generator().manual_seed(7)
    (latents,) = _draw(generator, shape, 1)
    expected = AutoPipelineForText2Image.from_pipe(reference)(
        prompt, num_inference_steps=steps, guidance_scale=0.0, latents=latents.clone(), height=size, width=size,
        output_type="np", generator=generator).images
    generator = torch.Generator().manual_seed(7)
    (latents,) = _draw(generator, shape, 1)
    step_noise = [t.numpy() for t in _draw(generator, shape, plan.runs)] if ours_pipe.scheduler["ancestral"] else None
    ours = ours_pipe.run_with_noise([prompt], plan, Noise(latents=latents.numpy(), steps=step_noise), None)
    _ours_vs_reference(ours, expected)


def _img2img_parity(bundle: Path, reference, prompt: str, posterior: bool = False) -> None:
    import torch
    from diffusers import AutoPipelineForImage2Image
    from PIL import Image

    ours_pipe = TurboPipeline.from_bundle(bundle, executor="onnxruntime")
    size = ours_pipe.shapes["height"]
    shape = (1, 4, size // 8, size // 8)
    init = Image.fromarray(np.random.default_rng(3).integers(0, 256, (size, size, 3), dtype=np.uint8))
    steps, strength = 2, 0.5
    plan = ours_pipe.plan(steps, strength)
    generator = torch.Generator().manual_seed(11)
    expected = AutoPipelineForImage2Image.from_pipe(reference)(
        prompt, image=init, num_inference_steps=steps, strength=strength, guidance_scale=0.0, output_type="np",
        generator=generator).images
    generator = torch.Generator().manual_seed(11)
    if posterior:  # AutoencoderKL: diffusers draws the posterior sample's noise first
        sample, latents = (t.numpy() for t in _draw(generator, shape, 2))
    else:  # AutoencoderTiny: no posterior, no draw; the bundle's encoder ignores sample_noise
        (latents,) = (t.numpy() for t in _draw(generator, shape, 1))
        sample = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    step_noise = [t.numpy() for t in _draw(generator, shape, plan.runs)] if ours_pipe.scheduler["ancestral"] else None
    noise = Noise(latents=latents, sample=sample, steps=step_noise)
    ours = ours_pipe.run_with_noise([prompt], plan, noise, check_image(init, size, size, 1))
    _ours_vs_reference(ours, expected)
    if posterior:
        return
    # sample_noise really is ignored: other values give the same image, bit for bit.
    again = ours_pipe.run_with_noise([prompt], plan, Noise(latents=latents, sample=sample * 5.0, steps=step_noise),
                                     check_image(init, size, size, 1))
    assert np.array_equal(ours, again)


@pytest.mark.parametrize("steps", [1, 4])
def test_sd_tiny_vae_txt2img_matches_diffusers(sd_tiny_vae, steps):
    bundle, _, reference = sd_tiny_vae
    _txt2img_parity(bundle, reference, steps, PROMPTS[0])


def test_sd_tiny_vae_img2img_matches_diffusers(sd_tiny_vae):
    bundle, _, reference = sd_tiny_vae
    _img2img_parity(bundle, reference, PROMPTS[1])


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_vae_directory_txt2img_matches_diffusers(sdxl_dir_vae, steps):
    bundle, report, reference = sdxl_dir_vae
    assert report.exported == VAE_COMPONENTS
    _txt2img_parity(bundle, reference, steps, PROMPTS[1])


def test_sdxl_vae_directory_img2img_matches_diffusers(sdxl_dir_vae):
    bundle, _, reference = sdxl_dir_vae
    manifest = read_manifest(bundle)
    source = manifest["vae"]["source"]
    assert source["kind"] == "local" and source["class"] == "AutoencoderTiny"
    # The tiny preset's own SDXL VAE asks for FP32 (force_upcast); the replacement's config says FP16.
    assert manifest["components"]["vae_decoder"]["precision"] == "fp16"
    _img2img_parity(bundle, reference, PROMPTS[0])


def test_sdxl_fp16_safe_kl_vae_with_per_channel_latents(sdxl_bundle, tmp_path):
    """An SDXL replacement AutoencoderKL that says it is FP16-safe (force_upcast false, like
    madebyollin/sdxl-vae-fp16-fix) and carries per-channel latents_mean / latents_std (which SDXL pipelines
    honour): it runs in FP16, passes the gate, and the bundle matches diffusers with that VAE."""
    from diffusers import AutoencoderKL

    from turbo_trt.builder.presets import build_part, preset_spec

    vae = build_part(preset_spec("tiny-sdxl-turbo"), "vae")
    vae.register_to_config(force_upcast=False, latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[0.9, 1.1, 1.3, 0.7])
    vae.save_pretrained(tmp_path / "kl-fp16")
    bundle = copy_bundle(sdxl_bundle[0], tmp_path / "b")
    report = quiet_build(tiny_options("tiny-sdxl-turbo", bundle, vae=str(tmp_path / "kl-fp16"), onnx_only=True))
    assert report.exported == VAE_COMPONENTS
    assert read_manifest(bundle)["components"]["vae_decoder"]["precision"] == "fp16"
    reference = _reference_with_vae("tiny-sdxl-turbo", AutoencoderKL.from_pretrained(tmp_path / "kl-fp16"))
    _txt2img_parity(bundle, reference, 1, PROMPTS[0])
    _img2img_parity(bundle, reference, PROMPTS[1], posterior=True)


def _overflowing_vae(directory: Path) -> float:
    """A tiny SDXL-family AutoencoderKL that claims to be FP16-safe (force_upcast false) but is not: its
    decoder's first conv is scaled so that its activations exceed FP16's range (as the real SDXL VAE's do),
    while every weight stays representable in FP16. In FP32 the decoder's group norms bring the values back,
    so the FP32 image is finite. Returns the scale applied."""
    import torch

    from turbo_trt.builder.presets import build_part, preset_spec

    vae = build_part(preset_spec("tiny-sdxl-turbo"), "vae")
    with torch.no_grad():
        conv = vae.decoder.conv_in
        scale = 3e4 / float(conv.weight.abs().max())
        conv.weight.mul_(scale)
        conv.bias.mul_(scale)
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(directory)
    return scale


def test_a_vae_that_overflows_fp16_fails_the_build(sdxl_bundle, tmp_path):
    _overflowing_vae(tmp_path / "overflowing-vae")
    bundle = copy_bundle(sdxl_bundle[0], tmp_path / "b")
    opts = tiny_options("tiny-sdxl-turbo", bundle, vae=str(tmp_path / "overflowing-vae"), onnx_only=True)
    with pytest.raises(ValidationError) as failure:
        quiet_build(opts)
    message = str(failure.value)
    # The component, the figure and the fix.
    assert message.startswith("vae_decoder:")
    assert "largest intermediate activation" in message and f"{FP16_MAX:g}" in message
    assert "--vae-fp32" in message and "madebyollin/sdxl-vae-fp16-fix" in message
    # Nothing half-written: the manifest claims neither VAE component any more (their recorded graphs came
    # from the old VAE), no temporaries are left, and the other components are untouched.
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert sorted(manifest["components"]) == ["text_encoder", "text_encoder_2", "unet"]
    old_files = [f for name in VAE_COMPONENTS for f in read_manifest(sdxl_bundle[0])["components"][name]["onnx_files"]]
    assert old_files and [f for f in old_files if (bundle / f).exists()] == []  # the old VAE's graphs are gone
    assert [p.name for p in bundle.rglob("*") if p.name.endswith(".tmp") or p.name.startswith(".vae")] == []
    assert manifest["model"]["parts"]["vae"] == manifest["vae"]["source"]["fingerprint"]

    # The fix the message names works: FP32 passes the same gate.
    report = quiet_build(tiny_options("tiny-sdxl-turbo", bundle, vae=str(tmp_path / "overflowing-vae"),
                                      vae_fp32=True, onnx_only=True))
    assert report.exported == VAE_COMPONENTS
    manifest = read_manifest(bundle)
    decoder = manifest["components"]["vae_decoder"]
    assert decoder["precision"] == "fp32" and manifest["vae"]["source"]["fp32_override"] is True
    assert decoder["validation"]["fp32_peak_activation"] > FP16_MAX
    assert decoder["validation"]["outputs"]["decoded"]["rel_error"] < 1e-4  # FP32 vs FP32


def test_centred_gate_fails_a_wrong_image_that_pixel_cosine_passes():
    """The old gate's blind spot: two different pictures have a high cosine on raw pixel values because
    every value is positive. A low-contrast picture (std ~9 levels, like the tiny presets' decoded images)
    turned upside down passes the old 0.99 pixel-cosine gate; centred, the pair is far apart and fails."""
    y, x = np.mgrid[0:64, 0:64] / 63.0
    image = 120 + 30 * np.stack([x, y, x * y], axis=-1)  # a smooth gradient picture, pixel values 120..150
    wrong = image[::-1, ::-1]  # the same picture upside down: a wrong image
    raw = image.ravel() @ wrong.ravel() / (np.linalg.norm(image) * np.linalg.norm(wrong))
    assert raw > 0.99  # what the old gate saw: "similar"
    figures = compare(image, wrong)
    assert figures["cosine"] < 0.5 and figures["rel_error"] > 0.5
    with pytest.raises(ValidationError, match="vae_decoder.image: relative error"):
        validate_outputs("vae_decoder", {"image": image}, {"image": wrong}, 0.99)
    assert validate_outputs("vae_decoder", {"image": image}, {"image": image + 0.01}, 0.99)["outputs"]


def test_peak_activation_beyond_fp16_fails_only_fp16_graphs():
    ref = np.linspace(-1, 1, 50, dtype=np.float32)
    with pytest.raises(ValidationError, match="vae_decoder: the FP32 reference's largest intermediate activation"):
        validate_outputs("vae_decoder", {"x": ref}, {"x": ref}, 0.99, precision="fp16", peak_activation=1e5)
    figures = validate_outputs("vae_decoder", {"x": ref}, {"x": ref}, 0.99, precision="fp32", peak_activation=1e5)
    assert figures["fp32_peak_activation"] == 1e5


def test_a_nan_reference_fails_the_gate():
    """NaN/inf in the FP32 reference itself (broken weights) fails, whatever the ONNX graph gives; and a NaN
    figure can never pass a comparison (the checks are written "not within the limit")."""
    ref = np.linspace(-1, 1, 50, dtype=np.float32)
    broken = ref.copy()
    broken[7] = np.nan
    for candidate in (ref, broken):
        with pytest.raises(ValidationError, match=r"vae_decoder.x: 1 of 50 values of the FP32 PyTorch reference "
                                                  r"itself are NaN/inf.*broken weights"):
            validate_outputs("vae_decoder", {"x": broken}, {"x": candidate}, 0.99)
    assert compare(broken, ref)["rel_error"] != compare(broken, ref)["rel_error"]  # NaN: what the gate now refuses


def _kl_vae(directory: Path, **overrides: object) -> None:
    """The tiny SD preset's AutoencoderKL with some config fields changed, written by save_pretrained."""
    from diffusers import AutoencoderKL

    from turbo_trt.builder.presets import preset_spec

    config = preset_spec("tiny-sd-turbo").config("vae")
    config.pop("_class_name")
    AutoencoderKL(**{**config, **overrides}).save_pretrained(directory)


@pytest.mark.parametrize("case, message", [
    ("unknown-hub-id", "could not download 'nobody/no-such-vae'.*offline, --vae tiny works"),
    ("missing-directory", "no such directory"),
    ("directory-without-vae", "holds no VAE"),
    ("wrong-latent-channels", "16 latent channels, the UNet takes 4"),
    ("wrong-down-sampling", "the VAE down-samples by 4, the pipeline's VAE .* by 8"),
    ("not-a-vae-argument", "expected 'tiny', a hub id"),
    ("nonzero-shift-factor", "shift_factor 0.1159; the SD / SDXL pipelines ignore shift_factor"),
])
def test_bad_vae_arguments_fail_before_any_export(case, message, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    argument = {"unknown-hub-id": "nobody/no-such-vae", "missing-directory": str(tmp_path / "nowhere"),
                "directory-without-vae": str(tmp_path / "empty"), "wrong-latent-channels": str(tmp_path / "vae16"),
                "wrong-down-sampling": str(tmp_path / "vae-x4"), "not-a-vae-argument": "just words",
                "nonzero-shift-factor": str(tmp_path / "vae-shift")}[case]
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    if case == "wrong-latent-channels":
        _kl_vae(tmp_path / "vae16", latent_channels=16)
    if case == "wrong-down-sampling":  # three levels: down-sampling by 4
        _kl_vae(tmp_path / "vae-x4", block_out_channels=[8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 3,
                up_block_types=["UpDecoderBlock2D"] * 3)
    if case == "nonzero-shift-factor":  # an SD3 / Flux-style VAE: the SD pipelines would ignore its shift
        _kl_vae(tmp_path / "vae-shift", shift_factor=0.1159)
    bundle = tmp_path / "b"
    with pytest.raises(SourceError, match=message):
        quiet_build(tiny_options("tiny-sd-turbo", bundle, vae=argument))
    assert not bundle.exists()


def test_tiny_vae_offline_needs_a_seeded_source(monkeypatch):
    """`--vae tiny` downloads TAESD for a real pipeline; offline that is a clear error naming what works."""
    from turbo_trt.builder.vae import resolve_vae

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(SourceError, match="madebyollin/taesd.*tiny presets and --random-weights"):
        resolve_vae("tiny", "local", "sd", None)
    choice = resolve_vae("tiny", "random", "sdxl", 43)  # offline: the shipped full-size TAESD config
    assert choice.kind == "seeded" and choice.config["_class_name"] == "AutoencoderTiny"
    assert choice.config["num_decoder_blocks"] == [3, 3, 3, 1]
    # The fingerprint follows the seed and the config: another seed or another config (the tiny presets'
    # toy-width TAESD) differs.
    assert choice.fingerprint() == resolve_vae("tiny", "random", "sdxl", 43).fingerprint()
    assert choice.fingerprint() != resolve_vae("tiny", "random", "sdxl", 44).fingerprint()
    assert choice.fingerprint() != resolve_vae("tiny", "preset", "sdxl", 43).fingerprint()


def _fake_hub_cache(cache: Path, repo_id: str, vae: object) -> str:
    """A Hugging Face cache holding `repo_id` at one commit, laid out as huggingface_hub writes it."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    vae.save_pretrained(repo / "snapshots" / commit)  # type: ignore[attr-defined]
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return commit


def test_hub_vae_from_the_local_cache_offline(tmp_path, monkeypatch):
    """A hub VAE (here `--vae tiny` of a hub pipeline: madebyollin/taesd) resolves from the local cache when
    the hub is unreachable; the manifest's record names the repo and its commit."""
    from turbo_trt.builder.vae import resolve_vae

    seeded = sources.resolve_source("tiny-sd-turbo", vae="tiny").vae
    assert seeded is not None
    commit = _fake_hub_cache(tmp_path / "hub", "madebyollin/taesd", seeded.load())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    choice = resolve_vae("tiny", "hub", "sd", None, cache_dir=tmp_path / "hub")
    assert (choice.kind, choice.model_id, choice.revision, choice.class_name) == (
        "hub", "madebyollin/taesd", commit, "AutoencoderTiny")
    loaded = choice.load()
    expected = seeded.load().state_dict()
    assert all(np.array_equal(v.numpy(), expected[k].numpy()) for k, v in loaded.state_dict().items())
    # The fingerprints hash the files, not where they are: a copy of the snapshot elsewhere has the same one,
    # the seeded VAE (hashed from its config and seed) another, and so does the copy once a weight changes.
    assert choice.folder is not None
    copy = shutil.copytree(choice.folder, tmp_path / "copy")
    assert choice.fingerprint() == resolve_vae(str(copy), "hub", "sd", None).fingerprint()
    assert choice.fingerprint() != seeded.fingerprint()
    import torch

    changed = seeded.load()
    with torch.no_grad():
        next(changed.parameters()).add_(1.0)
    changed.save_pretrained(copy)
    assert choice.fingerprint() != resolve_vae(str(copy), "hub", "sd", None).fingerprint()


def test_bench_baseline_uses_the_bundle_vae(sd_tiny_vae):
    """`turbo-trt bench` compares a tiny-VAE bundle with diffusers running the same tiny VAE."""
    from turbo_trt.benchmarks.baselines import _pipeline

    bundle, _, _ = sd_tiny_vae
    pipe = _pipeline(read_manifest(bundle), on_gpu=False)
    assert type(pipe.vae).__name__ == "AutoencoderTiny"


def test_validation_inputs_are_what_a_real_call_feeds(sd_bundle):
    """The gate's inputs are the runner's: the prompts' token ids as the bundle's tokenizer makes them, and
    decoder latents equal to a real 1-step txt2img call's (the bundle's UNet graph with the runner's plan,
    from the same noise and the exported text encoder's embeddings) within FP16 error."""
    from turbo_trt.builder.build import vae_scale_factor
    from turbo_trt.builder.specs import UNET, dims_from_configs
    from turbo_trt.builder.validate import run_onnx
    from turbo_trt.builder.validation_inputs import ValidationInputs

    bundle = sd_bundle[0]
    src = sources.resolve_source("tiny-sd-turbo")
    configs = sources.part_configs(src)
    dims = dims_from_configs(configs, 1, 64, 64, vae_scale_factor(configs))
    inputs = ValidationInputs(sources.load_pipeline(src), "sd", dims, bundle, seed=0)
    runner = TurboPipeline.from_bundle(bundle, executor="onnxruntime")
    assert np.array_equal(inputs.token_ids("text_encoder"), runner.token_ids(inputs.prompts)["text_encoder"])

    unet_feeds = inputs.feeds(UNET)
    plan = runner.plan(1, None)
    one_step = run_onnx(bundle / "onnx" / "unet.onnx", {
        **unet_feeds, "timestep": plan.timesteps[:1], "step_coeffs": plan.coeffs[0]})["next_latents"]
    latents = inputs.decoder_latents()  # from the pipeline's FP32 UNet: no UNet was validated in this stage
    assert compare(latents, one_step)["rel_error"] < 1e-2
    assert latents.std() > 0.1  # a UNet output, not zeros
