"""ControlNets fused into the UNet graph: build, parity with diffusers' ControlNet pipelines, input rules.

Bundles (tests/conftest.py, built once per session): tiny-sd-turbo with two nets, tiny-sdxl-turbo with one,
each an incremental rebuild of the plain session bundle with real TensorRT-RTX engines. The nets are
`ControlNetModel.from_unet` of the preset's UNet with every weight moved by seeded noise and seeded non-zero
output convolutions (from_unet zero-initializes those: an all-zero net would add nothing and prove nothing);
each test that compares with diffusers also checks that the nets changed the picture.

Parity: the bundle runs through the ONNX Runtime executor against diffusers'
StableDiffusionControlNetPipeline / StableDiffusionControlNetImg2ImgPipeline /
StableDiffusionXLControlNetPipeline (MultiControlNetModel for two nets) on the same FP32 weights and noise,
with the tolerance of test_runner_parity.py (FP16 graphs against FP32: at most 2 levels, mean < 0.25).
"""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from turbo_trt.builder import sources
from turbo_trt.builder.controlnet import check_controlnet_fits
from turbo_trt.errors import InputError, SourceError
from turbo_trt.runner import TurboPipeline
from turbo_trt.runner.inputs import Noise, check_image

from .conftest import TINY_SIZE, quiet_build, tiny_options
from .test_runner_parity import _ours_vs_reference

PROMPT = "a red cat sitting on a green sofa"
SIZE = TINY_SIZE


def _edges(seed: int):
    from PIL import Image

    from turbo_trt.builder.validation_inputs import edge_map

    return Image.fromarray(edge_map(np.random.default_rng(seed), 1, SIZE, SIZE)[0])


@pytest.fixture(scope="module")
def sd_setup(sd_control_bundle, sd_bundle):
    from diffusers import ControlNetModel

    bundle, report, dirs = sd_control_bundle
    reference = sources.load_pipeline(sources.resolve_source("tiny-sd-turbo"))
    nets = [ControlNetModel.from_pretrained(d).eval() for d in dirs]
    ours = TurboPipeline.from_bundle(bundle, executor="onnxruntime")
    plain = TurboPipeline.from_bundle(sd_bundle[0], executor="onnxruntime")
    return ours, plain, reference, nets, report


