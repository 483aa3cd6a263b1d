"""Runner guards: bundle checks before deserializing, input checks before any work, NaN guard, cache,
threads, and a torch-free run stage."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest

from turbo_trt.errors import BundleError, FlavorError, InputError
from turbo_trt.runner import NonFiniteOutputError, TurboPipeline
from turbo_trt.runner.bundle import check_engine_compatibility, open_bundle
from turbo_trt.runner.tokenizer import PromptTruncated

from .conftest import copy_bundle, write_import_blocker

H100 = {"name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "driver": "580"}
RTX4090 = {"name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9", "driver": "580"}


@pytest.fixture(scope="module")
def pipe(sd_bundle):
    return TurboPipeline.from_bundle(sd_bundle[0], executor="onnxruntime")


# -- bundle checks (before anything is deserialized) ---------------------------------------------------

def _damage(bundle: Path, how: str) -> str:
    plan = bundle / "unet.plan"
    data = plan.read_bytes()
    if how == "truncated":
        plan.write_bytes(data[: len(data) // 3])
    elif how == "garbage":
        plan.write_bytes(np.random.default_rng(0).integers(0, 256, len(data), dtype=np.uint8).tobytes())
    elif how == "flipped":
        flipped = bytearray(data)
        flipped[100] ^= 0x01
        plan.write_bytes(bytes(flipped))
    elif how == "missing":
        plan.unlink()
    return "unet.plan"


@pytest.mark.parametrize("how", ["truncated", "garbage", "flipped", "missing"])
def test_damaged_engine_is_named(sd_bundle, tmp_path, how):
    bundle = copy_bundle(sd_bundle[0], tmp_path / "b")
    name = _damage(bundle, how)
    with pytest.raises(BundleError, match=name) as info:
        open_bundle(bundle, files="engine")
    assert ("missing" in str(info.value)) == (how == "missing")


def test_damaged_onnx_is_named(sd_bundle, tmp_path):
    bundle = copy_bundle(sd_bundle[0], tmp_path / "b")
    graph = bundle / "onnx" / "vae_decoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-10])
    with pytest.raises(BundleError, match="onnx/vae_decoder.onnx does not match"):
        TurboPipeline.from_bundle(bundle, executor="onnxruntime")


def test_missing_tokenizer_and_manifest(sd_bundle, tmp_path):
    bundle = copy_bundle(sd_bundle[0], tmp_path / "b")
    (bundle / "tokenizer" / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer"):
        open_bundle(bundle)
    (bundle / "manifest.json").unlink()
    with pytest.raises(BundleError, match="manifest.json is missing"):
        open_bundle(bundle)


def _edit_manifest(bundle: Path, edit) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def test_compatibility_checks_say_what_differs(sd_bundle, tmp_path):
    bundle = open_bundle(sd_bundle[0], files="engine")
    version = bundle.manifest["engine"]["version"]
    check_engine_compatibility(bundle, "tensorrt-rtx", version, RTX4090)  # 8.9 is a target: fine
    with pytest.raises(FlavorError, match="built with tensorrt-rtx, but tensorrt is loaded"):
        check_engine_compatibility(bundle, "tensorrt", version, RTX4090)
    with pytest.raises(FlavorError, match=f"built with tensorrt-rtx {version}, but 9.9.9 is installed"):
        check_engine_compatibility(bundle, "tensorrt-rtx", "9.9.9", RTX4090)
    with pytest.raises(FlavorError, match="this GPU .*H100.* is 9.0.*--targets 9.0"):
        check_engine_compatibility(bundle, "tensorrt-rtx", version, H100)
    with pytest.raises(FlavorError, match="no NVIDIA GPU"):
        check_engine_compatibility(bundle, "tensorrt-rtx", version, None)
    with pytest.warns(RuntimeWarning, match="trying anyway"):
        check_engine_compatibility(bundle, "tensorrt-rtx", version, H100, strict_targets=False)
    with pytest.raises(FlavorError, match="9.9.9"):  # a version mismatch is never waved through
        check_engine_compatibility(bundle, "tensorrt-rtx", "9.9.9", H100, strict_targets=False)

    copy = copy_bundle(sd_bundle[0], tmp_path / "b")
    _edit_manifest(copy, lambda m: m["engine"].update(targets=["current"], build_gpu=RTX4090))
    edited = open_bundle(copy, files="engine")
    check_engine_compatibility(edited, "tensorrt-rtx", version, RTX4090)
    with pytest.raises(FlavorError, match="on NVIDIA GeForce RTX 4090"):
        check_engine_compatibility(edited, "tensorrt-rtx", version, H100)


def test_unknown_schema_version(sd_bundle, tmp_path):
    copy = copy_bundle(sd_bundle[0], tmp_path / "b")
    _edit_manifest(copy, lambda m: m.update(schema_version=99))
    with pytest.raises(BundleError, match="schema version 99"):
        open_bundle(copy)


def test_onnx_only_bundle_has_no_engines_to_run(sd_bundle, tmp_path):
    copy = copy_bundle(sd_bundle[0], tmp_path / "b")
    _edit_manifest(copy, lambda m: [e.pop(k) for e in m["components"].values()
                                    for k in ("engine", "engine_files", "engine_file_sha256")])
    with pytest.raises(BundleError, match="no engine"):
        open_bundle(copy, files="engine")
    assert open_bundle(copy, files="onnx").img2img


# -- input checks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=3), "string"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=["a", 5]), "prompt 1 is a int"),
    (dict(prompt=["a", "b"]), "batch 1"),
    (dict(prompt="a", num_inference_steps=0), "1..4"),
    (dict(prompt="a", num_inference_steps=5), "1..4"),
    (dict(prompt="a", num_inference_steps=2.0), "integer"),
    (dict(prompt="a", num_inference_steps=[1]), "integer"),
    (dict(prompt="a", seed=-1), r"\[0, 2\*\*63\)"),
    (dict(prompt="a", seed=2**63), r"\[0, 2\*\*63\)"),
    (dict(prompt="a", seed="7"), "integer"),
    (dict(prompt="a", noise=np.zeros((1, 4, 9, 8), np.float32)), "shape"),
    (dict(prompt="a", noise=np.full((1, 4, 8, 8), np.nan, np.float32)), "finite"),
    (dict(prompt="a", output_type="latent"), "output_type"),
])
def test_bad_inputs_rejected(pipe, kwargs, message):
    prompt = kwargs.pop("prompt")
    with pytest.raises(InputError, match=message):
        pipe(prompt, **kwargs)


@pytest.mark.parametrize("strength, steps, message", [
    (0.0, 2, r"\(0, 1\]"), (1.5, 2, r"\(0, 1\]"), (0.2, 2, "runs int"), ("0.5", 2, "number"),
])
def test_bad_strength_rejected(pipe, strength, steps, message):
    image = np.zeros((64, 64, 3), np.uint8)
    with pytest.raises(InputError, match=message):
        pipe("a", image=image, strength=strength, num_inference_steps=steps)


def test_image_rules(pipe):
    from PIL import Image

    rgb = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    reference = pipe("a", image=rgb, strength=1.0, num_inference_steps=1, seed=1, output_type="np")
    # A PIL RGB image of the same content gives the same picture.
    same = pipe("a", image=Image.fromarray(rgb), strength=1.0, num_inference_steps=1, seed=1, output_type="np")
    np.testing.assert_array_equal(reference, same)
    # L is converted to RGB explicitly (grey replicated); RGBA is composited on white.
    grey = Image.fromarray(rgb[..., 0])
    np.testing.assert_array_equal(
        pipe("a", image=grey, strength=1.0, seed=1, output_type="np"),
        pipe("a", image=np.repeat(rgb[..., :1], 3, axis=2), strength=1.0, seed=1, output_type="np"))
    transparent = Image.fromarray(np.dstack([rgb, np.zeros((64, 64), np.uint8)]), "RGBA")
    np.testing.assert_array_equal(
        pipe("a", image=transparent, strength=1.0, seed=1, output_type="np"),
        pipe("a", image=np.full((64, 64, 3), 255, np.uint8), strength=1.0, seed=1, output_type="np"))
    # Same aspect ratio, other size: resized (Lanczos); other aspect ratio: rejected.
    big = Image.fromarray(rgb).resize((128, 128))
    assert pipe("a", image=big, strength=1.0, seed=1, output_type="np").shape == (1, 64, 64, 3)
    with pytest.raises(InputError, match="aspect ratio"):
        pipe("a", image=Image.new("RGB", (128, 64)), strength=1.0)
    with pytest.raises(InputError, match="uint8"):
        pipe("a", image=rgb.astype(np.float32), strength=1.0)
    with pytest.raises(InputError, match="64x64"):
        pipe("a", image=np.zeros((32, 32, 3), np.uint8), strength=1.0)
    with pytest.raises(InputError, match="PIL image or a uint8"):
        pipe("a", image="cat.png", strength=1.0)
    with pytest.raises(InputError, match="mode CMYK"):
        pipe("a", image=Image.new("CMYK", (64, 64)), strength=1.0)


def test_same_seed_same_image_and_pil_output(pipe):
    first = pipe("a red cat", num_inference_steps=2, seed=42, output_type="np")
    again = pipe("a red cat", num_inference_steps=2, seed=42, output_type="np")
    other = pipe("a red cat", num_inference_steps=2, seed=43, output_type="np")
    np.testing.assert_array_equal(first, again)
    assert np.abs(first.astype(int) - other.astype(int)).mean() > 1.0
    (picture,) = pipe("a red cat", num_inference_steps=2, seed=42)
    assert picture.mode == "RGB" and picture.size == (64, 64)
    np.testing.assert_array_equal(np.asarray(picture), first[0])


def test_nan_raises_instead_of_black_image(pipe):
    """Huge (finite) noise overflows FP16 inside the UNet; the decoder's non-finite count catches it."""
    huge = np.full((1, 4, 8, 8), 3e38, np.float32)
    with pytest.raises(NonFiniteOutputError, match="NaN/inf"):
        pipe("a", noise=huge, seed=0)


