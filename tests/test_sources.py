"""Model sources: tiny tokenizer, presets, shipped full-size configs, local/hub resolution, fingerprints.

Tier 0/1: CPU only, no network (hub tests force offline mode), full-size models only on the meta device.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from turbo_trt.builder import sources
from turbo_trt.builder.presets import build_part, preset_spec, shipped_spec
from turbo_trt.builder.tiny_tokenizer import (
    EOS_TOKEN,
    tiny_vocab_size,
    write_tiny_clip_tokenizer,
)
from turbo_trt.errors import SourceError

PROMPTS = [
    "a photo of a cat",
    "An astronaut riding a horse on Mars, 8k!!  highly-detailed",
    "it's the dog's toy: 1234 \u00c9COLE caf\u00e9 -- (masterpiece)",
    "",
]
LONG_PROMPT = " ".join(["a red fox jumping over the lazy brown dog"] * 20)


def _weights(pipe: Any) -> dict[str, dict[str, Any]]:
    parts = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if hasattr(pipe, "text_encoder_2") else [])
    return {p: getattr(pipe, p).state_dict() for p in parts}


@pytest.fixture(scope="module")
def preset_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each preset saved once with save_pretrained (a real local diffusers directory)."""
    root = tmp_path_factory.mktemp("presets")
    return {name: sources.save_preset_pipeline(name, root / name) for name in sources.PRESETS}


# --- tiny tokenizer ------------------------------------------------------------------------------------


@pytest.mark.parametrize("pad", ["!", EOS_TOKEN])
def test_tiny_tokenizer_same_ids_from_all_loaders(tmp_path: Path, pad: str) -> None:
    write_tiny_clip_tokenizer(tmp_path, pad)
    slow = transformers.CLIPTokenizer.from_pretrained(tmp_path)
    fast = transformers.CLIPTokenizerFast.from_pretrained(tmp_path)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    pad_id = slow.convert_tokens_to_ids(pad)
    raw.enable_truncation(77)
    raw.enable_padding(length=77, pad_id=pad_id, pad_token=pad)
    for prompt in PROMPTS + [LONG_PROMPT]:
        kw = {"padding": "max_length", "max_length": 77, "truncation": True}
        a, b, c = slow(prompt, **kw).input_ids, fast(prompt, **kw).input_ids, raw.encode(prompt).ids
        assert a == b == c, prompt
        assert len(a) == 77 and a[0] == slow.bos_token_id
        assert max(a) < tiny_vocab_size()
    long_ids = slow(LONG_PROMPT, padding="max_length", max_length=77, truncation=True).input_ids
    assert long_ids[-1] == slow.eos_token_id and long_ids.count(pad_id) == (1 if pad == EOS_TOKEN else 0)
    short = slow("a photo of a cat").input_ids
    assert slow.convert_ids_to_tokens(short)[1:-1] == ["a</w>", "photo</w>", "of</w>", "a</w>", "cat</w>"]
    assert slow.model_max_length == 77 and slow.pad_token == pad