def _sd_reference(reference, nets, img2img: bool):
    from diffusers import (
        MultiControlNetModel,
        StableDiffusionControlNetImg2ImgPipeline,
        StableDiffusionControlNetPipeline,
    )

    cls = StableDiffusionControlNetImg2ImgPipeline if img2img else StableDiffusionControlNetPipeline
    controlnet = nets[0] if len(nets) == 1 else MultiControlNetModel(nets)
    pipe = cls(vae=reference.vae, text_encoder=reference.text_encoder, tokenizer=reference.tokenizer,
               unet=reference.unet, controlnet=controlnet, scheduler=reference.scheduler, safety_checker=None,
               feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _txt2img_noise(seed: int):
    import torch

    return torch.randn((1, 4, SIZE // 8, SIZE // 8), generator=torch.Generator().manual_seed(seed))


def test_build_fuses_the_nets_and_rebuilds_only_the_unet(sd_control_bundle):
    bundle, report, dirs = sd_control_bundle
    assert report.exported == ["unet"] and report.engines_built == ["unet"]
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["shapes"]["controlnets"] == 2
    records = manifest["controlnets"]
    assert [r["id"] for r in records] == [str(d) for d in dirs]
    assert all(r["kind"] == "local" and r["conditioning_channels"] == 3 and len(r["fingerprint"]) == 64
               for r in records)
    assert records[0]["fingerprint"] != records[1]["fingerprint"]
    unet = manifest["components"]["unet"]
    inputs = {t["name"]: t for t in unet["inputs"]}
    assert inputs["control_image"]["shape"] == [2, 1, SIZE, SIZE, 3] and inputs["control_image"]["dtype"] == "uint8"
    assert inputs["control_scale"]["shape"] == [2] and inputs["control_scale"]["dtype"] == "float32"
    assert unet["validation"]["outputs"]["next_latents"]["rel_error"] < 0.05
    assert (bundle / unet["engine"]).stat().st_size > 0  # a real TensorRT-RTX engine of the fused UNet


# (steps, scales, start, end): two nets at 1.0 / 0.5; scale 0.5 on both over 4 steps with windows that switch
# each net off for half the runs
SD_CASES = [(1, [1.0, 0.5], 0.0, 1.0), (4, [0.5, 0.5], [0.0, 0.5], [0.5, 1.0])]


@pytest.mark.parametrize("steps,scales,start,end", SD_CASES)
def test_sd_two_nets_match_diffusers(sd_setup, steps, scales, start, end):
    ours, plain, reference, nets, _ = sd_setup
    images = [_edges(1), _edges(2)]
    latents = _txt2img_noise(7)
    expected = _sd_reference(reference, nets, img2img=False)(
        PROMPT, image=images, num_inference_steps=steps, guidance_scale=0.0, latents=latents.clone(), height=SIZE,
        width=SIZE, output_type="np", controlnet_conditioning_scale=scales, control_guidance_start=start,
        control_guidance_end=end).images
    plan = ours.plan(steps, None)
    control = ours.control(plan, images, scales, start, end)
    got = ours.run_with_noise([PROMPT], plan, Noise(latents=latents.numpy()), None, control)
    _ours_vs_reference(got, expected)
    without = plain.run_with_noise([PROMPT], plan, Noise(latents=latents.numpy()), None)
    # the nets steer the picture: on average by more than the 1 level that separates the two FP16 exports at
    # scale 0 at most (test_without_control_image_is_the_plain_bundle)
    assert np.abs(without.astype(int) - got.astype(int)).mean() > 1.0


def test_one_net_of_two_at_scale_0_is_the_single_net_pipeline(sd_setup):
    """Net 1 at scale 0 adds exact zeros: diffusers' single-ControlNet pipeline with net 0 alone."""
    ours, _, reference, nets, _ = sd_setup
    image = _edges(3)
    latents = _txt2img_noise(9)
    expected = _sd_reference(reference, nets[:1], img2img=False)(
        PROMPT, image=image, num_inference_steps=2, guidance_scale=0.0, latents=latents.clone(), height=SIZE,
        width=SIZE, output_type="np", controlnet_conditioning_scale=1.0).images
    got = ours(PROMPT, num_inference_steps=2, noise=latents.numpy(), seed=0, output_type="np",
               control_image=[image, _edges(4)], controlnet_conditioning_scale=[1.0, 0.0])
    _ours_vs_reference(got, expected)


def test_sd_img2img_matches_diffusers(sd_setup):
    import torch
    from PIL import Image

    ours, _, reference, nets, _ = sd_setup
    init = Image.fromarray(np.random.default_rng(5).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8))
    images = [_edges(5), _edges(6)]
    steps, strength, scales, end = 4, 0.5, [1.0, 0.5], [1.0, 0.5]  # 2 runs; net 1 acts on the first only
    generator = torch.Generator().manual_seed(11)
    expected = _sd_reference(reference, nets, img2img=True)(
        PROMPT, image=init, control_image=images, num_inference_steps=steps, strength=strength, guidance_scale=0.0,
        output_type="np", generator=generator, controlnet_conditioning_scale=scales, control_guidance_end=end).images
    generator = torch.Generator().manual_seed(11)
    shape = (1, 4, SIZE // 8, SIZE // 8)
    sample, latents = (torch.randn(shape, generator=generator).numpy() for _ in range(2))
    plan = ours.plan(steps, strength)
    control = ours.control(plan, images, scales, 0.0, end)
    np.testing.assert_array_equal(control.scales, [[1.0, 0.5], [1.0, 0.0]])
    got = ours.run_with_noise([PROMPT], plan, Noise(latents=latents, sample=sample), check_image(init, SIZE, SIZE, 1),
                              control)
    _ours_vs_reference(got, expected)


def test_without_control_image_is_the_plain_bundle(sd_setup):
    """No control image: every net at scale 0, the plain UNet's image (the fused graph adds exact zeros;
    the two graphs are separate FP16 exports, so allow a level of rounding)."""
    ours, plain, *_ = sd_setup
    for steps in (1, 4):
        got = ours(PROMPT, num_inference_steps=steps, seed=3, output_type="np")
        want = plain(PROMPT, num_inference_steps=steps, seed=3, output_type="np")
        assert np.abs(got.astype(int) - want.astype(int)).max() <= 1


def test_bad_control_inputs_fail_before_anything_runs(sd_setup):
    ours, plain, *_ = sd_setup
    image = _edges(1)
    calls = {"n": 0}
    original = ours.executor.run

    def counting(*args, **kwargs):
        calls["n"] += 1
        return original(*args, **kwargs)

    ours.executor.run = counting  # counts real runs; nothing may reach the executor below
    try:
        cases = [
            (dict(control_image=image), "1 control image(s) for a bundle with 2 ControlNet"),
            (dict(control_image=[image, image], controlnet_conditioning_scale=[1.0]), "has 1 values"),
            (dict(control_image=[image, image], controlnet_conditioning_scale=[1.0, float("nan")]), "finite"),
            (dict(control_image=[image, np.zeros((SIZE, SIZE * 2, 3), np.uint8)]), "control_image[1]"),
            (dict(control_image=[image, image], control_guidance_start=0.6, control_guidance_end=0.5), "smaller"),
            (dict(control_image=[image, image], control_guidance_end=1.5), "within [0, 1]"),
            (dict(controlnet_conditioning_scale=0.5), "without control_image"),
        ]
        for kwargs, message in cases:
            with pytest.raises(InputError, match=re.escape(message)):
                ours(PROMPT, seed=0, **kwargs)
    finally:
        del ours.executor.run
    assert calls["n"] == 0
    with pytest.raises(InputError, match="has no ControlNet"):
        plain(PROMPT, seed=0, control_image=image)


def test_sdxl_net_matches_diffusers(sdxl_control_bundle, sdxl_bundle):
    import torch
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    bundle, report, dirs = sdxl_control_bundle
    assert report.exported == ["unet"] and report.engines_built == ["unet"]
    reference = sources.load_pipeline(sources.resolve_source("tiny-sdxl-turbo"))
    pipe = StableDiffusionXLControlNetPipeline(
        vae=reference.vae, text_encoder=reference.text_encoder, text_encoder_2=reference.text_encoder_2,
        tokenizer=reference.tokenizer, tokenizer_2=reference.tokenizer_2, unet=reference.unet,
        controlnet=ControlNetModel.from_pretrained(dirs[0]).eval(), scheduler=reference.scheduler,
        force_zeros_for_empty_prompt=True, add_watermarker=False)
    pipe.set_progress_bar_config(disable=True)
    ours = TurboPipeline.from_bundle(bundle, executor="onnxruntime")
    plain = TurboPipeline.from_bundle(sdxl_bundle[0], executor="onnxruntime")
    image = _edges(8)
    shape = (1, 4, SIZE // 8, SIZE // 8)
    assert ours.scheduler["ancestral"]  # SDXL-Turbo's Euler-ancestral: diffusers draws one noise per step too
    for steps, scale, end in ((1, 0.5, 1.0), (4, 1.0, 0.5)):
        generator = torch.Generator().manual_seed(13)
        latents = torch.randn(shape, generator=generator)
        expected = pipe(PROMPT, image=image, num_inference_steps=steps, guidance_scale=0.0, latents=latents.clone(),
                        height=SIZE, width=SIZE, output_type="np", controlnet_conditioning_scale=scale,
                        control_guidance_end=end, generator=generator).images
        generator = torch.Generator().manual_seed(13)
        plan = ours.plan(steps, None)
        noise = Noise(latents=torch.randn(shape, generator=generator).numpy(),
                      steps=[torch.randn(shape, generator=generator).numpy() for _ in range(plan.runs)])
        got = ours.run_with_noise([PROMPT], plan, noise, None, ours.control(plan, image, scale, 0.0, end))
        _ours_vs_reference(got, expected)
        without = plain.run_with_noise([PROMPT], plan, noise, None)
        steer = np.abs(without.astype(int) - got.astype(int))
        # the net steers the picture: beyond the 1 level of rounding that separates the two exports at scale 0
        # (test_without_control_image_is_the_plain_bundle). With the net off for the last 2 of 4 runs the
        # trained UNet pulls most of the picture back (measured: mean 0.19, max 5 levels; 1 step: 1.4, 47).
        assert steer.max() >= 4 and steer.mean() > 0.1, (steer.max(), steer.mean())


def test_onnxruntime_cuda_bindings_carry_the_control_inputs(sd_setup):
    """The ONNX Runtime CUDA executor's fixed bindings (run on the CPU provider here) give the CPU executor's
    image, with a scale that differs per step position."""
    from turbo_trt.runner.executors.onnxruntime_cuda import OnnxRuntimeCudaExecutor
    from turbo_trt.runner.inputs import latent_shape, make_noise

    ours, *_ = sd_setup
    bound = OnnxRuntimeCudaExecutor(ours.bundle, device="cpu")
    ids = ours.token_ids([PROMPT])
    for steps, strength in ((4, None), (4, 0.75)):
        plan = ours.plan(steps, strength)
        control = ours.control(plan, [_edges(1), _edges(2)], [1.0, 0.5], [0.0, 0.25], [0.5, 1.0])
        noise = make_noise(5, latent_shape(ours.shapes), strength is not None, 0)
        init = check_image(_edges(9), SIZE, SIZE, 1) if strength else None
        want, _ = ours.executor.run(ids, plan, noise, init, control)
        got, _ = bound.run(ids, plan, noise, init, control)
        np.testing.assert_array_equal(got, want)
        off, _ = bound.run(ids, plan, noise, init)  # no control: scale 0 everywhere
        np.testing.assert_array_equal(off, ours.executor.run(ids, plan, noise, init)[0])
        assert not np.array_equal(off, got)


def test_unfit_nets_are_refused_before_export(sd_control_bundle, tmp_path):
    _, _, dirs = sd_control_bundle
    sd = sources.part_configs(sources.resolve_source("tiny-sd-turbo"))["unet"]
    xl = sources.part_configs(sources.resolve_source("tiny-sdxl-turbo"))["unet"]
    net = json.loads((dirs[0] / "config.json").read_text())
    check_controlnet_fits(net, sd, "sd", 8, "net")  # fits
    cases = [
        (net, xl, "sdxl", "SD 1.x/2.x ControlNet"),
        ({**net, "cross_attention_dim": 1024}, sd, "sd", "cross-attention width .* is 1024, the UNet's is 32"),
        ({**net, "in_channels": 16}, sd, "sd", "latent channels .* is 16"),
        ({**net, "block_out_channels": [32, 64, 128]}, sd, "sd", "down-block widths"),
        ({**net, "conditioning_embedding_out_channels": [16, 32]}, sd, "sd", "down-sampled by 2 .*latents by 8"),
        ({**net, "conditioning_channels": 1}, sd, "sd", "1 conditioning channels"),
    ]
    for config, unet, family, message in cases:
        with pytest.raises(SourceError, match=message):
            check_controlnet_fits(config, unet, family, 8, "net")
    # through build(): refused while reading configs, before anything is loaded or exported
    bad = shutil.copytree(dirs[0], tmp_path / "wide")
    (bad / "config.json").write_text(json.dumps({**net, "cross_attention_dim": 1024}))
    out = tmp_path / "bundle"
    with pytest.raises(SourceError, match=r"--controlnet .*wide \(net 1\): cross-attention width"):
        quiet_build(tiny_options("tiny-sd-turbo", out, controlnets=(str(dirs[0]), str(bad))))
    assert not (out / "onnx").exists()


def test_generate_cli_control_image(sd_control_bundle, tmp_path, capsys):
    from turbo_trt.cli import main

    bundle, _, _ = sd_control_bundle
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"edges{i}.png")
        _edges(i + 1).save(paths[-1])
    out = tmp_path / "out.png"
    args = ["generate", "--engines", str(bundle), "--prompt", PROMPT, "--seed", "4", "--executor", "onnxruntime",
            "--steps", "2", "--out", str(out), "--control-image", f"{paths[0]}:0.5", "--control-image", str(paths[1]),
            "--control-end", "0.5"]
    assert main(args) == 0
    from PIL import Image

    pipe = TurboPipeline.from_bundle(bundle, executor="onnxruntime")
    want = pipe(PROMPT, num_inference_steps=2, seed=4, output_type="np", control_image=[_edges(1), _edges(2)],
                controlnet_conditioning_scale=[0.5, 1.0], control_guidance_end=0.5)[0]
    np.testing.assert_array_equal(np.asarray(Image.open(out)), want)
    assert main(args[:-6] + ["--control-image", str(paths[0])]) != 0  # one image for two nets
    assert "1 control image(s) for a bundle with 2 ControlNet(s)" in capsys.readouterr().err


def test_lora_swapped_on_a_controlnet_bundle_matches_diffusers(sd_control_bundle, tmp_path):
    """A refittable ControlNet bundle: the weight map covers the UNet inside the fused graph (not the nets,
    which diffusers' LoRA loading leaves alone too); a swapped LoRA matches diffusers' fuse_lora on the
    ControlNet pipeline, and removing it restores the base bit for bit."""
    import torch

    from turbo_trt.builder.engine import EngineOptions

    from .conftest import copy_bundle
    from .test_lora import TE_TARGETS, UNET_TARGETS, _save_lora

    bundle, _, dirs = sd_control_bundle
    refit = copy_bundle(bundle, tmp_path / "refit")
    report = quiet_build(tiny_options("tiny-sd-turbo", refit, onnx_only=True, engine=EngineOptions(refittable=True),
                                      controlnets=tuple(str(d) for d in dirs)))
    assert set(report.exported) == {"unet", "text_encoder"}  # the graphs LoRAs touch, now with weight maps
    weight_map = json.loads((refit / "onnx" / "unet.weights.json").read_text())
    assert weight_map["modules"] and all(not path.startswith("controlnet") for path in weight_map["modules"])
    lora = _save_lora("tiny-sd-turbo", tmp_path / "lora", 3, UNET_TARGETS, TE_TARGETS, rank=4, alpha=8)

    from diffusers import ControlNetModel

    reference = sources.load_pipeline(sources.resolve_source("tiny-sd-turbo"))
    reference.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="style")
    reference.fuse_lora(adapter_names=["style"], lora_scale=0.7)
    reference.unload_lora_weights()
    nets = [ControlNetModel.from_pretrained(d).eval() for d in dirs]
    images = [_edges(1), _edges(2)]
    latents = _txt2img_noise(21)
    expected = _sd_reference(reference, nets, img2img=False)(
        PROMPT, image=images, num_inference_steps=2, guidance_scale=0.0, latents=latents.clone(), height=SIZE,
        width=SIZE, output_type="np", controlnet_conditioning_scale=[1.0, 0.5]).images

    pipe = TurboPipeline.from_bundle(refit, executor="onnxruntime")
    call = dict(num_inference_steps=2, seed=0, noise=latents.numpy(), output_type="np", control_image=images,
                controlnet_conditioning_scale=[1.0, 0.5])
    base = pipe(PROMPT, **call)
    pipe.set_loras({lora: 0.7})
    _ours_vs_reference(pipe(PROMPT, **call), expected)
    pipe.set_loras({})
    np.testing.assert_array_equal(pipe(PROMPT, **call), base)
    assert torch.is_grad_enabled()  # nothing above left autograd switched off for later tests


def test_serve_request_rules_for_control_inputs(sd_setup, sd_bundle):
    from turbo_trt.runner.serving.requests import ModelFacts, RequestError, decode_request

    ours, plain, *_ = sd_setup
    facts = ModelFacts.of(ours)
    images = np.stack([np.asarray(_edges(1)), np.asarray(_edges(2))])
    good = decode_request({"prompt": b"a cat", "control_image": images[None], "control_scale": np.array([[0.5, 1.0]],
                                                                                                        np.float32)}, facts)
    assert good.control_scale == (0.5, 1.0) and good.control_image.shape == (2, SIZE, SIZE, 3)
    assert decode_request({"prompt": b"a cat"}, facts).control_scale == (0.0, 0.0)
    cases = [
        ({"control_scale": np.array([1.0, 1.0], np.float32)}, "control_scale: given without control_image"),
        ({"control_image": images[:1]}, "control_image: must be UINT8 [2, 64, 64, 3]"),
        ({"control_image": images, "control_scale": np.array([1.0], np.float32)}, "control_scale: must be FP32 [2]"),
        ({"control_image": images, "control_scale": np.array([1.0, np.inf], np.float32)},
         "control_scale: control_scale[1] must be a finite number"),
    ]
    for extra, message in cases:
        with pytest.raises(RequestError, match=re.escape(message)):
            decode_request({"prompt": b"a cat", **extra}, facts)
    with pytest.raises(RequestError, match="control_image: this bundle has no ControlNet"):
        decode_request({"prompt": b"a cat", "control_image": images}, ModelFacts.of(plain))


def test_serve_controlnet_bundle(sd_control_bundle, tmp_path):
    """`turbo-trt serve` on a ControlNet bundle: control inputs give the direct call's image, a request
    without them the nets-off image, and a bad control request fails while serving goes on."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    from turbo_trt.runner.serving.client import request_inputs

    from .test_serve import Server, infer, serve_argv

    bundle = sd_control_bundle[0]
    pipe = TurboPipeline.from_bundle(bundle, executor="onnxruntime")
    images = np.stack([np.asarray(_edges(1)), np.asarray(_edges(2))])
    server = Server(serve_argv(bundle), tmp_path / "log.txt")
    try:
        server.wait_ready()
        client = server.http_client()
        served = infer(client, httpclient, prompt="a cat", seed=5, steps=2, control_image=images,
                       control_scale=[1.0, 0.5])
        direct = pipe("a cat", num_inference_steps=2, seed=5, output_type="np", control_image=list(images),
                      controlnet_conditioning_scale=[1.0, 0.5])[0]
        np.testing.assert_array_equal(served, direct)
        off = infer(client, httpclient, prompt="a cat", seed=5, steps=2)
        np.testing.assert_array_equal(off, pipe("a cat", num_inference_steps=2, seed=5, output_type="np")[0])
        with pytest.raises(InferenceServerException, match="control_scale"):
            client.infer("turbo", request_inputs(httpclient, "a cat", control_image=images, control_scale=[1.0, np.nan]))
        np.testing.assert_array_equal(infer(client, httpclient, prompt="a cat", seed=5, steps=2, control_image=images,
                                            control_scale=[1.0, 0.5]), direct)
        client.close()
    finally:
        server.stop()


def test_stream_takes_a_control_image_per_frame_and_makes_canny_edges(sd_setup):
    """The frame stream on a ControlNet bundle: an explicit control image per frame, and control="canny"
    (each frame's own Canny edges, given to every net), each equal bit for bit to the direct call with the
    same control images; bad control inputs raise at push and queue nothing."""
    from turbo_trt.runner.preprocess import CannyEdges
    from turbo_trt.runner.stream import StreamInputError

    from .conftest import smooth_frame

    ours, plain, *_ = sd_setup
    frame = np.asarray(smooth_frame(5))
    control = [_edges(7), _edges(8)]
    scales = [0.8, 0.5]
    with ours.stream(PROMPT, steps=2, strength=0.5, seed=11, controlnet_conditioning_scale=scales) as stream:
        stream.push(frame, control_image=control)
        got = stream.get(timeout=120)
        with pytest.raises(StreamInputError, match="control_image"):
            stream.push(frame, control_image=control[:1])
        assert stream.stats()["pushed"] == 1
    want = ours(PROMPT, image=frame, strength=0.5, num_inference_steps=2, seed=11, control_image=control,
                controlnet_conditioning_scale=scales, output_type="np")[0]
    assert got is not None and np.array_equal(got.image, want)
    without = ours(PROMPT, image=frame, strength=0.5, num_inference_steps=2, seed=11, output_type="np")[0]
    assert not np.array_equal(want, without)  # the nets changed the picture

    edges = CannyEdges()(frame)
    assert 0 < int((edges > 0).sum()) < edges.size  # a real edge map: some edges, not all
    with ours.stream(PROMPT, steps=2, strength=0.5, seed=11, control="canny") as stream:
        stream.push(frame)
        got = stream.get(timeout=120)
    want = ours(PROMPT, image=frame, strength=0.5, num_inference_steps=2, seed=11, control_image=[edges, edges],
                output_type="np")[0]
    assert got is not None and np.array_equal(got.image, want)
    with pytest.raises(StreamInputError, match="no ControlNet"):
        plain.stream(PROMPT, control="canny")
