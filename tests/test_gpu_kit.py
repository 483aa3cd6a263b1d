"""The GPU lease kit's parts that take seconds (benchmarks/gpu_kit.py; the whole kit is rehearsed by
benchmarks/gpu/rehearse.sh): what travels fits a call, archives cut into parts are unpacked call by call
into a site exactly as packed, what is imported comes from that site, and the summary grows."""

from __future__ import annotations

import json
import os
import shutil
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
    library alone is 62.5 MiB compressed, cut over two calls with the rest; `prepare` sizes the parts to what
    the tree leaves). 12 MiB: the tree is ~9 MiB since the trained tiny presets' weights ship in it (8.3 MB);
    at 12 MiB a call still carries 49 MiB of parts, and the fallback branch keeps its number of calls."""
    tree = tree_bytes(ROOT)
    listed = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-co", "--exclude-standard"], capture_output=True,
                            text=True, check=True).stdout.split()
    assert tree == sum((ROOT / f).stat().st_size for f in listed if (ROOT / f).is_file())
    assert tree < 12 * MIB, f"the working tree is {tree / MIB:.1f} MiB"


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


def _small_archives(sd_bundle) -> tuple[Archive, Archive]:
    meta = Archive("metadata", "site", distribution_files(find_distribution("importlib_metadata", [site_packages()])),
                   preset=1)
    onnx = {k: v for k, v in folder_files(sd_bundle[0]).items() if k.startswith("text_encoder")}
    return meta, Archive("onnxruntime-gpu", "site/ort", onnx, preset=0)


def test_prepare_starts_the_onnxruntime_series_in_the_last_base_call(tmp_path, sd_bundle, monkeypatch):
    """The ONNX Runtime archive fills the room the base series leaves in its last call (so the fallback needs
    the fewest calls), continues in o1..; every kit.json names the commit packed from."""
    meta, ort = _small_archives(sd_bundle)
    monkeypatch.setattr(gpu_kit, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(gpu_kit, "kit_archives", lambda sites, bundle, ort_dist: ([meta], [ort] if ort_dist else []))
    room = compress(meta, tmp_path / "cache" / "archives").stat().st_size + 8192  # 8 KiB left for ort's start
    assert compress(ort, tmp_path / "cache" / "archives").stat().st_size > room
    report = gpu_kit.prepare(ROOT, tmp_path / "kit", None, sd_bundle[0], True, room, [])
    calls = report["calls"]
    assert list(calls)[0] == "c1" and "c2" not in calls and "o1" in calls, calls
    assert calls["c1"]["pieces"][0].startswith("metadata") and calls["c1"]["pieces"][-1] == "onnxruntime-gpu.tar.xz.part00"
    assert sum(p.stat().st_size for p in (tmp_path / "kit" / "c1").glob("*.part*")) == room  # filled up
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    manifest = json.loads((tmp_path / "kit" / "c1" / "kit.json").read_text())
    assert manifest["commit"]["commit"] == head and isinstance(manifest["commit"]["dirty"], bool)
    done: dict[str, str] = {}
    for name in calls:  # all calls arrive: both archives unpack, the commit is recorded THERE
        got = unpack([tmp_path / "kit" / name], tmp_path / "there" / "store", tmp_path / "there")
        done.update({k: v for k, v in got.items() if v.startswith("unpacked into")})
    assert set(done) == {"metadata", "onnxruntime-gpu"}, done
    assert json.loads((tmp_path / "there" / "commit.json").read_text())["commit"] == head


def test_damaged_archive_dropped_and_its_carries_named(tmp_path, sd_bundle):
    """A part that does not add up: the store forgets the archive (parts and index entry) and the error names
    the carry folders to send again; sent again intact, it unpacks."""
    meta, _ = _small_archives(sd_bundle)
    files = [(meta, compress(meta, tmp_path / "archives"))]
    folders = write_carries(plan_calls(files, budget=files[0][1].stat().st_size // 2 + 1), tmp_path / "c", "c")
    assert len(folders) == 2
    damaged = tmp_path / "damaged"
    shutil.copytree(folders[1], damaged / "c2")
    part = next((damaged / "c2").glob("*.part01"))
    part.write_bytes(part.read_bytes()[:-1] + bytes([part.read_bytes()[-1] ^ 1]))
    store, root = tmp_path / "there" / "store", tmp_path / "there"
    unpack([folders[0]], store, root)
    with pytest.raises(RuntimeError, match="send again carry c1, c2"):
        unpack([damaged / "c2"], store, root)
    assert not list(store.glob("metadata*part*")) and "metadata" not in json.loads((store / "index.json").read_text())
    assert not list(store.glob("*.tmp"))
    done = unpack(folders, store, root)
    assert done["metadata"].startswith("unpacked into")


def test_summary_keeps_a_long_json_file_whole(tmp_path):
    """A result file longer than the text limit stays JSON (only its long strings are cut, keeping their end)."""
    result = {"runs": ["portable"], "attempts": {"portable": {"ran": True, "log": "x" * 30000 + "END"}},
              "filler": ["y" * 100] * 300}
    path = tmp_path / "rtx-probe.json"
    path.write_text(json.dumps(result, indent=2))
    assert len(path.read_text()) > 2 * gpu_kit.TEXT_LIMIT
    value = gpu_kit.read_value(path)
    assert value["runs"] == ["portable"] and value["filler"] == result["filler"]
    log = value["attempts"]["portable"]["log"]
    assert log.endswith("END") and len(log) <= gpu_kit.TEXT_LIMIT + 10
    (tmp_path / "log.txt").write_text("a" * 25000 + "the end")
    text = gpu_kit.read_value(tmp_path / "log.txt")
    assert text.endswith("the end") and len(text) <= gpu_kit.TEXT_LIMIT + 10


def test_run_sh_phases_on_a_fixture_carry(tmp_path, sd_bundle, monkeypatch):
    """CI runs the lease script itself: run.sh unpacks a carry folder packed by prepare(), links the package,
    records the packed commit, runs `env` and `ort` (no GPU: ONNX Runtime CUDA says why), and `full` fails at
    once when no export was started (the rule that keeps it from waiting for nothing); the summary is in $OUT."""
    meta, _ = _small_archives(sd_bundle)
    monkeypatch.setattr(gpu_kit, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(gpu_kit, "kit_archives", lambda sites, bundle, ort_dist: ([meta], []))
    report = gpu_kit.prepare(ROOT, tmp_path / "carries", None, sd_bundle[0], False, None, [])
    kit, out = tmp_path / "kit", tmp_path / "out"
    env = {**os.environ, "KIT": str(kit), "OUT": str(out), "CARRY_ROOT": str(tmp_path / "carries"), "REHEARSAL": "1",
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}", "LD_LIBRARY_PATH": ""}
    done = subprocess.run(["bash", "benchmarks/gpu/run.sh", "env", "ort", "full:20"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1, done.stdout + done.stderr  # full could not run
    summary = json.loads((out / "summary.json").read_text())
    phases = summary["phases"]
    assert "metadata: unpacked into" in phases["unpack"]["last"]
    assert phases["env"]["environment"]["commit"].startswith(report["commit"]["commit"])
    assert "cuda_unavailable_reason" in phases["ort"]["result"], phases["ort"]
    assert "export was not started" in phases["full"]["error"] and phases["full"]["seconds"] < 20
    assert (kit / "site" / "importlib_metadata" / "__init__.py").is_file()
    assert (kit / "site" / "turbo_trt" / "runner").is_symlink()
