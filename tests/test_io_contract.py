"""The tensor contract between engines and the TensorRT executor's buffers, checked without a GPU.

Reading an engine's IO back needs a GPU (TensorRT-RTX cannot deserialize without a driver), so these tests
check the same contract on what the engines are compiled from: the network TensorRT-RTX parses out of each
ONNX graph (strongly typed, exactly as `turbo-trt build` parses it), and the manifest the runner reads.
"""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from turbo_trt.builder.engine import EngineOptions, _Logger, build_engine, network_io, parse_onnx
from turbo_trt.errors import BundleError, EngineBuildError
from turbo_trt.flavors import load_flavor
from turbo_trt.io_contract import TensorIO, check_io, manifest_io
from turbo_trt.manifest import read_manifest
from turbo_trt.progress import Progress
from turbo_trt.runner.bundle import open_bundle

from .conftest import copy_bundle


def _parsed_io(bundle) -> dict[str, dict[str, TensorIO]]:
    flavor = load_flavor("tensorrt-rtx")
    out = {}
    for name, entry in read_manifest(bundle)["components"].items():
        _builder, network, _parser = parse_onnx(flavor, bundle / entry["onnx"], _Logger(flavor))
        out[name] = network_io(flavor, network)
    return out


@pytest.mark.parametrize("which", ["sd_bundle", "sdxl_bundle"])
def test_parsed_networks_fit_the_executor_buffers(which, request):
    bundle = request.getfixturevalue(which)[0]
    manifest = read_manifest(bundle)
    parsed = _parsed_io(bundle)
    check_io(parsed, manifest["model"]["family"], manifest["shapes"], True, "parsed networks")
    assert parsed == manifest_io(manifest["components"])
    assert manifest["engine"]["recipe"] >= 2 and manifest["engine"]["capture_ready_flag"] is True


def _sd_table(sd_bundle):
    manifest = read_manifest(sd_bundle[0])
    return manifest_io(manifest["components"]), manifest["shapes"]


@pytest.mark.parametrize("component, tensor, change, message", [
    ("unet", "timestep", {"shape": (2,)}, "'timestep' is input float32[2], the runner expects input float32[1]"),
    ("unet", "step_coeffs", {"dtype": "float16"}, "'step_coeffs' is input float16[4]"),
    ("vae_decoder", "image", {"dtype": "float32"}, "'image' is output float32[1, 64, 64, 3]"),
    ("vae_decoder", "nonfinite", {"is_input": True}, "'nonfinite' is input int32[1]"),
    ("text_encoder", "input_ids", {"dtype": "int64"}, "'input_ids' is input int64[1, 77]"),
    ("vae_encoder", "noise_sigma", {"shape": (1, 1)}, "'noise_sigma' is input float32[1, 1]"),
])
def test_each_contract_breach_is_named(sd_bundle, component, tensor, change, message):
    table, shapes = _sd_table(sd_bundle)
    table[component][tensor] = dataclasses.replace(table[component][tensor], **change)
    with pytest.raises(BundleError, match=re.escape(message)):
        check_io(table, "sd", shapes, True, "test")


def test_missing_extra_and_mismatched_embeddings(sd_bundle):
    table, shapes = _sd_table(sd_bundle)
    del table["unet"]["step_noise"]
    with pytest.raises(BundleError, match=r"unet tensors differ .*missing \['step_noise'\]"):
        check_io(table, "sd", shapes, True, "test")
    table, shapes = _sd_table(sd_bundle)
    table["vae_decoder"]["extra"] = TensorIO((1,), "float32", True)
    with pytest.raises(BundleError, match=r"unexpected \['extra'\]"):
        check_io(table, "sd", shapes, True, "test")
    table, shapes = _sd_table(sd_bundle)
    embeds = table["unet"]["prompt_embeds"]
    table["unet"]["prompt_embeds"] = dataclasses.replace(embeds, dtype="float32")
    with pytest.raises(BundleError, match="text_encoder output 'prompt_embeds' .* does not fit unet input"):
        check_io(table, "sd", shapes, True, "test")
    table, shapes = _sd_table(sd_bundle)
    with pytest.raises(BundleError, match="no vae_encoder component"):
        check_io({k: v for k, v in table.items() if k != "vae_encoder"}, "sd", shapes, True, "test")
    check_io({k: v for k, v in table.items() if k != "vae_encoder"}, "sd", shapes, False, "test")


def test_open_bundle_rejects_a_manifest_that_breaks_the_contract(sd_bundle, tmp_path):
    bundle = copy_bundle(sd_bundle[0], tmp_path / "b")
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["components"]["unet"]["inputs"][1]["shape"] = [2]  # timestep
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match=r"manifest.json: unet tensor 'timestep' is input float32\[2\]"):
        open_bundle(bundle, files="engine")


def test_engine_build_stops_when_the_graph_differs_from_the_manifest(sd_bundle, tmp_path):
    bundle = sd_bundle[0]
    entry = read_manifest(bundle)["components"]["vae_decoder"]
    expected = manifest_io({"vae_decoder": entry})["vae_decoder"]
    expected["nonfinite"] = TensorIO((1,), "int64", False)
    with pytest.raises(EngineBuildError, match=r"differs from the manifest in \['nonfinite'\]: nonfinite: "
                                               r"output int32\[1\] vs output int64\[1\]"):
        build_engine(load_flavor("tensorrt-rtx"), bundle / entry["onnx"], EngineOptions(), Progress(enabled=False),
                     expected_io=expected)