def test_long_prompt_warns_with_dropped_words(pipe):
    words = " ".join(["cat"] * 80) + " zebra"
    with pytest.warns(PromptTruncated, match="dropped: .*zebra"):
        pipe(words, seed=0, output_type="np")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe("a short prompt", seed=0, output_type="np")


def test_prompt_cache_skips_text_encoder(sd_bundle):
    pipe = TurboPipeline.from_bundle(sd_bundle[0], executor="onnxruntime", cache_size=2)
    first = pipe("a lighthouse", seed=3, output_type="np")
    stats = pipe.executor.cache_stats()
    assert stats == {"hits": 0, "misses": 1, "entries": 1}
    again = pipe("a lighthouse", seed=3, output_type="np")
    assert pipe.executor.cache_stats()["hits"] == 1
    np.testing.assert_array_equal(first, again)
    pipe("b", seed=3, output_type="np")
    pipe("c", seed=3, output_type="np")  # evicts "a lighthouse" (capacity 2)
    pipe("a lighthouse", seed=3, output_type="np")
    assert pipe.executor.cache_stats() == {"hits": 1, "misses": 4, "entries": 2}


def test_threads_serialize_and_forks_share_weights(pipe):
    seeds = list(range(6))
    expected = {s: pipe("a boat", seed=s, output_type="np") for s in seeds}
    results: dict[int, np.ndarray] = {}
    errors: list[BaseException] = []

    def work(my_seeds):
        try:
            for s in my_seeds:
                results[s] = pipe("a boat", seed=s, output_type="np")
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(seeds[i::2],)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for s in seeds:
        np.testing.assert_array_equal(results[s], expected[s])
    fork = pipe.fork()
    assert fork.executor.sessions is pipe.executor.sessions and fork.executor is not pipe.executor
    np.testing.assert_array_equal(fork("a boat", seed=0, output_type="np"), expected[0])


