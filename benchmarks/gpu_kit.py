"""The GPU lease kit's packing, unpacking and bookkeeping (standard library only: it runs on the GPU machine
before anything else is installed). See benchmarks/gpu/README.md and plan.md.

A lease carries at most 64 MiB per call, the working tree included. What the GPU machine lacks is packed
HERE into xz-compressed tar archives, each a list of files taken from installed distributions (their RECORD)
or from a folder (the prebuilt tiny bundle):

    tensorrt-rtx-lib   libtensorrt_rtx.so.1 and its ONNX parser (py3-none wheel: the same for every Python)
    tensorrt-rtx-py    the tensorrt_rtx front end and its bindings (built for the GPU machine's Python)
    diffusers          diffusers and importlib_metadata (the full-size export and the eager baseline)
    tiny-bundle        tiny SD-Turbo: ONNX and CPU-built portable TensorRT-RTX engines
    onnxruntime-gpu    only the files the CUDA provider needs (no TensorRT provider, no C API library,
                       no tools): a separate series, carried only when TensorRT-RTX does not run

`plan` cuts the archives into parts so that each call's folder plus the working tree stays under the limit,
in order of value (the export's needs and the tiny bundle first). THERE, `unpack` gathers each call's parts
into a store that outlives the call (the machine stays warm between calls), checks each complete archive's
sha256 and extracts it. `record` keeps one summary JSON that grows phase by phase, copied into $OUT each
time, so a call cut short still returns what it learned.

    python3 benchmarks/gpu_kit.py prepare --out .gpu --python 3.12 [--ort] [--budget-mib N]
    python3 benchmarks/gpu_kit.py unpack .gpu/c1 ... --store /tmp/tt/store --root /tmp/tt
    python3 benchmarks/gpu_kit.py link-package --repo . --site /tmp/tt/site
    python3 benchmarks/gpu_kit.py record PHASE KEY=JSON ... [--file F]
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MIB = 1 << 20
#: What one `run` call may carry, working tree included (the device tool's limit).
CALL_LIMIT = 64 * MIB
#: Room left in each call for the working tree to grow between packing and the lease (other branches merge).
DEFAULT_MARGIN = 3 * MIB
CACHE = Path(os.environ.get("TURBO_TRT_KIT_CACHE", Path.home() / ".cache" / "turbo-trt" / "gpu-kit"))
#: Files of onnxruntime-gpu the CUDA executor does not need.
ORT_DROP = ("onnxruntime/capi/libonnxruntime_providers_tensorrt.so", "onnxruntime/capi/libonnxruntime.so*",
            "onnxruntime/tools/*", "onnxruntime/transformers/*", "onnxruntime/quantization/*",
            "onnxruntime/datasets/*", "onnxruntime/ThirdPartyNotices.txt", "*/__pycache__/*", "*.pyc")


@dataclass
class Archive:
    """One tar.xz: `members` (name in the archive -> file here), extracted THERE into `dest` (relative to the
    unpack root: "site" or "bundles/<name>")."""

    name: str
    dest: str
    members: dict[str, Path] = field(default_factory=dict)
    preset: int = 9

    def raw_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.members.values())

    def signature(self) -> str:
        """Changes whenever a member's name, size or modification time does (the cache key)."""
        digest = hashlib.sha256(f"{self.name}|{self.dest}|{self.preset}".encode())
        for arcname, path in sorted(self.members.items()):
            st = path.stat()
            digest.update(f"{arcname}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        return digest.hexdigest()[:16]


# -- what to pack ---------------------------------------------------------------------------------------------
def find_distribution(name: str, sites: Iterable[Path]) -> Path:
    """The dist-info folder of distribution `name` in the first of `sites` that has it."""
    wanted = name.lower().replace("-", "_").replace(".", "_")
    for site in sites:
        for info in sorted(Path(site).glob("*.dist-info")):
            project = info.name[: -len(".dist-info")].rsplit("-", 1)[0]
            if project.lower().replace("-", "_").replace(".", "_") == wanted:
                return info
    raise FileNotFoundError(f"distribution {name} is not installed in any of: {', '.join(map(str, sites))}")


def distribution_files(info: Path, drop: Iterable[str] = ()) -> dict[str, Path]:
    """Every file a distribution installed (its RECORD), by its path relative to the site folder; byte
    code and `drop` patterns left out."""
    site = info.parent
    patterns = ("*/__pycache__/*", "*.pyc", *drop)
    files: dict[str, Path] = {}
    for line in (info / "RECORD").read_text().splitlines():
        rel = line.rsplit(",", 2)[0]
        if not rel or rel.startswith("..") or any(fnmatch.fnmatch(rel, p) for p in patterns):
            continue
        path = site / rel
        if path.is_file():
            files[rel] = path
    return files


def folder_files(root: Path, drop: Iterable[str] = ("*.lock", "runtime_cache/*")) -> dict[str, Path]:
    return {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*"))
            if p.is_file() and not any(fnmatch.fnmatch(p.relative_to(root).as_posix(), d) for d in drop)}


def site_packages() -> Path:
    """This interpreter's site-packages (the virtualenv's when run inside one)."""
    import sysconfig

    return Path(sysconfig.get_paths()["purelib"])


def stage_wheels(wheels: Iterable[Path], stage: Path) -> Path:
    """Unzip wheels (built for another Python) into `stage`, which then reads like a site folder."""
    for wheel in wheels:
        marker = stage / f".{wheel.name}.staged"
        if marker.exists():
            continue
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(stage)
        marker.touch()
    return stage


def kit_archives(sites: list[Path], bundle: Path, ort_dist: str | None) -> tuple[list[Archive], list[Archive]]:
    """(the base series in order of value, the ONNX Runtime series) from `sites` (searched in order)."""
    def dist(name: str, drop: Iterable[str] = ()) -> dict[str, Path]:
        return distribution_files(find_distribution(name, sites), drop)

    front = dist("tensorrt_rtx_cu13")
    base = [
        Archive("diffusers", "site", {**dist("diffusers"), **dist("importlib_metadata")}, preset=9),
        Archive("tiny-bundle", "bundles/tiny-sd-turbo", folder_files(bundle), preset=6),
        Archive("tensorrt-rtx-py", "site", {**front, **dist("tensorrt_rtx_cu13_bindings")}, preset=9),
        Archive("tensorrt-rtx-lib", "site", dist("tensorrt_rtx_cu13_libs"), preset=9),
    ]
    ort = [Archive("onnxruntime-gpu", "site", dist(ort_dist, ORT_DROP), preset=9)] if ort_dist else []
    return base, ort


# -- packing --------------------------------------------------------------------------------------------------
def compress(archive: Archive, out: Path) -> Path:
    """tar.xz of the archive's members, cached under its signature (xz -9 of the TensorRT-RTX library takes
    minutes on a small machine: it is done once)."""
    target = out / f"{archive.name}-{archive.signature()}.tar.xz"
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    xz = shutil.which("xz")
    with open(tmp, "wb") as sink:
        if xz:  # the xz tool compresses on every core
            proc = subprocess.Popen([xz, f"-{archive.preset}", "-T0", "-c"], stdin=subprocess.PIPE, stdout=sink)
            assert proc.stdin is not None
            with tarfile.open(fileobj=proc.stdin, mode="w|") as tar:
                for arcname, path in sorted(archive.members.items()):
                    tar.add(path, arcname=arcname)
            proc.stdin.close()
            if proc.wait() != 0:
                raise RuntimeError(f"xz failed on {archive.name}")
        else:
            with tarfile.open(fileobj=sink, mode="w|xz", preset=archive.preset) as tar:  # type: ignore[call-overload]
                for arcname, path in sorted(archive.members.items()):
                    tar.add(path, arcname=arcname)
    tmp.rename(target)
    return target


def sha256_of(paths: Iterable[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as handle:
            while chunk := handle.read(MIB):
                digest.update(chunk)
    return digest.hexdigest()


def tree_bytes(repo: Path) -> int:
    """What a `run` call sends besides its carry folders: tracked and untracked-not-ignored files (and a
    shared/ folder inside the checkout, which travels too)."""
    out = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "-co", "--exclude-standard"],
                         capture_output=True, check=True).stdout.decode().split("\0")
    total = sum((repo / f).stat().st_size for f in out if f and (repo / f).is_file())
    shared = repo / "shared"
    if shared.is_dir() and not shared.is_symlink():
        total += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file())
    return total


