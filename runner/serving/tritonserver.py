"""Run the `tritonserver` binary that the PyTriton wheel ships, and the environment Triton's Python backend
needs on this machine.

The Python backend runs models in a stub process linked against `libpython3.X.so`. The dynamic loader
finds the first such library on its search path, which can be the system's Python of the same version
rather than this interpreter's (its standard library then disagrees with the loaded library, and the stub
fails in odd places). `python_library_env` puts this interpreter's library directory first.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import signal
import site
import sys
import sysconfig
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from turbo_trt.errors import UsageError

#: model.py adds these directories with `site.addsitedir` (so .pth files, e.g. an editable install, work).
SITE_DIRS_ENV = "TURBO_TRT_SITE_DIRS"


def python_library_dir() -> str | None:
    """The directory holding this interpreter's libpython (None for a statically linked Python)."""
    libdir = sysconfig.get_config_var("LIBDIR")
    name = sysconfig.get_config_var("INSTSONAME") or sysconfig.get_config_var("LDLIBRARY")
    if libdir and name and (Path(libdir) / name).exists():
        return str(libdir)
    return None


def python_library_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default: os.environ) with this interpreter's libpython directory first on LD_LIBRARY_PATH."""
    result = dict(os.environ if env is None else env)
    libdir = python_library_dir()
    if libdir:
        parts = [p for p in result.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p and p != libdir]
        result["LD_LIBRARY_PATH"] = os.pathsep.join([libdir, *parts])
    return result


def interpreter_path(path: str) -> str:
    """`path` with this interpreter's directory first. The backend stub embeds libpython and finds its
    prefix the way a `python` found on PATH would: without this, a virtual environment that is not
    activated (`.venv/bin/turbo-trt serve`) gives the stub the base installation's site-packages, whose
    numpy may be another major version than the stub's numpy API expects (measured: numpy 2.4 in the base,
    1.26 in the environment; every text input then arrived garbled and the stub died)."""
    here = os.path.dirname(sys.executable)
    return os.pathsep.join([here, *(p for p in path.split(os.pathsep) if p and p != here)])


def site_dirs() -> list[str]:
    """This interpreter's site-packages directories (where turbo_trt and its dependencies are installed)."""
    dirs = list(site.getsitepackages())
    user = site.getusersitepackages()
    if isinstance(user, str) and os.path.isdir(user):
        dirs.append(user)
    return dirs


def pytriton_server_dir() -> Path:
    """The `tritonserver` distribution inside the installed PyTriton wheel."""
    try:
        import pytriton
    except ImportError as exc:
        raise UsageError("this needs PyTriton: pip install 'turbo-trt[serve]'") from exc
    root = Path(pytriton.__file__).resolve().parent / "tritonserver"
    if not (root / "bin" / "tritonserver").is_file():
        raise UsageError(f"{root} has no bin/tritonserver: reinstall nvidia-pytriton")
    return root


def prepare_backend_dir(dest: Path) -> Path:
    """A Triton backend directory for this interpreter: PyTriton's Python backend plus the backend stub
    built for this Python version (the wheel keeps one stub per version aside). Returns `dest`."""
    server = pytriton_server_dir()
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    stub = server / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise UsageError(f"PyTriton ships no Python backend stub for Python {version}")
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    files = [item for item in (server / "backends" / "python").iterdir() if item.is_file()] + [stub]
    for item in files:
        target = python_dir / item.name
        if not target.exists():  # copied beside its place and renamed: a concurrent start sees whole files
            tmp = python_dir / f".{item.name}.{os.getpid()}.tmp"
            shutil.copy2(item, tmp)
            os.replace(tmp, target)
    return dest


def default_backend_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "turbo-trt" / "triton-backends" / f"py{sys.version_info[0]}.{sys.version_info[1]}"


def listen_summary(address: str, http_port: int, grpc_port: int, metrics_port: int) -> str:
    """Where the endpoints listen, with the address they really bind."""
    where = f"{address} (every interface)" if address in ("0.0.0.0", "::") else address
    return (f"binding {where}: HTTP port {http_port}, gRPC port {grpc_port}, "
            f"metrics port {metrics_port} (/metrics)")


def server_command(repository: Path, http_port: int = 8000, grpc_port: int = 8001, metrics_port: int = 8002,
                   address: str = "127.0.0.1", backend_dir: Path | None = None,
                   extra_args: tuple[str, ...] = ()) -> tuple[list[str], dict[str, str]]:
    """argv and environment to serve `repository` with PyTriton's `tritonserver` binary on this machine."""
    server = pytriton_server_dir()
    backends = prepare_backend_dir(backend_dir or default_backend_dir())
    env = python_library_env()
    libs = server.parent.parent / "nvidia_pytriton.libs"
    if libs.is_dir():
        env["LD_LIBRARY_PATH"] = os.pathsep.join([env["LD_LIBRARY_PATH"], str(libs)])
    env[SITE_DIRS_ENV] = os.pathsep.join(site_dirs())
    env["PATH"] = interpreter_path(env.get("PATH", ""))
    argv = [
        str(server / "bin" / "tritonserver"), f"--model-repository={repository}",
        f"--backend-directory={backends}", f"--cache-directory={server / 'caches'}",
        f"--http-address={address}", f"--http-port={http_port}", f"--grpc-address={address}",
        f"--grpc-port={grpc_port}", f"--metrics-address={address}", f"--metrics-port={metrics_port}",
        "--strict-readiness=true", *extra_args,
    ]
    return argv, env


def http_ready(address: str, http_port: int, timeout: float = 2) -> bool:
    """Whether Triton at `address` (0.0.0.0/:: polled on loopback) answers /v2/health/ready with 200."""
    host = "127.0.0.1" if address in ("0.0.0.0", "::", "") else address
    try:
        with urllib.request.urlopen(f"http://{host}:{http_port}/v2/health/ready", timeout=timeout) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """For Popen's preexec_fn (runs in the child): the kernel sends the child SIGTERM when the thread that
    started it dies, so a killed `turbo-trt serve` (SIGKILL, OOM) takes its tritonserver along. Linux only
    (elsewhere a no-op). Start the child from a thread that lives as long as the child should."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)


def process_tree(pid: int) -> list[int]:
    """`pid` and every process below it, parents first (from /proc/*/stat; [pid] where /proc is absent)."""
    children: dict[int, list[int]] = {}
    entries = os.listdir("/proc") if os.path.isdir("/proc") else []
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop(0)
        found.append(current)
        todo.extend(children.get(current, []))
    return found


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> list[int]:
    """Send `sig` to `pid` and all its descendants (listed before any is signalled, so none escapes by being
    re-parented); returns the pids signalled."""
    pids = process_tree(pid)
    for member in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(member, sig)
    return pids