def test_run_stage_imports_no_torch(sd_bundle, tmp_path):
    """Generating with the ONNX Runtime executor works where torch, diffusers and transformers cannot
    be imported at all."""
    env = write_import_blocker(tmp_path, ("torch", "diffusers", "transformers"))
    code = (
        "import sys\n"
        "from turbo_trt.runner import TurboPipeline\n"
        f"pipe = TurboPipeline.from_bundle({str(sd_bundle[0])!r}, executor='onnxruntime')\n"
        "image = pipe('a cat', num_inference_steps=2, seed=0, output_type='np')\n"
        "assert image.shape == (1, 64, 64, 3)\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]\n"
        "assert not bad, bad\n"
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


def test_generate_cli_writes_png_and_noise_reproduces(sd_bundle, tmp_path):
    from PIL import Image

    noise = np.random.default_rng(9).standard_normal((1, 4, 8, 8)).astype(np.float32)
    np.save(tmp_path / "noise.npy", noise)
    outputs = []
    for seed in ("1", "2"):
        out = tmp_path / f"img{seed}.png"
        done = subprocess.run([sys.executable, "-m", "turbo_trt.cli", "generate", "--engines", str(sd_bundle[0]),
                               "--prompt", "a cat", "--noise", str(tmp_path / "noise.npy"), "--seed", seed,
                               "--out", str(out)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        outputs.append(np.asarray(Image.open(out)))
    np.testing.assert_array_equal(outputs[0], outputs[1])  # the given noise, not the seed, decides
    done = subprocess.run([sys.executable, "-m", "turbo_trt.cli", "generate", "--engines", str(tmp_path / "none"),
                           "--prompt", "a", "--out", str(tmp_path / "x.png")], capture_output=True, text=True)
    assert done.returncode == 2 and "not a directory" in done.stderr and "Traceback" not in done.stderr