@dataclass
class Piece:
    archive: str
    dest: str
    part: int
    parts: int
    start: int
    size: int
    sha256: str  # of the whole archive
    file: Path  # the compressed archive here


def plan_calls(files: list[tuple[Archive, Path]], budget: int) -> list[list[Piece]]:
    """Fill calls in order, each with at most `budget` bytes; an archive that does not fit is cut into parts
    (the rest goes into the next call)."""
    calls: list[list[Piece]] = [[]]
    room = budget
    for archive, path in files:
        size, offset, pieces = path.stat().st_size, 0, []
        digest = sha256_of([path])
        while offset < size:
            if room <= 0:
                calls.append([])
                room = budget
            take = min(room, size - offset)
            pieces.append(Piece(archive.name, archive.dest, 0, 0, offset, take, digest, path))
            calls[-1].append(pieces[-1])
            offset += take
            room -= take
        for index, piece in enumerate(pieces):
            piece.part, piece.parts = index, len(pieces)
    return [call for call in calls if call]


def write_carries(calls: list[list[Piece]], out: Path, prefix: str) -> list[Path]:
    """One folder per call (`out/<prefix>1`, ...), each with its parts and a kit.json saying what they are."""
    folders = []
    for number, call in enumerate(calls, 1):
        folder = out / f"{prefix}{number}"
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        entries = []
        for piece in call:
            name = f"{piece.archive}.tar.xz.part{piece.part:02d}"
            with open(piece.file, "rb") as src, open(folder / name, "wb") as dst:
                src.seek(piece.start)
                remaining = piece.size
                while remaining:
                    chunk = src.read(min(MIB * 8, remaining))
                    dst.write(chunk)
                    remaining -= len(chunk)
            entries.append({"archive": piece.archive, "dest": piece.dest, "file": name, "part": piece.part,
                            "parts": piece.parts, "sha256": piece.sha256})
        (folder / "kit.json").write_text(json.dumps({"call": f"{prefix}{number}", "pieces": entries}, indent=1))
        folders.append(folder)
    return folders