def test_tiny_tokenizer_is_small_deterministic_and_clip_like(tmp_path: Path) -> None:
    write_tiny_clip_tokenizer(tmp_path / "a", "!")
    write_tiny_clip_tokenizer(tmp_path / "b", "!")
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == ["merges.txt", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json", "vocab.json"]
    for name in files:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    vocab = json.loads((tmp_path / "a" / "vocab.json").read_text())
    assert len(vocab) == tiny_vocab_size() < 1000
    assert vocab["!"] == 0  # SD 2's pad token is id 0, as in the real CLIP vocabulary
    assert vocab[EOS_TOKEN] == len(vocab) - 1  # highest id: the legacy argmax pooling finds it
    merges = (tmp_path / "a" / "merges.txt").read_text().splitlines()
    assert merges[0].startswith("#version") and len(merges) - 1 >= 300


# --- presets -------------------------------------------------------------------------------------------


def test_presets_are_deterministic() -> None:
    for name in sources.PRESETS:
        src = sources.resolve_source(name)
        assert (src.kind, src.model_id, src.local_dir) == ("preset", name, None)
        first, second = _weights(sources.load_pipeline(src)), _weights(sources.load_pipeline(src))
        for part, tensors in first.items():
            assert tensors.keys() == second[part].keys()
            assert all(torch.equal(t, second[part][k]) for k, t in tensors.items()), (name, part)
        fps = src.part_fingerprints()
        assert fps == sources.resolve_source(name).part_fingerprints()
        assert set(fps) == set(src.parts) and len(set(fps.values())) == len(fps)  # every part distinct


@pytest.mark.parametrize("name", sources.PRESETS)
def test_preset_pipeline_generates(name: str) -> None:
    pipe = sources.load_pipeline(sources.resolve_source(name))
    sdxl = name == "tiny-sdxl-turbo"
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline")
    assert len(pipe.vae.config.block_out_channels) == 4 and pipe.vae_scale_factor == 8
    assert pipe.text_encoder.config.vocab_size == tiny_vocab_size()
    assert pipe.text_encoder.config.num_hidden_layers >= 3
    if sdxl:
        te1, te2, unet = pipe.text_encoder.config, pipe.text_encoder_2.config, pipe.unet.config
        assert type(pipe.text_encoder_2).__name__ == "CLIPTextModelWithProjection"
        assert (te1.hidden_act, te2.hidden_act) == ("quick_gelu", "gelu")
        assert unet.addition_embed_type == "text_time"
        assert unet.cross_attention_dim == te1.hidden_size + te2.hidden_size
        assert unet.projection_class_embeddings_input_dim == te2.projection_dim + 6 * unet.addition_time_embed_dim
        assert pipe.vae.config.force_upcast and pipe.vae.config.scaling_factor == 0.13025
        assert type(pipe.scheduler).__name__ == "EulerAncestralDiscreteScheduler"
    else:
        assert pipe.vae.config.scaling_factor == 0.18215
        assert type(pipe.scheduler).__name__ == "EulerDiscreteScheduler"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    gen = torch.Generator().manual_seed(0)
    images = pipe("a photo of a cat", num_inference_steps=1, guidance_scale=0.0, height=64, width=64,
                  output_type="np", generator=gen).images
    assert images.shape == (1, 64, 64, 3)
    assert np.isfinite(images).all() and images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0


def test_import_is_cheap() -> None:
    code = ("import sys, turbo_trt.builder.sources; "
            "print([m for m in ('torch', 'diffusers', 'transformers', 'huggingface_hub') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


# --- local directories ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sources.PRESETS)
def test_saved_preset_round_trips_as_local(name: str, preset_dirs: dict[str, Path]) -> None:
    preset = sources.resolve_source(name)
    local = sources.resolve_source(str(preset_dirs[name]))
    assert (local.kind, local.family, local.revision) == ("local", preset.family, None)
    assert Path(local.model_id).is_absolute() and local.local_dir == preset_dirs[name].resolve()
    a, b = sources.load_pipeline(preset), sources.load_pipeline(local)
    assert type(a) is type(b)
    for part, tensors in _weights(a).items():
        other = _weights(b)[part]
        assert all(torch.equal(t, other[k]) for k, t in tensors.items()), part
    for tok in ("tokenizer", "tokenizer_2") if local.family == "sdxl" else ("tokenizer",):
        assert getattr(a, tok)(PROMPTS[1]).input_ids == getattr(b, tok)(PROMPTS[1]).input_ids
    configs = sources.part_configs(local)
    assert configs["unet"]["block_out_channels"] == list(a.unet.config.block_out_channels)
    assert configs["scheduler"]["_class_name"] == type(a.scheduler).__name__


def test_local_fingerprints_follow_the_changed_part_only(tmp_path: Path, preset_dirs: dict[str, Path]) -> None:
    from safetensors.torch import load_file, save_file

    work = tmp_path / "pipe"
    shutil.copytree(preset_dirs["tiny-sdxl-turbo"], work)
    src = sources.resolve_source(str(work))
    before = src.part_fingerprints()
    assert before == src.part_fingerprints()

    weights = work / "vae" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(weights)
    key = min(tensors)
    tensors[key] = tensors[key] + 1e-3
    save_file(tensors, weights)
    after = src.part_fingerprints()
    assert {p for p in before if before[p] != after[p]} == {"vae"}

    # A weight variant the loader ignores (every part has plain weights) does not count.
    shutil.copy(work / "unet" / "diffusion_pytorch_model.safetensors", work / "unet" / "diffusion_pytorch_model.fp16.safetensors")
    assert src.part_fingerprints() == after

    config = json.loads((work / "scheduler" / "scheduler_config.json").read_text())
    config["timestep_spacing"] = "leading"
    (work / "scheduler" / "scheduler_config.json").write_text(json.dumps(config))
    assert {p for p, v in src.part_fingerprints().items() if v != after[p]} == {"scheduler"}


def test_weight_variant_selection() -> None:
    names = ["diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors",
             "diffusion_pytorch_model.bin", "diffusion_pytorch_model.non_ema.bin", "config.json"]
    assert sources.select_weight_files(names, None) == ["diffusion_pytorch_model.safetensors"]
    assert sources.select_weight_files(names, "fp16") == ["diffusion_pytorch_model.fp16.safetensors"]
    assert sources.select_weight_files(["model.bin"], "fp16") == ["model.bin"]
    shards = ["model.fp16-00001-of-00002.safetensors", "model.fp16-00002-of-00002.safetensors",
              "model.safetensors.index.fp16.json", "model-00001-of-00002.safetensors"]
    assert sources.select_weight_files(shards, "fp16") == sorted(shards[:3])
    listing = ["model_index.json", "sd_xl_turbo_1.0.safetensors", "unet/config.json",
               "unet/diffusion_pytorch_model.safetensors", "unet/diffusion_pytorch_model.fp16.safetensors",
               "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.fp16.safetensors"]
    patterns = sources.hub_allow_patterns(listing)
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in patterns
    assert "vae/diffusion_pytorch_model.safetensors" in patterns  # no fp16 there: fp32
    assert "text_encoder/model.fp16.safetensors" in patterns
    assert not any(p in patterns for p in ("unet/diffusion_pytorch_model.safetensors", "sd_xl_turbo_1.0.safetensors"))


def test_fp16_only_directory_loads_as_float32(tmp_path: Path, preset_dirs: dict[str, Path]) -> None:
    work = tmp_path / "pipe"
    shutil.copytree(preset_dirs["tiny-sd-turbo"], work)
    unet = work / "unet" / "diffusion_pytorch_model.safetensors"
    unet.rename(unet.with_name("diffusion_pytorch_model.fp16.safetensors"))
    src = sources.resolve_source(str(work))
    assert sources.choose_variant(work, src.parts) == "fp16"
    pipe = sources.load_pipeline(src)
    assert next(pipe.unet.parameters()).dtype == torch.float32


# --- full-size configs (meta device: no memory) -----------------------------------------------------


# model-facts.md: SD-Turbo UNet 866 M, OpenCLIP-H text 340 M, VAE 84 M; SDXL-Turbo UNet 2,567 M. CLIP-L
# (123 M) and OpenCLIP-bigG with projection (695 M) are the published sizes of those text towers.
EXPECTED_PARAMS = {
    "stabilityai/sd-turbo": {"unet": 866e6, "text_encoder": 340e6, "vae": 84e6},
    "stabilityai/sdxl-turbo": {"unet": 2567e6, "text_encoder": 123e6, "text_encoder_2": 695e6, "vae": 84e6},
}


@pytest.mark.parametrize("model_id", sorted(EXPECTED_PARAMS))
def test_random_weights_configs_match_model_facts(model_id: str) -> None:
    alias = model_id.split("/")[1]
    src = sources.resolve_source(alias, random_weights=True)
    assert (src.kind, src.model_id, src.family) == ("random", model_id, "sdxl" if "xl" in alias else "sd")
    spec = shipped_spec(model_id)
    for part, expected in EXPECTED_PARAMS[model_id].items():
        model = build_part(spec, part, device="meta")
        count = sum(p.numel() for p in model.parameters())
        assert abs(count - expected) / expected < 0.02, (part, count)
        assert {p.dtype for p in model.parameters()} == {torch.float32}  # despite configs saying float16
    configs = sources.part_configs(src)
    assert configs["scheduler"]["timestep_spacing"] == "trailing"
    if src.family == "sdxl":
        assert configs["text_encoder"]["hidden_act"] == "quick_gelu" and configs["text_encoder_2"]["hidden_act"] == "gelu"
        assert configs["vae"]["force_upcast"] and configs["vae"]["scaling_factor"] == 0.13025
        assert configs["scheduler"]["_class_name"] == "EulerAncestralDiscreteScheduler"
    else:
        assert configs["text_encoder"]["hidden_act"] == "gelu" and configs["vae"]["scaling_factor"] == 0.18215
        assert configs["scheduler"]["_class_name"] == "EulerDiscreteScheduler"
    assert src.part_fingerprints() == sources.resolve_source(model_id, random_weights=True).part_fingerprints()
    assert preset_spec("tiny-" + alias).family == src.family


# --- errors --------------------------------------------------------------------------------------------


def test_unknown_name_lists_choices() -> None:
    with pytest.raises(SourceError, match="tiny-sd-turbo.*sd-turbo"):
        sources.resolve_source("not a model")
    with pytest.raises(SourceError, match="no such directory"):
        sources.resolve_source("./no/such/dir")


def test_non_pipeline_directory(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("hello")
    with pytest.raises(SourceError, match="model_index.json"):
        sources.resolve_source(str(tmp_path))


def test_directory_missing_vae(tmp_path: Path, preset_dirs: dict[str, Path]) -> None:
    work = tmp_path / "pipe"
    shutil.copytree(preset_dirs["tiny-sd-turbo"], work)
    shutil.rmtree(work / "vae")
    with pytest.raises(SourceError, match="missing vae"):
        sources.resolve_source(str(work))


def test_random_weights_unsupported_model() -> None:
    with pytest.raises(SourceError, match="--random-weights supports sd-turbo, sdxl-turbo"):
        sources.resolve_source("runwayml/stable-diffusion-v1-5", random_weights=True)


def test_revision_only_for_hub() -> None:
    with pytest.raises(SourceError, match="--revision"):
        sources.resolve_source("tiny-sd-turbo", revision="main")


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import time


def test_hub_offline_suggests_offline_sources(tmp_path: Path, offline: None) -> None:
    with pytest.raises(SourceError) as info:
        sources.resolve_source("sd-turbo", cache_dir=tmp_path)
    message = str(info.value)
    assert "--random-weights" in message and "tiny-sd-turbo" in message and "local diffusers" in message


def test_hub_offline_uses_cached_snapshot(tmp_path: Path, preset_dirs: dict[str, Path], offline: None) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--someone--tiny-xl"
    shutil.copytree(preset_dirs["tiny-sdxl-turbo"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    src = sources.resolve_source("someone/tiny-xl", cache_dir=tmp_path)
    assert (src.kind, src.model_id, src.revision, src.family) == ("hub", "someone/tiny-xl", commit, "sdxl")
    assert src.part_fingerprints() == sources.resolve_source(str(preset_dirs["tiny-sdxl-turbo"])).part_fingerprints()
