"""LoRA: baked in at build time (`--lora`) or swapped at run time (`--refittable`, `pipe.set_loras`).

LoRAs are made in code with peft on the tiny presets (UNet and text encoder) and saved the way diffusers
saves them (`save_lora_weights`, with the adapter metadata that carries lora_alpha); a kohya copy renames
the keys. The reference is diffusers' own `load_lora_weights` + `fuse_lora` on the FP32 pipeline, with the
same noise: the parity tests' tolerance applies (at most 2 of 255 levels per pixel, mean below 0.25 level;
see test_runner_parity.py: the bundle's graphs are FP16, the reference FP32).

Bundles: one refittable tiny SD bundle with real TensorRT-RTX engines (proves the REFIT build; its ONNX
graphs and weight maps run here with ONNX Runtime), one --onnx-only bundle with two LoRAs baked in. The
TensorRT refit code needs a GPU to run; it is type-checked here against TensorRT-RTX's own API.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import quiet_build, tiny_options
from turbo_trt.builder import sources
from turbo_trt.builder.engine import EngineOptions
from turbo_trt.runner import TurboPipeline
from turbo_trt.runner.inputs import Noise
from turbo_trt.runner.lora import LoraError, LoraWarning, parse_lora_argument, read_safetensors

PROMPT = "a photo of an astronaut riding a horse on mars"
MAX_LEVELS = 2
MAX_MEAN = 0.25
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _save_lora(model: str, path: Path, seed: int, unet_targets: list[str], te_targets: list[str] | None,
               rank: int, alpha: float, te2: bool = False) -> Path:
    """A LoRA made with peft on a fresh tiny pipeline, its A/B weights drawn from a seeded generator,
    saved with diffusers' save_lora_weights (lora_alpha travels in the adapter metadata). The draws have
    std 0.1: at 0.2 the trained presets were pushed off their training distribution, where their sharp
    decoder turns the FP16 engines' rounding into up to 9 levels against FP32 diffusers (0.1: at most 1)."""
    import torch
    from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

    pipe = sources.load_pipeline(sources.resolve_source(model))
    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, object] = {}
    for part, targets in (("unet", unet_targets), ("text_encoder", te_targets),
                          ("text_encoder_2", te_targets if te2 else None)):
        if not targets:
            continue
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets)
        module = inject_adapter_in_model(config, getattr(pipe, part))
        with torch.no_grad():
            for name, param in module.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.1)
        layers[f"{part}_lora_layers"] = get_peft_model_state_dict(module)
        layers[f"{part}_lora_adapter_metadata"] = config.to_dict()
    pipe.save_lora_weights(str(path), **layers)
    return path / "pytorch_lora_weights.safetensors"