def _commit(repo: Path) -> dict[str, Any]:
    """The commit the kit was packed from (the GPU machine gets a working tree without .git): its hash and
    whether the tree had uncommitted changes."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "-uno"))}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def prepare(repo: Path, out: Path, python: str | None, bundle: Path, ort: bool, budget: int | None,
            wheels: list[Path]) -> dict[str, Any]:
    """Build the carry folders `out/c1..` (base series) and `out/o1..` (ONNX Runtime series); refuse a plan
    where a call would pass the limit. `python` None packs for this interpreter (the rehearsal)."""
    stage_sites = [stage_wheels(wheels, CACHE / f"stage-{python}")] if wheels else []
    sites = [*stage_sites, site_packages()]
    ort_dist = None
    if ort:
        ort_dist = "onnxruntime_gpu" if any("onnxruntime_gpu" in w.name for w in wheels) else "onnxruntime"
    base, ort_series = kit_archives(sites, bundle, ort_dist)
    tree = tree_bytes(repo)
    if budget is None:
        budget = CALL_LIMIT - tree - DEFAULT_MARGIN
    if budget <= 0:
        raise SystemExit(f"the working tree alone is {tree / MIB:.1f} MiB: nothing fits in a {CALL_LIMIT // MIB} MiB call")
    archives_dir = CACHE / "archives"
    report: dict[str, Any] = {"tree_mib": round(tree / MIB, 2), "budget_mib": round(budget / MIB, 2),
                              "archives": {}, "calls": {}}
    if out.exists():
        for old in out.glob("[co][0-9]*"):
            shutil.rmtree(old)
    files: list[tuple[Archive, Path]] = []
    for archive in [*base, *ort_series]:
        start = time.perf_counter()
        path = compress(archive, archives_dir)
        files.append((archive, path))
        report["archives"][archive.name] = {
            "raw_mib": round(archive.raw_bytes() / MIB, 2), "xz_mib": round(path.stat().st_size / MIB, 2),
            "files": len(archive.members), "seconds": round(time.perf_counter() - start, 1)}
    # One plan for both series: the ONNX Runtime archive starts in the room the base series leaves in its last
    # call (stored there, extracted only once all its parts came), so the fallback needs the fewest calls.
    calls = plan_calls(files, budget)
    base_names = {a.name for a in base}
    last_base = max(i for i, call in enumerate(calls) if any(p.archive in base_names for p in call))
    folders = [*write_carries(calls[: last_base + 1], out, "c"), *write_carries(calls[last_base + 1:], out, "o")]
    commit = _commit(repo)
    for folder in folders:
        manifest = json.loads((folder / "kit.json").read_text())
        manifest["commit"] = commit
        (folder / "kit.json").write_text(json.dumps(manifest, indent=1))
        size = folder_bytes(folder)
        report["calls"][folder.name] = {"carry_mib": round(size / MIB, 2),
                                        "with_tree_mib": round((size + tree) / MIB, 2),
                                        "pieces": [e["file"] for e in manifest["pieces"]]}
        if size + tree > CALL_LIMIT:
            raise SystemExit(f"{folder.name} would carry {(size + tree) / MIB:.1f} MiB with the working tree, "
                             f"over the {CALL_LIMIT // MIB} MiB a call may carry")
    report["commit"] = commit
    (out / "plan.json").write_text(json.dumps(report, indent=1) + "\n")
    return report


# -- unpacking (THERE) ----------------------------------------------------------------------------------------
class _Concat(io.RawIOBase):
    """The parts of an archive read as one stream (nothing is concatenated on disk)."""

    def __init__(self, paths: list[Path]) -> None:
        self.paths = list(paths)
        self.handle: io.BufferedReader | None = None

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        while True:
            if self.handle is None:
                if not self.paths:
                    return 0
                self.handle = open(self.paths.pop(0), "rb")
            n = self.handle.readinto(buffer)
            if n:
                return n
            self.handle.close()
            self.handle = None


def _safe_members(tar: tarfile.TarFile) -> Iterator[tarfile.TarInfo]:
    for member in tar:
        if member.name.startswith("/") or ".." in Path(member.name).parts or not (member.isfile() or member.isdir()):
            raise RuntimeError(f"refusing archive member {member.name!r}")
        yield member


def unpack(carries: list[Path], store: Path, root: Path) -> dict[str, str]:
    """Copy each carry's parts into `store` (each through a .tmp file renamed once complete: a call cut short
    leaves no half part), then extract every archive whose parts are all there (once). An archive whose parts
    do not add up to the packed sha256 loses its parts and index entry, and the error names the carry folders
    to send again. Returns archive -> what happened ("unpacked into ...", "waiting for parts ...", "already
    unpacked"). The commit the kit was packed from goes into `root/commit.json`."""
    store.mkdir(parents=True, exist_ok=True)
    index_file = store / "index.json"
    index: dict[str, dict[str, Any]] = json.loads(index_file.read_text()) if index_file.exists() else {}
    for carry in carries:
        manifest_file = carry / "kit.json"
        if not manifest_file.is_file():
            continue
        manifest = json.loads(manifest_file.read_text())
        if manifest.get("commit"):
            root.mkdir(parents=True, exist_ok=True)
            (root / "commit.json").write_text(json.dumps(manifest["commit"]))
        for piece in manifest["pieces"]:
            if (store / f"{piece['archive']}.done").exists():
                continue
            entry = index.setdefault(piece["archive"], {"dest": piece["dest"], "parts": piece["parts"],
                                                        "sha256": piece["sha256"], "have": [], "from": {}})
            target = store / piece["file"]
            if not target.exists():
                tmp = target.with_name(target.name + ".tmp")
                shutil.copyfile(carry / piece["file"], tmp)
                tmp.rename(target)
            if piece["part"] not in entry["have"]:
                entry["have"].append(piece["part"])
            entry.setdefault("from", {})[str(piece["part"])] = manifest.get("call", carry.name)
    index_file.write_text(json.dumps(index))
    outcome = {}
    for name, entry in list(index.items()):
        done = store / f"{name}.done"
        if done.exists():
            outcome[name] = "already unpacked"
            continue
        if len(entry["have"]) < entry["parts"]:
            outcome[name] = f"waiting for parts: has {sorted(entry['have'])} of {entry['parts']}"
            continue
        parts = [store / f"{name}.tar.xz.part{i:02d}" for i in range(entry["parts"])]
        if sha256_of(parts) != entry["sha256"]:
            for part in parts:
                part.unlink(missing_ok=True)
            del index[name]
            index_file.write_text(json.dumps(index))
            resend = sorted(set(entry.get("from", {}).values())) or ["the folders that carry it"]
            raise RuntimeError(f"{name}: the parts do not add up to the packed archive (sha256 differs); its parts "
                               f"were dropped: send again carry {', '.join(resend)}")
        dest = root / entry["dest"]
        dest.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        with tarfile.open(fileobj=io.BufferedReader(_Concat(parts), MIB), mode="r|xz") as tar:
            for member in _safe_members(tar):
                tar.extract(member, dest)
        for part in parts:
            part.unlink()
        done.touch()
        outcome[name] = f"unpacked into {dest} in {time.perf_counter() - start:.1f} s"
    index_file.write_text(json.dumps(index))
    return outcome


def link_package(repo: Path, site: Path) -> Path:
    """turbo_trt importable from `site` without pip: turbo_trt/ mirrored with links, and builder/, runner/
    and benchmarks/ linked in as its subpackages (the package-dir mapping of pyproject.toml). Left as it is
    when every link already points where it would (a second call of the lease, an export running from it)."""
    package = site / "turbo_trt"
    wanted = {entry.name: entry.resolve() for entry in (repo / "turbo_trt").iterdir() if entry.name != "__pycache__"}
    wanted.update({sub: (repo / sub).resolve() for sub in ("builder", "runner", "benchmarks")})
    if package.is_dir() and not package.is_symlink():
        present = {p.name: p for p in package.iterdir()}
        if set(present) == set(wanted) and all(
                p.is_symlink() and Path(os.readlink(p)) == wanted[name] for name, p in present.items()):
            return package
    if package.is_symlink() or package.is_file():
        package.unlink()
    elif package.exists():
        shutil.rmtree(package)
    package.mkdir(parents=True)
    for name, target in wanted.items():
        (package / name).symlink_to(target)
    return package


def nvidia_library_dirs(sites: Iterable[str]) -> list[str]:
    """nvidia/*/lib folders (torch's CUDA 13 and cuDNN wheels) for LD_LIBRARY_PATH, before Python starts."""
    found: list[str] = []
    for site in sites:
        for lib in sorted(Path(site).glob("nvidia/*/lib")):
            if lib.is_dir() and str(lib) not in found:
                found.append(str(lib))
    return found


# -- the growing summary --------------------------------------------------------------------------------------
def record(summary: Path, out: Path | None, phase: str, values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` under `phase` into the summary (kept outside $OUT, which each call empties) and copy
    it into $OUT."""
    data = json.loads(summary.read_text()) if summary.exists() else {"phases": {}}
    data["phases"].setdefault(phase, {}).update(values)
    data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    summary.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=summary.parent, delete=False) as tmp:
        tmp.write(json.dumps(data, indent=1) + "\n")
    os.replace(tmp.name, summary)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary, out / summary.name)
    return data


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


#: The longest text kept for one string in the summary (longer ones keep their end: errors come last).
TEXT_LIMIT = 20000


def _trimmed(value: Any, limit: int = TEXT_LIMIT) -> Any:
    """`value` with every string longer than `limit` cut to its last `limit` characters (JSON stays JSON)."""
    if isinstance(value, str):
        return value if len(value) <= limit else "[...] " + value[-limit:]
    if isinstance(value, dict):
        return {k: _trimmed(v, limit) for k, v in value.items()}
    if isinstance(value, list):
        return [_trimmed(v, limit) for v in value]
    return value


def read_value(path: Path, limit: int = TEXT_LIMIT) -> Any:
    """A file for the summary: its whole JSON parsed first (then only long strings in it trimmed), else its
    text's last `limit` characters."""
    return _trimmed(_value(path.read_text(errors="replace")), limit)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gpu_kit.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="pack the carry folders HERE")
    p.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--python", default=None, help="the GPU machine's Python (3.12); default: this interpreter's")
    p.add_argument("--bundle", type=Path, required=True, help="the prebuilt tiny bundle")
    p.add_argument("--wheels", type=Path, nargs="*", default=[], help="binary wheels built for --python")
    p.add_argument("--ort", action="store_true", help="pack the ONNX Runtime series (out/o1..) too")
    p.add_argument("--budget-mib", type=float, default=None,
                   help=f"bytes per call (default: {CALL_LIMIT // MIB} MiB - the working tree - {DEFAULT_MARGIN // MIB} MiB)")
    u = sub.add_parser("unpack", help="THERE: gather parts, extract complete archives")
    u.add_argument("carries", type=Path, nargs="*")
    u.add_argument("--store", type=Path, required=True)
    u.add_argument("--root", type=Path, required=True)
    k = sub.add_parser("link-package", help="make turbo_trt importable from a site folder")
    k.add_argument("--repo", type=Path, default=Path("."))
    k.add_argument("--site", type=Path, required=True)
    n = sub.add_parser("nvidia-libs", help="print nvidia/*/lib folders of this Python's sites, ':'-joined")
    n.add_argument("sites", nargs="*")
    r = sub.add_parser("record", help="merge KEY=JSON values into the summary")
    r.add_argument("phase")
    r.add_argument("values", nargs="*")
    r.add_argument("--summary", type=Path, default=Path(os.environ.get("KIT_SUMMARY", "/tmp/tt/summary.json")))
    r.add_argument("--file", action="append", default=[], help="KEY=PATH: the file's JSON (or text) as the value")
    args = parser.parse_args(argv)
    if args.command == "prepare":
        budget = int(args.budget_mib * MIB) if args.budget_mib else None
        report = prepare(args.repo, args.out, args.python, args.bundle, args.ort, budget, args.wheels)
        print(f"working tree {report['tree_mib']} MiB; {report['budget_mib']} MiB per call for carries")
        for name, a in report["archives"].items():
            print(f"  archive {name}: {a['raw_mib']} MiB -> {a['xz_mib']} MiB xz ({a['files']} files)")
        for name, c in report["calls"].items():
            print(f"  call {name}: carry {c['carry_mib']} MiB, with the working tree {c['with_tree_mib']} MiB "
                  f"(limit {CALL_LIMIT // MIB}): {', '.join(c['pieces'])}")
    elif args.command == "unpack":
        for name, what in unpack(args.carries, args.store, args.root).items():
            print(f"{name}: {what}")
    elif args.command == "link-package":
        print(link_package(args.repo, args.site))
    elif args.command == "nvidia-libs":
        import site

        print(":".join(nvidia_library_dirs(args.sites or [*site.getsitepackages(), *sys.path])))
    elif args.command == "record":
        values = {key: _value(text) for key, _, text in (v.partition("=") for v in args.values)}
        for item in args.file:
            key, _, path = item.partition("=")
            if Path(path).is_file():
                values[key] = read_value(Path(path))
        out = os.environ.get("OUT")
        record(args.summary, Path(out) if out else None, args.phase, values)
    return 0


if __name__ == "__main__":
    sys.exit(main())
