"""The GPU lease kit's parts that take seconds (benchmarks/gpu_kit.py; the whole kit is rehearsed by
benchmarks/gpu/rehearse.sh): what travels fits a call, archives cut into parts are unpacked call by call
into a site exactly as packed, what is imported comes from that site, and the summary grows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from turbo_trt.benchmarks import gpu_kit
from turbo_trt.benchmarks.gpu_kit import (
    CALL_LIMIT,
    MIB,
    Archive,
    compress,
    distribution_files,
    find_distribution,
    folder_files,
    kit_archives,
    link_package,
    plan_calls,
    record,
    site_packages,
    tree_bytes,
    unpack,
    write_carries,
)

ROOT = Path(__file__).resolve().parents[1]


def test_working_tree_leaves_room_in_a_call():
    """Every call sends the working tree: it must stay far below the 64 MiB a call carries (the TensorRT-RTX
    library alone is 62.5 MiB compressed, cut over two calls with the rest)."""
    tree = tree_bytes(ROOT)
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert tree == sum((ROOT / f).stat().st_size for f in listed if (ROOT / f).is_file())
    assert tree < 8 * MIB, f"the working tree is {tree / MIB:.1f} MiB"


def test_kit_recipe_finds_every_part_in_this_environment(sd_bundle):
    """The recipe prepare.sh packs, read from this environment (what rehearse.sh packs): every distribution
    is found by its RECORD, the ONNX Runtime series leaves out what the CUDA executor does not load."""
    base, ort = kit_archives([site_packages()], sd_bundle[0], "onnxruntime")
    names = {a.name: a for a in base}
    assert list(names) == ["diffusers", "tiny-bundle", "tensorrt-rtx-py", "tensorrt-rtx-lib"]
    assert "diffusers/__init__.py" in names["diffusers"].members
    assert "importlib_metadata/__init__.py" in names["diffusers"].members
    assert "tensorrt_rtx/__init__.py" in names["tensorrt-rtx-py"].members
    assert any(k.startswith("tensorrt_rtx_bindings/tensorrt_rtx") for k in names["tensorrt-rtx-py"].members)
    assert "tensorrt_rtx_libs/libtensorrt_rtx.so.1" in names["tensorrt-rtx-lib"].members
    assert "manifest.json" in names["tiny-bundle"].members and not any(
        k.endswith(".lock") or k.startswith("runtime_cache/") for k in names["tiny-bundle"].members)
    members = ort[0].members
    assert "onnxruntime/__init__.py" in members and any(k.startswith("onnxruntime/capi/onnxruntime_pybind11") for k in members)
    assert not any(k.startswith(("onnxruntime/tools/", "onnxruntime/transformers/", "onnxruntime/quantization/"))
                   or k.endswith(".pyc") for k in members)
    with pytest.raises(FileNotFoundError, match="not-a-package"):
        find_distribution("not-a-package", [site_packages()])


def _child_import(site: Path, code: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=site.parent, capture_output=True, text=True)


def test_parts_unpacked_call_by_call_into_a_site(tmp_path, sd_bundle):
    """Two archives cut at 1 MiB a call: after the first call one waits for parts; once all arrived each is
    checked and extracted once; the package imports from the site and the bundle opens from there; a damaged
    part is refused."""
    meta = Archive("metadata", "site", distribution_files(find_distribution("importlib_metadata", [site_packages()])),
                   preset=1)
    onnx = {k: v for k, v in folder_files(sd_bundle[0]).items() if not k.endswith(".plan")}
    bundle = Archive("tiny-bundle", "bundles/tiny", onnx, preset=0)
    files = [(a, compress(a, tmp_path / "archives")) for a in (meta, bundle)]
    calls = plan_calls(files, budget=1 * MIB)
    assert len(calls) >= 2 and all(sum(p.size for p in call) <= MIB for call in calls)
    folders = write_carries(calls, tmp_path / "carries", "c")
    root, store = tmp_path / "there", tmp_path / "there" / "store"
    first = unpack(folders[:1], store, root)
    assert any(text.startswith("waiting for parts") for text in first.values()), first
    done = {}
    for folder in folders[1:]:
        done.update(unpack([folder], store, root))
    assert set(done) == {"metadata", "tiny-bundle"} and all("unpacked into" in t or "already" in t for t in done.values())
    assert unpack(folders, store, root) == {"metadata": "already unpacked", "tiny-bundle": "already unpacked"}
    assert not list(store.glob("*.part*"))  # parts are dropped once extracted
    probe = _child_import(root / "site", "import importlib_metadata as m; print(m.__file__)")
    assert probe.returncode == 0 and probe.stdout.startswith(str(root / "site")), probe
    link_package(ROOT, root / "site")
    code = ("import turbo_trt, turbo_trt.runner.bundle as b; print(turbo_trt.__file__); "
            f"print(b.open_bundle({str(root / 'bundles' / 'tiny')!r}, files='onnx').manifest['model']['id'])")
    opened = _child_import(root / "site", code)
    assert opened.returncode == 0, opened.stderr
    assert opened.stdout.splitlines()[0].startswith(str(root / "site")) and "tiny-sd-turbo" in opened.stdout
    damaged = write_carries(plan_calls(files[:1], budget=CALL_LIMIT), tmp_path / "damaged", "c")[0]
    part = next(damaged.glob("*.part00"))
    part.write_bytes(part.read_bytes()[:-1] + b"\0")
    with pytest.raises(RuntimeError, match="sha256"):
        unpack([damaged], tmp_path / "elsewhere" / "store", tmp_path / "elsewhere")


def test_prepare_refuses_a_call_over_the_limit(tmp_path, sd_bundle, monkeypatch):
    """prepare() checks each call with the working tree: a budget that would pass 64 MiB is refused (here the
    limit is lowered to what the tree plus the small archives exceed)."""
    monkeypatch.setattr(gpu_kit, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(gpu_kit, "kit_archives", lambda sites, bundle, ort: (
        [Archive("metadata", "site", distribution_files(find_distribution("importlib_metadata", [site_packages()])),
                 preset=1)], []))
    tree = tree_bytes(ROOT)
    report = gpu_kit.prepare(ROOT, tmp_path / "ok", None, sd_bundle[0], False, None, [])
    assert report["calls"]["c1"]["with_tree_mib"] <= 64 and (tmp_path / "ok" / "plan.json").is_file()
    monkeypatch.setattr(gpu_kit, "CALL_LIMIT", tree + 1024)
    with pytest.raises(SystemExit, match="over the"):
        gpu_kit.prepare(ROOT, tmp_path / "over", None, sd_bundle[0], False, 4 * MIB, [])


def test_summary_grows_and_is_copied_out(tmp_path):
    summary, out = tmp_path / "kit" / "summary.json", tmp_path / "out"
    record(summary, out, "probe", {"runs": ["portable"]})
    record(summary, out, "probe", {"seconds": 12})
    record(summary, out, "tests", {"exit": 0})
    data = json.loads((out / "summary.json").read_text())
    assert data["phases"] == {"probe": {"runs": ["portable"], "seconds": 12}, "tests": {"exit": 0}}
    assert json.loads(summary.read_text()) == data