def _save_safetensors(tensors: dict[str, np.ndarray], path: Path, metadata: dict[str, str] | None = None) -> Path:
    from safetensors.numpy import save_file

    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _to_kohya(source: Path, dest: Path, rank_alpha: dict[str, float]) -> Path:
    """The same LoRA with kohya (sd-scripts) names: lora_unet_/lora_te_ prefixes, underscores for dots,
    lora_down/lora_up, and an explicit alpha per module."""
    tensors, _ = read_safetensors(source)
    out: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        module, role = rest.rsplit(".lora_", 1)
        prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}[part]
        name = prefix + ("text_model." + module if part == "text_encoder" else module).replace(".", "_")
        out[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value
        out[f"{name}.alpha"] = np.array(rank_alpha[part], np.float32)
    return _save_safetensors(out, dest)


@pytest.fixture(scope="module")
def loras(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loras")
    style = _save_lora("tiny-sd-turbo", root / "style", 1, UNET_TARGETS, TE_TARGETS, rank=4, alpha=8)
    detail = _save_lora("tiny-sd-turbo", root / "detail", 2, ["to_q", "to_v", "proj_in", "ff.net.2"], None, rank=2, alpha=2)
    kohya = _to_kohya(style, root / "style-kohya.safetensors", {"unet": 8.0, "text_encoder": 8.0})
    return {"style": style, "detail": detail, "kohya": kohya}


# refit_bundle (refittable ONNX graphs with their weight maps; engines: see test_refittable_engine_build)
# is the session fixture in conftest.py, shared with test_serve.py.


@pytest.fixture(scope="module")
def baked_bundle(tmp_path_factory: pytest.TempPathFactory, loras: dict[str, Path]) -> Path:
    out = tmp_path_factory.mktemp("lora-bundles") / "baked"
    quiet_build(tiny_options("tiny-sd-turbo", out, onnx_only=True,
                             loras=((str(loras["style"]), 0.5), (str(loras["detail"]), 1.0))))
    return out


@pytest.fixture(scope="module")
def pipe(refit_bundle: Path) -> TurboPipeline:
    return TurboPipeline.from_bundle(refit_bundle, executor="onnxruntime")


def _noise(size: int) -> Noise:
    return Noise(latents=np.random.default_rng(7).standard_normal((1, 4, size // 8, size // 8)).astype(np.float32))


def _images(pipe: TurboPipeline, steps: int = 2) -> np.ndarray:
    return pipe.run_with_noise([PROMPT], pipe.plan(steps, None), _noise(pipe.shapes["height"]), None)


def _diffusers_images(adapters: dict[str, tuple[Path, float]], size: int, steps: int = 2) -> np.ndarray:
    """diffusers' reference: load_lora_weights for each LoRA, fuse_lora at its scale, same noise."""
    import torch
    from diffusers import AutoPipelineForText2Image

    reference = sources.load_pipeline(sources.resolve_source("tiny-sd-turbo"))
    for name, (path, _) in adapters.items():
        reference.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    if adapters:
        reference.set_adapters(list(adapters), adapter_weights=[scale for _, scale in adapters.values()])
        reference.fuse_lora(adapter_names=list(adapters), lora_scale=1.0)
        reference.unload_lora_weights()
    text2img = AutoPipelineForText2Image.from_pipe(reference)
    latents = torch.from_numpy(_noise(size).latents.copy())
    images = text2img(PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=latents, height=size,
                      width=size, output_type="np").images
    return (images * 255).round().astype(np.int32)


def _close_to(ours: np.ndarray, reference: np.ndarray) -> None:
    diff = np.abs(ours.astype(np.int32) - reference)
    assert diff.max() <= MAX_LEVELS, f"max diff {diff.max()} levels"
    assert diff.mean() < MAX_MEAN, f"mean diff {diff.mean():.3f} levels"
    assert ours.std() > 1.0


# --- parsing and reading (no bundle) -----------------------------------------------------------------------

def test_lora_argument_parsing():
    assert parse_lora_argument("a/b.safetensors") == ("a/b.safetensors", 1.0)
    assert parse_lora_argument("a/b.safetensors:0.5") == ("a/b.safetensors", 0.5)
    assert parse_lora_argument("owner/name:-1") == ("owner/name", -1.0)
    assert parse_lora_argument("C:thing") == ("C:thing", 1.0)
    for bad in ("nan", "inf", "-inf"):
        with pytest.raises(LoraError, match="finite"):
            parse_lora_argument(f"a/b.safetensors:{bad}")


def test_non_finite_scale_fails_the_build_before_export(loras, tmp_path):
    with pytest.raises(LoraError, match="finite"):
        quiet_build(tiny_options("tiny-sd-turbo", tmp_path / "nan", onnx_only=True,
                                 loras=((str(loras["style"]), float("nan")),)))
    assert not (tmp_path / "nan" / "onnx").exists()


def test_safetensors_with_bad_offsets_names_the_file(loras, tmp_path):
    data = loras["style"].read_bytes()
    (size,) = np.frombuffer(data[:8], "<u8")
    header = json.loads(data[8:8 + int(size)])
    key = next(k for k in header if k != "__metadata__")
    header[key]["data_offsets"] = [0, len(data) * 2]  # past the end of the file
    damaged = tmp_path / "damaged.safetensors"
    raw = json.dumps(header).encode()
    damaged.write_bytes(len(raw).to_bytes(8, "little") + raw + data[8 + int(size):])
    with pytest.raises(LoraError, match=rf"damaged\.safetensors: tensor {re.escape(key)} .*outside"):
        read_safetensors(damaged)


def test_alpha_pattern_matches_either_text_encoder_name_and_alternatives():
    """PEFT's alpha_pattern is written against the model's own module names; for a text encoder under
    transformers 4 that includes `text_model.`, which our module paths drop. A `|` in a pattern applies to
    the whole pattern."""
    from turbo_trt.runner.lora import _alpha_for

    module = "encoder.layers.0.self_attn.k_proj"
    peft = {"text_encoder": {"lora_alpha": 8, "alpha_pattern": {"text_model.encoder.layers.0.self_attn.k_proj": 2}}}
    assert _alpha_for("text_encoder", module, 4, None, peft) == 2.0
    assert _alpha_for("text_encoder", "encoder.layers.1.self_attn.k_proj", 4, None, peft) == 8.0
    peft = {"text_encoder": {"alpha_pattern": {"layers.0.self_attn.k_proj": 3}}}
    assert _alpha_for("text_encoder", module, 4, None, peft) == 3.0
    peft = {"unet": {"lora_alpha": 8, "alpha_pattern": {"to_q|to_k": 1}}}
    assert _alpha_for("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_k", 4, None, peft) == 1.0
    assert _alpha_for("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_q", 4, None, peft) == 1.0
    assert _alpha_for("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.xto_k", 4, None, peft) == 8.0
    assert _alpha_for("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v", 4, None, peft) == 8.0
    assert _alpha_for("unet", "mid_block.attentions.0.transformer_blocks.0.attn1.to_v", 4, 5.0, peft) == 5.0


def _diffusers_to_ldm(module: str, layers: int, with_attention: set[int]) -> str:
    """The original SD checkpoint's (kohya SDXL) name of a diffusers UNet module, underscored: written
    from the checkpoint layout (conv_in, ResBlocks in_layers/emb_layers/out_layers/skip_connection, ...)."""
    top = {"conv_in": "input_blocks_0_0", "conv_out": "out_2", "time_embedding.linear_1": "time_embed_0",
           "time_embedding.linear_2": "time_embed_2", "add_embedding.linear_1": "label_emb_0_0",
           "add_embedding.linear_2": "label_emb_0_2"}
    resnet = {"conv1": "in_layers_2", "time_emb_proj": "emb_layers_1", "conv2": "out_layers_3",
              "conv_shortcut": "skip_connection"}
    if module in top:
        return top[module]
    bits = module.split(".")
    if bits[0] == "mid_block":
        head = f"middle_block_{2 * int(bits[2])}" if bits[1] == "resnets" else "middle_block_1"
        tail = resnet[bits[3]] if bits[1] == "resnets" else "_".join(bits[3:])
        return f"{head}_{tail}"
    level, kind, index = int(bits[1]), bits[2], int(bits[3])
    rest = bits[4:]
    if bits[0] == "down_blocks":
        if kind == "downsamplers":
            return f"input_blocks_{(level + 1) * (layers + 1)}_0_op"
        n = 1 + level * (layers + 1) + index
    else:
        if kind == "upsamplers":
            return f"output_blocks_{level * (layers + 1) + layers}_{2 if level in with_attention else 1}_conv"
        n = level * (layers + 1) + index
    if kind == "resnets":
        return f"{'input' if bits[0] == 'down_blocks' else 'output'}_blocks_{n}_0_{resnet[rest[0]]}"
    return f"{'input' if bits[0] == 'down_blocks' else 'output'}_blocks_{n}_1_{'_'.join(rest)}"


@pytest.mark.parametrize("model,family", [("tiny-sd-turbo", "sd"), ("tiny-sdxl-turbo", "sdxl")])
def test_kohya_original_checkpoint_names_reach_every_unet_layer(model, family, tmp_path):
    """A kohya LoRA in the original checkpoint's naming on every Linear / Conv of the UNet (ResNets, samplers,
    embeddings, attention) resolves to exactly those modules; an unmapped layer of that naming is named as
    such in the error."""
    from turbo_trt.builder.lora_bake import module_shapes
    from turbo_trt.runner.lora import load_lora

    pipe = sources.load_pipeline(sources.resolve_source(model))
    shapes = module_shapes(pipe)
    unet = shapes["unet"]
    layers = 1 + max(int(name.split(".")[3]) for name in unet if name.startswith("down_blocks.0.resnets."))
    with_attention = {int(name.split(".")[1]) for name in unet if name.startswith("up_blocks.") and ".attentions." in name}
    rng = np.random.default_rng(0)
    tensors: dict[str, np.ndarray] = {}
    for module, shape in unet.items():
        name = "lora_unet_" + _diffusers_to_ldm(module, layers, with_attention)
        tensors[f"{name}.lora_down.weight"] = rng.standard_normal((1, shape[1], *shape[2:])).astype(np.float32)
        up_shape = (shape[0], 1, *((1, 1) if len(shape) == 4 else ()))
        tensors[f"{name}.lora_up.weight"] = rng.standard_normal(up_shape).astype(np.float32)
    lora = load_lora(_save_safetensors(tensors, tmp_path / "ldm.safetensors"), family, shapes)
    assert {module for _, module in lora.layers} == set(unet)
    assert any(".resnets." in m for _, m in lora.layers) and any("samplers" in m for _, m in lora.layers)

    bad = {"lora_unet_input_blocks_1_0_in_layers_0.lora_down.weight": np.zeros((1, 4), np.float32),
           "lora_unet_input_blocks_1_0_in_layers_0.lora_up.weight": np.zeros((4, 1), np.float32)}
    with pytest.raises(LoraError, match=r"in_layers_0.*original SD checkpoint's UNet naming.*convert the LoRA"):
        load_lora(_save_safetensors(bad, tmp_path / "norm.safetensors"), family, shapes)


def test_safetensors_reader_matches_the_library(loras):
    from safetensors.numpy import load_file

    ours, metadata = read_safetensors(loras["style"])
    theirs = load_file(str(loras["style"]))
    assert set(ours) == set(theirs) and all(np.array_equal(ours[k], theirs[k]) for k in ours)
    assert "lora_adapter_metadata" in metadata


def test_sdxl_kohya_ldm_names_and_second_text_encoder(tmp_path):
    """SDXL LoRAs in kohya's original-checkpoint naming (input_blocks_N_1_..., lora_te1_/lora_te2_) resolve to
    the same modules as diffusers' names, and baking them gives diffusers' fused weights."""
    import torch

    from turbo_trt.builder.lora_bake import bake_loras, module_shapes
    from turbo_trt.progress import Progress
    from turbo_trt.runner.lora import load_lora

    path = _save_lora("tiny-sdxl-turbo", tmp_path / "xl", 3, UNET_TARGETS, TE_TARGETS, rank=2, alpha=4, te2=True)
    pipe = sources.load_pipeline(sources.resolve_source("tiny-sdxl-turbo"))
    shapes = module_shapes(pipe)
    peft_style = load_lora(path, "sdxl", shapes)
    assert {part for part, _ in peft_style.layers} == {"unet", "text_encoder", "text_encoder_2"}

    layers = 1 + max(int(name.split(".")[3]) for name in shapes["unet"] if name.startswith("down_blocks.0.resnets."))
    tensors, _ = read_safetensors(path)
    kohya: dict[str, np.ndarray] = {}
    for key, value in tensors.items():
        part, _, rest = key.partition(".")
        module, role = rest.rsplit(".lora_", 1)
        if part == "unet":
            bits = module.split(".")
            if bits[0] == "mid_block":  # mid_block.attentions.0.<rest>
                head, rest_bits = "middle_block_1", bits[3:]
            else:  # down_blocks.L.attentions.I.<rest> / up_blocks.L.attentions.I.<rest>
                level, index, rest_bits = int(bits[1]), int(bits[3]), bits[4:]
                head = (f"input_blocks_{1 + level * (layers + 1) + index}_1" if bits[0] == "down_blocks"
                        else f"output_blocks_{level * (layers + 1) + index}_1")
            name = "lora_unet_" + head + "_" + "_".join(rest_bits)
        else:
            name = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}[part] + module.replace(".", "_")
        kohya[f"{name}.lora_{'down' if role.startswith('A') else 'up'}.weight"] = value
        kohya[f"{name}.alpha"] = np.array(4.0, np.float32)
    kohya_file = _save_safetensors(kohya, tmp_path / "xl-kohya.safetensors")
    kohya_style = load_lora(kohya_file, "sdxl", shapes)
    assert set(kohya_style.layers) == set(peft_style.layers)
    for key, layer in peft_style.layers.items():
        assert np.array_equal(layer.delta(1.0), kohya_style.layers[key].delta(1.0)), key

    baked = [{"source": str(kohya_file), "file": str(kohya_file), "sha256": kohya_style.sha256, "scale": 0.5,
              "parts": kohya_style.parts}]
    bake_loras(pipe, baked, "sdxl", Progress(enabled=False))
    reference = sources.load_pipeline(sources.resolve_source("tiny-sdxl-turbo"))
    reference.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name="xl")
    reference.fuse_lora(lora_scale=0.5)
    reference.unload_lora_weights()
    for part in ("unet", "text_encoder", "text_encoder_2"):
        ours = dict(getattr(pipe, part).named_parameters())
        theirs = dict(getattr(reference, part).named_parameters())
        for name, value in ours.items():
            # ours is the FP16-rounded merge (what the graph stores): the base and the sum are each rounded to
            # FP16 once (2**-11 relative each), diffusers' FP32 merge is not
            expected = theirs[name].detach()
            assert torch.allclose(value, expected, rtol=2**-9, atol=2**-10 * float(expected.abs().max())), (part, name)


def test_wrong_family_lora_is_refused_naming_the_key(tmp_path):
    from turbo_trt.builder.lora_bake import module_shapes
    from turbo_trt.runner.lora import load_lora

    path = _save_lora("tiny-sdxl-turbo", tmp_path / "xl", 3, ["to_q"], ["q_proj"], rank=2, alpha=2, te2=True)
    shapes = module_shapes(sources.load_pipeline(sources.resolve_source("tiny-sd-turbo")))
    with pytest.raises(LoraError, match=r"text_encoder_2\..*this LoRA is for SDXL"):
        load_lora(path, "sd", shapes)


# --- baked in ----------------------------------------------------------------------------------------------

def test_baked_in_manifest_and_rebuild_only_touched(baked_bundle, loras, tmp_path):
    from turbo_trt.fsutil import sha256_file

    manifest = json.loads((baked_bundle / "manifest.json").read_text())
    baked = manifest["lora"]["baked"]
    assert [(b["source"], b["scale"]) for b in baked] == [(str(loras["style"]), 0.5), (str(loras["detail"]), 1.0)]
    assert baked[0]["sha256"] == sha256_file(loras["style"])
    assert baked[0]["parts"] == ["text_encoder", "unet"] and baked[1]["parts"] == ["unet"]
    assert manifest["lora"]["refittable"] is False

    from tests.conftest import copy_bundle

    copy = copy_bundle(baked_bundle, tmp_path / "copy")
    same = quiet_build(tiny_options("tiny-sd-turbo", copy, onnx_only=True,
                                    loras=((str(loras["style"]), 0.5), (str(loras["detail"]), 1.0))))
    assert same.up_to_date
    # A changed scale on a UNet-only LoRA re-exports the UNet alone.
    changed = quiet_build(tiny_options("tiny-sd-turbo", copy, onnx_only=True,
                                       loras=((str(loras["style"]), 0.5), (str(loras["detail"]), 0.25))))
    assert changed.exported == ["unet"]


def test_baked_in_matches_diffusers_fuse_lora(baked_bundle, loras):
    ours = _images(TurboPipeline.from_bundle(baked_bundle, executor="onnxruntime"))
    expected = _diffusers_images({"style": (loras["style"], 0.5), "detail": (loras["detail"], 1.0)}, ours.shape[1])
    _close_to(ours, expected)


# --- swapped at run time -----------------------------------------------------------------------------------

def test_refittable_bundle_records_flag_and_weight_maps(refit_bundle, sd_bundle, tmp_path):
    manifest = json.loads((refit_bundle / "manifest.json").read_text())
    assert manifest["lora"]["refittable"] is True
    assert manifest["build_config"]["refittable"] is True
    for component in ("unet", "text_encoder"):
        entry = manifest["components"][component]
        assert f"onnx/{component}.weights.json" in entry["onnx_files"]
        assert f"onnx/{component}.onnx.data" in entry["onnx_files"]
    assert "onnx/vae_decoder.weights.json" not in manifest["components"]["vae_decoder"]["onnx_files"]

    # --refittable on a bundle exported without weight maps re-exports just the graphs that need one.
    from tests.conftest import copy_bundle

    copy = copy_bundle(sd_bundle[0], tmp_path / "plain")
    report = quiet_build(tiny_options("tiny-sd-turbo", copy, onnx_only=True, engine=EngineOptions(refittable=True)))
    assert sorted(report.exported) == ["text_encoder", "unet"]


def test_refittable_engine_build(refit_bundle, tmp_path):
    """A real TensorRT-RTX build with BuilderFlag.REFIT. TensorRT-RTX 1.7 fails every REFIT build on a
    machine without a GPU (Myelin's CUDA check; even a one-MatMul graph), so without a GPU the test checks
    that the failure says so and what to do instead; with a GPU the engine must build."""
    from turbo_trt.builder.engine import build_engine
    from turbo_trt.errors import EngineBuildError
    from turbo_trt.flavors import load_flavor
    from turbo_trt.gpu import current_gpu
    from turbo_trt.progress import Progress

    flavor = load_flavor("tensorrt-rtx")
    graph = refit_bundle / "onnx" / "text_encoder.onnx"
    if current_gpu() is not None:
        plan, _ = build_engine(flavor, graph, EngineOptions(refittable=True), Progress(enabled=False))
        assert len(plan) > 0
        return
    with pytest.raises(EngineBuildError, match="--refittable.*no GPU.*--onnx-only --refittable"):
        build_engine(flavor, graph, EngineOptions(refittable=True), Progress(enabled=False))
    plain, _ = build_engine(flavor, graph, EngineOptions(), Progress(enabled=False))  # the same graph, no REFIT
    assert len(plain) > 0


def test_weight_map_points_at_each_weight(refit_bundle):
    """Every Linear/Conv weight of the tiny UNet and text encoder is found in the graph (most of them
    transposed under an exporter-made name), and the recorded offset holds exactly its FP16 value."""
    import torch

    from turbo_trt.runner.lora import BundleLoras

    pipe = sources.load_pipeline(sources.resolve_source("tiny-sd-turbo"))
    state = BundleLoras(refit_bundle, json.loads((refit_bundle / "manifest.json").read_text()))
    layouts = set()
    for part in ("unet", "text_encoder"):
        modules = dict(getattr(pipe, part).named_modules())
        mapped = state.maps[part]["modules"]
        linear = [n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        assert sorted(mapped) == sorted(linear)
        for name in linear:
            assert mapped[name]["targets"], name
            layouts.update(t["layout"] for t in mapped[name]["targets"])
            expected = modules[name].weight.detach().to(torch.float16).numpy()
            assert np.array_equal(state.base(part, name), expected), name
    assert layouts == {"identity", "transpose"}


@pytest.mark.parametrize("scale", [0.5, 1.0])
def test_swapped_matches_diffusers_fuse_lora(pipe, loras, scale):
    pipe.set_loras({loras["style"]: scale})
    try:
        ours = _images(pipe)
    finally:
        pipe.set_loras({})
    _close_to(ours, _diffusers_images({"style": (loras["style"], scale)}, ours.shape[1]))


def test_two_loras_at_once_match_diffusers_and_the_baked_bundle(pipe, loras, baked_bundle):
    pipe.set_loras({loras["style"]: 0.5, loras["detail"]: 1.0})
    try:
        ours = _images(pipe)
    finally:
        pipe.set_loras({})
    _close_to(ours, _diffusers_images({"style": (loras["style"], 0.5), "detail": (loras["detail"], 1.0)},
                                      ours.shape[1]))
    baked = _images(TurboPipeline.from_bundle(baked_bundle, executor="onnxruntime"))
    assert np.array_equal(ours, baked)  # same merge, same FP16 rounding: the same bits


def test_swap_sequence_and_exact_restore(pipe, refit_bundle, loras):
    base = _images(pipe)
    pipe.set_loras({loras["style"]: 1.0})
    styled = _images(pipe)
    assert np.abs(styled.astype(int) - base).mean() > 1.0  # the LoRA changes the picture
    pipe.set_loras({loras["detail"]: 0.7, loras["style"]: 0.3})
    pipe.set_loras({loras["style"]: 0.5, loras["detail"]: 1.0})
    after_sequence = _images(pipe)
    fresh = TurboPipeline.from_bundle(refit_bundle, executor="onnxruntime")
    fresh.set_loras({loras["style"]: 0.5, loras["detail"]: 1.0})
    assert np.array_equal(after_sequence, _images(fresh))
    assert pipe.loras == {str(loras["style"]): 0.5, str(loras["detail"]): 1.0}
    pipe.set_loras({})
    assert np.array_equal(_images(pipe), base)  # bit for bit
    assert pipe.executor._overrides == {"unet": {}, "text_encoder": {}}


def test_kohya_names_give_the_same_images(pipe, loras):
    pipe.set_loras({loras["style"]: 0.5})
    diffusers_style = _images(pipe)
    pipe.set_loras({loras["kohya"]: 0.5})
    kohya_style = _images(pipe)
    pipe.set_loras({})
    assert np.array_equal(diffusers_style, kohya_style)


def test_prompt_cache_follows_text_encoder_weights(pipe, loras):
    """A cached prompt's embeddings are not reused after the text encoder's weights change."""
    base = _images(pipe)
    pipe.set_loras({loras["style"]: 1.0})
    cached_before = pipe.executor.cache_stats()["hits"]
    styled = _images(pipe)
    assert pipe.executor.cache_stats()["hits"] == cached_before
    pipe.set_loras({})
    assert not np.array_equal(styled, base) and np.array_equal(_images(pipe), base)


def _bad_loras(loras: dict[str, Path], root: Path) -> list[tuple[Path, str]]:
    tensors, metadata = read_safetensors(loras["style"])
    unknown = dict(tensors)
    unknown["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_magnitude_vector"] = np.ones(4, np.float32)
    missing_module = {k.replace("attn1.to_q", "attn1.to_qq"): v for k, v in tensors.items()}
    shapes = dict(tensors)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    shapes[key] = np.zeros((4, tensors[key].shape[1] + 1), tensors[key].dtype)
    xl = {"text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((2, 32), np.float32),
          "text_encoder_2.encoder.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((32, 2), np.float32)}
    return [
        (_save_safetensors(unknown, root / "unknown.safetensors", metadata), "lora_magnitude_vector"),
        (_save_safetensors(missing_module, root / "module.safetensors", metadata), "to_qq"),
        (_save_safetensors(shapes, root / "shape.safetensors", metadata), key.replace(".", r"\.")),
        (_save_safetensors(xl, root / "xl.safetensors"), r"text_encoder_2.*for SDXL"),
    ]


def test_bad_loras_are_refused_and_change_nothing(pipe, loras, tmp_path):
    pipe.set_loras({loras["detail"]: 1.0})
    before = _images(pipe)
    for bad, pattern in _bad_loras(loras, tmp_path):
        with pytest.raises(LoraError, match=pattern):
            pipe.set_loras({loras["style"]: 1.0, bad: 1.0})
        assert pipe.loras == {str(loras["detail"]): 1.0}
        assert np.array_equal(_images(pipe), before)
    with pytest.raises(LoraError, match="not found"):
        pipe.set_loras({tmp_path / "nope.safetensors": 1.0})
    pipe.set_loras({})


def test_bad_lora_fails_the_build_naming_the_key(loras, tmp_path):
    bad, pattern = _bad_loras(loras, tmp_path)[2]
    with pytest.raises(LoraError, match=pattern):
        quiet_build(tiny_options("tiny-sd-turbo", tmp_path / "bad", onnx_only=True, loras=((str(bad), 1.0),)))
    assert not (tmp_path / "bad" / "onnx" / "unet.onnx").exists()


def test_non_refittable_bundle_is_refused(sd_bundle, loras):
    plain = TurboPipeline.from_bundle(sd_bundle[0], executor="onnxruntime")
    with pytest.raises(LoraError, match="not built refittable.*--refittable"):
        plain.set_loras({loras["style"]: 1.0})


def test_executor_without_weight_swaps_is_refused_before_reading(refit_bundle, tmp_path):
    """An executor that cannot change weights is refused at once: the LoRA (here a missing file) is not read."""
    from turbo_trt.runner.bundle import open_bundle
    from turbo_trt.runner.executors.onnxruntime_cuda import OnnxRuntimeCudaExecutor

    bundle = open_bundle(refit_bundle, files="onnx")
    fixed = TurboPipeline(bundle, OnnxRuntimeCudaExecutor(bundle, device="cpu"))
    with pytest.raises(LoraError, match="cannot change weights at run time"):
        fixed.set_loras({tmp_path / "missing.safetensors": 1.0})


def test_concurrent_swaps_on_forks_leave_one_whole_set(refit_bundle, loras):
    """set_loras on a pipeline and its fork at the same time, while a third fork generates: the sets are
    applied one after the other, so the weights end as the last set applied once (bit for bit), and every
    image made meanwhile ran on one whole set."""
    import threading
    import time

    first = TurboPipeline.from_bundle(refit_bundle, executor="onnxruntime")
    second, runner = first.fork(), first.fork()
    sets = [{loras["style"]: 1.0, loras["detail"]: 0.5}, {loras["detail"]: 1.0}]
    errors: list[BaseException] = []
    seen: list[np.ndarray] = []
    stop = threading.Event()

    # Watch the real executors' weight changes: each waits a moment inside, widening the window in which an
    # unserialized second call would overlap it.
    active, peak, guard = [0], [0], threading.Lock()
    for executor in (first.executor, second.executor):
        def watched(updates: object, current_weight: object = None, real: object = executor.set_weights) -> None:
            with guard:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
            try:
                time.sleep(0.2)
                real(updates, current_weight)  # type: ignore[operator]
            finally:
                with guard:
                    active[0] -= 1
        executor.set_weights = watched  # type: ignore[method-assign]
    barrier = threading.Barrier(2)

    def swap(pipe: TurboPipeline, wanted: dict[Path, float]) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                pipe.set_loras(wanted)
        except BaseException as exc:  # noqa: BLE001  reported below
            errors.append(exc)

    def generate() -> None:
        try:
            while not stop.is_set():
                seen.append(_images(runner, steps=1))
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=swap, args=(p, w)) for p, w in zip((first, second), sets)]
    background = threading.Thread(target=generate)
    background.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop.set()
    background.join()
    assert not errors, errors
    assert peak[0] == 1, "two weight changes ran at once"
    final = first.loras
    assert final == second.loras and final in [{str(k): v for k, v in w.items()} for w in sets]
    fresh = TurboPipeline.from_bundle(refit_bundle, executor="onnxruntime")
    fresh.set_loras({Path(k): v for k, v in final.items()})
    assert np.array_equal(_images(first), _images(fresh))
    assert np.array_equal(_images(second), _images(fresh))
    # every image made during the swaps ran on one whole set (prompt and UNet weights from the same set)
    whole = []
    for wanted in [{}, *sets]:
        fresh.set_loras(wanted)
        whole.append(_images(fresh, steps=1))
    assert seen and all(any(np.array_equal(image, ok) for ok in whole) for image in seen)


def test_generate_cli_applies_lora(refit_bundle, loras, tmp_path):
    """`generate --lora` in a Python where torch, diffusers, transformers, safetensors and onnx cannot be
    imported: the run-time LoRA path is torch-free."""
    from PIL import Image

    from tests.conftest import write_import_blocker

    env = write_import_blocker(tmp_path, ("torch", "diffusers", "transformers", "safetensors", "onnx", "peft"))
    outs = []
    for extra in ([], ["--lora", f"{loras['style']}:0.5"]):
        out = tmp_path / f"img{len(outs)}.png"
        done = subprocess.run([sys.executable, "-m", "turbo_trt.cli", "generate", "--engines", str(refit_bundle),
                               "--prompt", PROMPT, "--seed", "3", "--executor", "onnxruntime", "--out", str(out),
                               *extra], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
        outs.append(np.asarray(Image.open(out)))
    assert np.abs(outs[0].astype(int) - outs[1]).mean() > 1.0
    pipe = TurboPipeline.from_bundle(refit_bundle, executor="onnxruntime")
    pipe.set_loras({loras["style"]: 0.5})
    assert np.array_equal(np.asarray(pipe(PROMPT, seed=3)[0]), outs[1])


# --- the TensorRT refit path (needs a GPU to run) ------------------------------------------------------------

def test_refit_code_type_checks_against_tensorrt_rtx(tmp_path):
    from tests.test_typecheck import _mypy, _rtx_stubs

    done = _mypy(_rtx_stubs(tmp_path), ["runner/executors/tensorrt_refit.py"])
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.gpu
def test_tensorrt_refit_on_gpu(loras, tmp_path):
    """On a GPU: refittable engines of the installed flavor, LoRAs refitted in, images equal to the ONNX
    Runtime executor's with the same LoRAs (parity tolerance), and back to the base bit for bit."""
    from turbo_trt.flavors import installed_flavors
    from turbo_trt.gpu import current_gpu

    if current_gpu() is None or not installed_flavors():
        pytest.skip("needs an NVIDIA GPU and TensorRT or TensorRT-RTX")
    out = tmp_path / "gpu-refit"
    quiet_build(tiny_options("tiny-sd-turbo", out, flavor=installed_flavors()[0], engine=EngineOptions(refittable=True)))
    gpu = TurboPipeline.from_bundle(out, executor="tensorrt", strict_targets=False)
    cpu = TurboPipeline.from_bundle(out, executor="onnxruntime")
    base = _images(gpu)
    for wanted in ({loras["style"]: 0.5}, {loras["style"]: 1.0, loras["detail"]: 0.5}):
        gpu.set_loras(wanted)
        cpu.set_loras(wanted)
        ours = _images(gpu)
        assert np.abs(ours.astype(int) - base).mean() > 1.0
        _close_to(ours, _images(cpu).astype(np.int32))
    gpu.set_loras({})
    assert np.array_equal(_images(gpu), base)


def test_sdxl_swap_with_both_text_encoders_matches_diffusers(tmp_path):
    """SDXL: a LoRA on the UNet and both text encoders, swapped in at run time, against diffusers'
    load_lora_weights + fuse_lora; then back to the base bit for bit. One step: SDXL-Turbo's sampler is
    Euler-ancestral, whose last step adds no noise, so the initial latents are the only randomness."""
    import torch
    from diffusers import AutoPipelineForText2Image

    lora = _save_lora("tiny-sdxl-turbo", tmp_path / "xl", 4, UNET_TARGETS, TE_TARGETS, rank=2, alpha=4, te2=True)
    out = tmp_path / "sdxl-refit"
    quiet_build(tiny_options("tiny-sdxl-turbo", out, onnx_only=True, img2img=False, engine=EngineOptions(refittable=True)))
    pipe = TurboPipeline.from_bundle(out, executor="onnxruntime")
    base = _images(pipe, steps=1)
    # the first text encoder's last layer is pruned by the exporter (SDXL reads the hidden state before it)
    with pytest.warns(LoraWarning, match=r"text_encoder encoder\.layers\.2\.self_attn\.q_proj.*pruned"):
        pipe.set_loras({lora: 0.7})
    ours = _images(pipe, steps=1)
    assert pipe.executor._overrides.keys() == {"unet", "text_encoder", "text_encoder_2"}

    reference = sources.load_pipeline(sources.resolve_source("tiny-sdxl-turbo"))
    reference.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="xl")
    reference.fuse_lora(lora_scale=0.7)
    reference.unload_lora_weights()
    size = pipe.shapes["height"]
    expected = AutoPipelineForText2Image.from_pipe(reference)(
        PROMPT, num_inference_steps=1, guidance_scale=0.0, latents=torch.from_numpy(_noise(size).latents.copy()),
        height=size, width=size, output_type="np").images
    _close_to(ours, (expected * 255).round().astype(np.int32))
    assert np.abs(ours.astype(int) - base).mean() > 1.0
    pipe.set_loras({})
    assert np.array_equal(_images(pipe, steps=1), base)
