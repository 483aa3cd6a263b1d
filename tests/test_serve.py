"""Serving on Triton: a real server on loopback (free ports) with tiny bundles and the ONNX Runtime executor,
called with tritonclient over HTTP and gRPC, and with plain JSON over HTTP (as curl sends it).

- `turbo-trt serve` (default `--backend python`: the exported repository on the `tritonserver` binary the
  PyTriton wheel ships) on the batch-1 tiny SD-Turbo bundle: txt2img and img2img bit for bit equal to direct
  TurboPipeline calls with the same seeds; every bad request gets an error that starts with the field's name
  (or, for what Triton checks itself, names it) with no traceback, file or path, and the server keeps serving.
- `turbo-trt serve --backend pytriton` (Triton bound in this process, PyTriton's model file wrapped) on a
  batch-2 bundle with 2 instances: the same images and the same clean errors; its verdict output stays out
  of the metadata; its callable runs each request of a batch once (unit test with a fault in one call).
- Both backends: a good and a bad request grouped by the dynamic batcher into one execution get one image
  and one clean error; a weight file corrupted under a running server (a real fault: ONNX Runtime reads the
  memory-mapped external data) answers `internal error (id ...)`, and the server log has that id beside the
  traceback; concurrent clients on 2 instances of a batch-2 bundle, whose requests the dynamic batcher
  groups (Triton's metrics show fewer executions than inferences), each get what their request gets alone;
  a corrupted bundle never gets ready and `serve` exits non-zero with the reason.
- SIGTERM with requests in flight (`--backend pytriton`) answers them all and exits cleanly; the default
  backend's clean stop is checked when its serve1 fixture stops.
- `turbo-trt export-triton` served by a stock `tritonserver` run: the same images, bad requests failing alone;
  a corrupted bundle never gets ready.

Every request loop is bounded in count and every wait in time.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from turbo_trt.benchmarks.serve_bench import free_ports
from turbo_trt.errors import InputError
from turbo_trt.runner import TurboPipeline
from turbo_trt.runner.serving.batching import run_requests
from turbo_trt.runner.serving.client import infer_inputs, json_request, request_arrays, request_inputs
from turbo_trt.runner.serving.errors import INTERNAL_MESSAGE, INTERNAL_PATTERN, Answer
from turbo_trt.runner.serving.repository import ExportOptions, config_pbtxt, export_repository
from turbo_trt.runner.serving.requests import ModelFacts, RequestError, ServeRequest, decode_request, decode_requests
from turbo_trt.runner.serving.tritonserver import http_ready, kill_tree, server_command

from .conftest import copy_bundle, quiet_build, tiny_options

START_TIMEOUT_S = 120  # server start on 2 shared cores: import, sha256, sessions, warm-up, Triton
REQUEST_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60
SIZE = 64


# ---------------------------------------------------------------------------------------------- helpers


class Server:
    """A server process (turbo-trt serve, or tritonserver) with its log in a file."""

    def __init__(self, argv: list[str], log: Path, env: dict[str, str] | None = None) -> None:
        self.http, self.grpc, self.metrics = free_ports(3)
        argv = [a.format(http=self.http, grpc=self.grpc, metrics=self.metrics) for a in argv]
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def ready(self) -> bool:
        return http_ready("127.0.0.1", self.http)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.log()[-4000:]}")
            if self.ready():
                return
            time.sleep(0.5)
        raise AssertionError(f"server not ready after {timeout} s:\n{self.log()[-4000:]}")

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            self.proc.wait(10)
            raise AssertionError(f"server did not stop within {timeout} s:\n{self.log()[-4000:]}") from None
        finally:
            self._log.close()

    def http_client(self) -> httpclient.InferenceServerClient:
        return httpclient.InferenceServerClient(f"127.0.0.1:{self.http}", connection_timeout=10,
                                                network_timeout=REQUEST_TIMEOUT_S)

    def grpc_client(self) -> grpcclient.InferenceServerClient:
        return grpcclient.InferenceServerClient(f"127.0.0.1:{self.grpc}")

    def metric(self, name: str, **labels: str) -> float:
        """A counter from Triton's Prometheus endpoint, for model "turbo" (and the given labels)."""
        import urllib.request

        text = urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10).read().decode()
        wanted = {f'{key}="{value}"' for key, value in {"model": "turbo", **labels}.items()}
        for match in re.finditer(rf"^{name}{{([^}}]*)}} ([0-9.e+]+)$", text, re.MULTILINE):
            if wanted <= set(match.group(1).split(",")):
                return float(match.group(2))
        raise AssertionError(f"{name} {labels} not in the metrics:\n{text[:2000]}")


def serve_argv(bundle: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "turbo_trt.cli", "serve", "--engines", str(bundle), "--executor", "onnxruntime",
            "--address", "127.0.0.1", "--http-port", "{http}", "--grpc-port", "{grpc}", "--metrics-port", "{metrics}",
            *extra]


def infer(client: Any, protocol: Any, **request: Any) -> np.ndarray:
    if protocol is grpcclient:
        result = client.infer("turbo", request_inputs(protocol, **request), client_timeout=REQUEST_TIMEOUT_S)
    else:
        result = client.infer("turbo", request_inputs(protocol, **request))
    image = result.as_numpy("image")
    assert image is not None and image.shape == (1, SIZE, SIZE, 3) and image.dtype == np.uint8
    return image[0]


def alone(pipe: TurboPipeline, prompt: str, seed: int, steps: int = 1, image: np.ndarray | None = None,
          strength: float | None = None) -> np.ndarray:
    """What a request gets when it is the only one in its engine call."""
    inputs: dict[str, Any] = {"prompt": prompt.encode(), "seed": seed, "steps": steps, "image": image}
    if strength is not None:
        inputs["strength"] = strength
    [outcome] = run_requests(pipe, [decode_request(inputs, ModelFacts.of(pipe))])
    assert isinstance(outcome, np.ndarray)
    return outcome


def init_image(seed: int) -> np.ndarray:
    ramp = np.linspace(0, 255, SIZE, dtype=np.float32)
    noise = np.random.default_rng(seed).integers(0, 40, (SIZE, SIZE, 3))
    return np.clip(ramp[None, :, None] * 0.7 + ramp[:, None, None] * 0.2 + noise, 0, 255).astype(np.uint8)


def run_clients(jobs: list[Callable[[], Any]], timeout: float = 120) -> list[Any]:
    """Run each job in its own thread at once; results (or exceptions) in order. Bounded by `timeout`."""
    results: list[Any] = [None] * len(jobs)

    def work(i: int) -> None:
        try:
            results[i] = jobs[i]()
        except Exception as exc:  # noqa: BLE001 - the test inspects it
            results[i] = exc

    threads = [threading.Thread(target=work, args=(i,), daemon=True) for i in range(len(jobs))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"clients still waiting after {timeout} s"
    return results


def request_dict(prompt: str, **fields: Any) -> dict[str, np.ndarray]:
    """One request's input arrays by name, as Triton hands them to a model (with the batch dimension)."""
    return {name: array for name, _, array in request_arrays(prompt, **fields)}


def post_json(server: Server, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST a KServe v2 JSON body to /v2/models/turbo/infer, as curl does: (HTTP status, parsed reply)."""
    request = urllib.request.Request(f"http://127.0.0.1:{server.http}/v2/models/turbo/infer", data=body,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=REQUEST_TIMEOUT_S) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def send_for_error(server: Server, protocol: str, arrays: list[Any]) -> tuple[str, str]:
    """Send a request that must fail over "json" (plain HTTP JSON), "http" or "grpc" (tritonclient):
    (status, the error text the client reads)."""
    if protocol == "json":
        status, reply = post_json(server, json.dumps(json_request(arrays)).encode())
        assert "error" in reply, f"the request succeeded: {str(reply)[:300]}"
        return str(status), reply["error"]
    module = httpclient if protocol == "http" else grpcclient
    client = server.http_client() if protocol == "http" else server.grpc_client()
    try:
        with pytest.raises(InferenceServerException) as info:
            client.infer("turbo", infer_inputs(module, arrays))
        return str(info.value.status()), str(info.value.message())
    finally:
        client.close()


CLIENT_ERROR = {"400", "StatusCode.INVALID_ARGUMENT"}
SERVER_ERROR = {"500", "StatusCode.INTERNAL"}
#: Text that must never reach a client: tracebacks, source lines, internal class names.
LEAKS = ("Traceback", 'File "', "Exception", "RequestError", "InputError", "pytriton", "turbo_trt",
         ".py", "model-store")


def assert_clean(message: str, server_paths: list[str], label: str = "") -> None:
    for leak in [*LEAKS, *server_paths]:
        assert leak not in message, f"{label}: {leak!r} reached the client: {message[:800]}"
    assert not re.search(r"(^|[\s'\"(=])/[\w.-]+/", message), f"{label}: a path reached the client: {message[:800]}"
    assert not re.search(r", line \d+", message), f"{label}: a source line reached the client: {message[:800]}"


def server_paths(*bundles: Path) -> list[str]:
    """Paths of this machine that a client must not read: the checkout, the Python install, home, the bundles."""
    import turbo_trt

    return [str(Path(turbo_trt.__file__).resolve().parents[1]), sys.prefix, str(Path.home()),
            *(str(b.resolve()) for b in bundles)]


# --------------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def batch2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny SD-Turbo with a static batch of 2, ONNX only (the ONNX Runtime executor needs no engines)."""
    out = tmp_path_factory.mktemp("serve") / "tiny-sd-turbo-b2"
    quiet_build(tiny_options("tiny-sd-turbo", out, batch=2, onnx_only=True))
    return out


@pytest.fixture(scope="module")
def pipe1(sd_bundle) -> TurboPipeline:
    return TurboPipeline.from_bundle(sd_bundle[0], executor="onnxruntime")


@pytest.fixture(scope="module")
def pipe2(batch2_bundle) -> TurboPipeline:
    return TurboPipeline.from_bundle(batch2_bundle, executor="onnxruntime")


def not_activated_env() -> dict[str, str]:
    """This environment as a user has it who runs `.venv/bin/turbo-trt` without activating the virtual
    environment: its bin directory is not on PATH (the server must still give the backend stub this
    interpreter's packages, not the base installation's)."""
    here = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != here)
    return env


@pytest.fixture(scope="module")
def serve1(sd_bundle, tmp_path_factory):
    server = Server(serve_argv(sd_bundle[0]), tmp_path_factory.mktemp("serve1") / "log.txt", env=not_activated_env())
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
    # The default backend stops cleanly on SIGTERM (requests in flight at SIGTERM: the pytriton backend's test).
    assert code == 0 and "stopping: finishing requests in flight" in server.log() and "stopped" in server.log(), \
        server.log()[-3000:]


@pytest.fixture(scope="module")
def serve2(batch2_bundle, tmp_path_factory):
    # A long queue delay so that the dynamic batcher reliably groups concurrent requests.
    server = Server(serve_argv(batch2_bundle, "--instances", "2", "--max-queue-delay-us", "200000"),
                    tmp_path_factory.mktemp("serve2") / "log.txt")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def pytriton2(batch2_bundle, tmp_path_factory):
    """`--backend pytriton` (instances are forks in one process): batch 2, 2 instances, a long queue delay."""
    server = Server(serve_argv(batch2_bundle, "--backend", "pytriton", "--instances", "2",
                               "--max-queue-delay-us", "200000"), tmp_path_factory.mktemp("pytriton2") / "log.txt")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


# -------------------------------------------------------------------------------- request checks (units)

def test_request_rules_name_the_field(pipe1):
    facts = ModelFacts.of(pipe1)
    image = init_image(0)
    cases = [
        ({}, "prompt", "required"),
        ({"prompt": b"  "}, "prompt", "must not be empty"),
        ({"prompt": b"caf\xe9"}, "prompt", "UTF-8"),
        ({"prompt": np.array([[b"a", b"b"]], dtype=object)}, "prompt", "exactly one value"),
        ({"prompt": b"a", "steps": 0}, "steps", "1..4"),
        ({"prompt": b"a", "steps": np.array([[1.5]])}, "steps", "datatype"),
        ({"prompt": b"a", "seed": -1}, "seed", "[0, 2**63)"),
        ({"prompt": b"a", "strength": 0.5}, "strength", "image-to-image only"),
        ({"prompt": b"a", "image": image, "strength": 0.0}, "strength", "(0, 1]"),
        ({"prompt": b"a", "image": image, "strength": 0.2, "steps": 2}, "strength", "0 steps"),
        ({"prompt": b"a", "image": image[:32]}, "image", "UINT8 [64, 64, 3]"),
        ({"prompt": b"a", "image": image.astype(np.float32)}, "image", "UINT8"),
    ]
    for inputs, field, rule in cases:
        with pytest.raises(RequestError) as info:
            decode_request(inputs, facts)
        assert info.value.field == field and rule in str(info.value), (inputs, str(info.value))
    request = decode_request({"prompt": "naïve".encode(), "image": image[None], "steps": 2}, facts)
    assert request.prompt == "naïve" and request.plan.mode == "img2img" and request.plan.runs == 1  # strength 0.5


def test_answers_give_bad_requests_their_message_and_failures_an_id():
    """One engine call's exception fails its requests under one id, logged once with its traceback; a bad
    request keeps its message (one log line); a success gets no answer."""
    from turbo_trt.runner.serving.errors import answers

    def fail() -> None:
        raise RuntimeError("engine exploded at /opt/secret/path")

    try:
        fail()
    except RuntimeError as caught:
        failure = caught
    lines: list[str] = []
    bad = RequestError("steps", "num_inference_steps must be an integer in 1..4, got 7")
    replies = answers([np.zeros(1), bad, failure, failure], lines.append, "turbo")
    assert replies[0] is None and replies[1] == Answer(str(bad), True)
    assert replies[2] == replies[3] and replies[2] is not None and not replies[2].bad_request
    match = INTERNAL_PATTERN.match(replies[2].message)
    assert match and replies[2].message == INTERNAL_MESSAGE.format(id=match.group(1)) and "/opt" not in replies[2].message
    assert lines[0] == f"turbo: request 2 of 4 refused: {bad}" and len(lines) == 2
    assert lines[1].startswith(f"internal error (id {match.group(1)}) in turbo, request 3 of 4:\nTraceback")
    assert "engine exploded at /opt/secret/path" in lines[1] and "in fail" in lines[1]
    # An InputError raised inside an engine call passed the request checks: the server's fault, not the client's.
    inside = InputError("noise latents have shape (1, 4, 8, 8), expected ... (/srv/bundles/x)")
    [reply] = answers([inside], lines.append, "turbo")
    assert reply is not None and not reply.bad_request and INTERNAL_PATTERN.match(reply.message), reply


def test_a_request_that_fails_to_decode_fails_alone(pipe1):
    """Any exception while decoding one request (here: reading its tensors) is that request's outcome only."""
    facts = ModelFacts.of(pipe1)
    decoded = decode_requests([{"prompt": b"fine"}, None, {"prompt": b""}], facts, lambda r: dict(r))
    assert isinstance(decoded[0], ServeRequest) and decoded[0].prompt == "fine"
    assert isinstance(decoded[1], TypeError) and isinstance(decoded[2], RequestError)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")  # a zombie has exited


def _parent_with_child(die_with_parent: bool) -> tuple[subprocess.Popen[bytes], int]:
    """A Python process that starts `sleep 120` (as serve starts tritonserver) and prints the sleeper's pid."""
    script = ("import subprocess, sys, time\n"
              "from turbo_trt.runner.serving.tritonserver import die_with_parent\n"
              f"child = subprocess.Popen(['sleep', '120'], start_new_session=True, "
              f"preexec_fn={'die_with_parent' if die_with_parent else 'None'})\n"
              "print(child.pid, flush=True)\ntime.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    assert parent.stdout is not None
    return parent, int(parent.stdout.readline())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux's")
def test_server_child_dies_with_serve_and_kill_tree_reaches_every_process():
    """serve starts tritonserver with die_with_parent: a serve killed outright (SIGKILL) takes it along; the
    fallback kill of the bench and the tests (kill_tree) reaches a child in a session of its own."""
    parent, child = _parent_with_child(die_with_parent=True)
    try:
        assert _alive(child)
        parent.kill()
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "the child outlived its killed parent"
            time.sleep(0.05)
    finally:
        kill_tree(parent.pid)
        if _alive(child):
            os.kill(child, signal.SIGKILL)
    parent, child = _parent_with_child(die_with_parent=False)
    try:
        assert kill_tree(parent.pid) == [parent.pid, child]
        parent.wait(10)
        deadline = time.monotonic() + 10
        while _alive(child):
            assert time.monotonic() < deadline, "kill_tree missed the child"
            time.sleep(0.05)
    finally:
        if _alive(child):
            os.kill(child, signal.SIGKILL)


def test_config_has_one_instance_group_per_gpu():
    text = config_pbtxt("turbo", 4, 512, 512, [0, 1, 2], 2, "tensorrt", "/b", 1000)
    assert text.count("kind: KIND_GPU") == 3 and "gpus: [ 2 ]" in text and "count: 2" in text
    assert "max_batch_size: 4" in text and "dims: [ 512, 512, 3 ]" in text
    assert 'name: "seed" data_type: TYPE_INT64 dims: [ -1 ] optional: true' in text  # the model checks dims
    assert 'name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, -1 ] optional: true' in text
    cpu = config_pbtxt("turbo", 1, 64, 64, [], 3, "onnxruntime", "/b", 1000)
    assert "count: 3 kind: KIND_CPU" in cpu and "KIND_GPU" not in cpu


def test_warm_up_runs_every_likely_plan_before_ready(sd_bundle):
    """Warm-up makes one engine call per likely plan (the graph captures it adds on a GPU, one per plan and
    variant, are checked by tests/test_gpu.py::test_serving_warm_up_captures_every_graph)."""
    from turbo_trt.runner.serving.batching import warm_up

    pipe = TurboPipeline.from_bundle(sd_bundle[0], executor="onnxruntime")
    try:
        max_steps = int(pipe.scheduler["max_steps"])
        assert warm_up(pipe) == max_steps * (2 if pipe.bundle.img2img else 1)
        assert pipe.executor.cache_stats()["entries"] == 1  # every call used the one warm-up prompt
    finally:
        pipe.close()


def test_config_paths_are_escaped():
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    odd = '/data/a "quoted" dir\\with\\backslashes'
    config = text_format.Parse(config_pbtxt("turbo", 1, 64, 64, [], 1, "onnxruntime", odd, 1000),
                               model_config_pb2.ModelConfig())
    assert config.parameters["bundle"].string_value == odd and config.name == "turbo"


def test_gpu_instance_maps_to_the_visible_device():
    from turbo_trt.runner.serving.triton_model import visible_device

    assert visible_device(1, None) == "1" and visible_device(1, "") == "1"
    assert visible_device(0, "2,3") == "2" and visible_device(1, "2, 3") == "3"
    assert visible_device(0, "GPU-abc,GPU-def") == "GPU-abc"
    with pytest.raises(RuntimeError, match="outside"):
        visible_device(2, "2,3")


# ------------------------------------------------------------------------------------ turbo-trt serve

@pytest.mark.parametrize("protocol", [httpclient, grpcclient], ids=["http", "grpc"])
def test_serve_matches_direct_pipeline(serve1, pipe1, protocol):
    client = serve1.http_client() if protocol is httpclient else serve1.grpc_client()
    try:
        for prompt, seed, steps in [("a red cat", 0, 1), ("a photo of an astronaut", 12345, 2)]:
            served = infer(client, protocol, prompt=prompt, seed=seed, steps=steps)
            direct = pipe1(prompt, num_inference_steps=steps, seed=seed, output_type="np")[0]
            np.testing.assert_array_equal(served, direct)
        image = init_image(1)
        served = infer(client, protocol, prompt="a blue house", seed=7, steps=2, image=image, strength=0.5)
        direct = pipe1("a blue house", num_inference_steps=2, seed=7, image=image, strength=0.5, output_type="np")[0]
        np.testing.assert_array_equal(served, direct)
        served = infer(client, protocol, prompt="a blue house", seed=8, image=image, strength=1.0)  # steps 1
        direct = pipe1("a blue house", num_inference_steps=1, seed=8, image=image, strength=1.0, output_type="np")[0]
        np.testing.assert_array_equal(served, direct)
    finally:
        client.close()


def test_serve_unseeded_requests_differ(serve1):
    client = serve1.http_client()
    try:
        first, second = (infer(client, httpclient, prompt="a red cat") for _ in range(2))
        assert not np.array_equal(first, second)
    finally:
        client.close()


def bad_requests() -> list[tuple[str, list[Any], str, str, str]]:
    """(label, inputs, field, text the error must hold, who checks it: "model" (the runner's rules: the
    error starts with "<field>: ") or "triton" (datatype and dims, checked by Triton before any model code:
    its own text, which names the input in quotes): only a datatype, as the model's config declares every
    input's dims variable so that the model checks them)."""
    image = init_image(2)
    prompt = request_arrays("a cat")
    return [
        ("missing prompt", [("seed", "INT64", np.array([[1]], np.int64))], "prompt", "required", "model"),
        ("empty prompt", request_arrays("", seed=1), "prompt", "must not be empty", "model"),
        ("non-UTF-8 prompt", request_arrays(b"\xff\xfe cat", seed=1), "prompt", "UTF-8", "model"),
        ("steps as INT64", [*prompt, ("steps", "INT64", np.array([[2]], np.int64))], "steps", "INT32", "triton"),
        ("seed of shape [1, 2]", [*prompt, ("seed", "INT64", np.array([[1, 2]], np.int64))], "seed",
         "exactly one value", "model"),
        ("steps out of range", request_arrays("a cat", steps=5), "steps", "1..4", "model"),
        ("steps zero", request_arrays("a cat", steps=0), "steps", "1..4", "model"),
        ("steps 7", request_arrays("a cat", steps=7), "steps", "1..4, got 7", "model"),
        ("strength that runs zero steps", request_arrays("a cat", steps=2, image=image, strength=0.25), "strength",
         "0 steps", "model"),
        ("image of the wrong size", request_arrays("a cat", image=image[:32, :32]), "image",
         "must be UINT8 [64, 64, 3] (the bundle's size, RGB), got uint8 [32, 32, 3]", "model"),
        ("seed out of range", request_arrays("a cat", seed=-5), "seed", "[0, 2**63)", "model"),
    ]


def check_bad_requests(server: Server, protocol: str, bundle: Path) -> None:
    paths = server_paths(bundle)
    for label, arrays, field, rule, checker in bad_requests():
        if protocol == "json" and label == "non-UTF-8 prompt":
            continue  # JSON text is UTF-8 (RFC 8259): a JSON client cannot send these bytes as a string
        status, message = send_for_error(server, protocol, arrays)
        assert status in CLIENT_ERROR, f"{label}: status {status}: {message[:300]}"
        assert rule in message, f"{label}: {rule!r} not in {message[:600]}"
        if checker == "model":
            assert message.startswith(f"{field}: "), f"{label}: does not start with {field!r}: {message[:600]}"
        else:
            assert f"'{field}'" in message, f"{label}: Triton's error does not name {field!r}: {message[:600]}"
        assert_clean(message, paths, label)


@pytest.mark.parametrize("protocol", ["json", "http", "grpc"])
def test_serve_bad_requests_get_clean_errors_and_serving_goes_on(serve1, pipe1, sd_bundle, protocol):
    check_bad_requests(serve1, protocol, sd_bundle[0])
    client = serve1.http_client()
    try:
        served = infer(client, httpclient, prompt="still serving", seed=3)
        np.testing.assert_array_equal(served, pipe1("still serving", seed=3, output_type="np")[0])
    finally:
        client.close()
    assert "refused: steps: num_inference_steps must be an integer in 1..4, got 7" in serve1.log()


@pytest.mark.parametrize("protocol", ["json", "grpc"])
def test_pytriton_backend_serves_and_gets_clean_errors(pytriton2, pipe2, batch2_bundle, protocol):
    """The PyTriton backend: the same images (each equal to its request alone) and the same clean errors."""
    requests: list[dict[str, Any]] = [{"prompt": "a red cat", "seed": 0, "steps": 2},
                                      {"prompt": "a blue house", "seed": 7, "steps": 2, "image": init_image(5),
                                       "strength": 0.5}]
    client = pytriton2.http_client() if protocol == "json" else pytriton2.grpc_client()
    try:
        for request in requests:
            module = httpclient if protocol == "json" else grpcclient
            np.testing.assert_array_equal(infer(client, module, **request), alone(pipe2, **request))
    finally:
        client.close()
    check_bad_requests(pytriton2, protocol, batch2_bundle)
    module = httpclient if protocol == "json" else grpcclient
    client = pytriton2.http_client() if protocol == "json" else pytriton2.grpc_client()
    try:
        metadata = client.get_model_metadata("turbo")
        outputs = metadata["outputs"] if protocol == "json" else [{"name": o.name} for o in metadata.outputs]
        assert [o["name"] for o in outputs] == ["image"], outputs  # the verdict output stays hidden
        with pytest.raises(InferenceServerException) as info:  # a client that asks for its image only
            client.infer("turbo", request_inputs(module, "a cat", steps=7), outputs=[module.InferRequestedOutput("image")])
        assert str(info.value.message()).startswith("steps: num_inference_steps"), info.value
    finally:
        client.close()
    assert "refused: steps: num_inference_steps must be an integer in 1..4, got 7" in pytriton2.log()
    assert "Traceback" not in pytriton2.log(), "a bad request logged a traceback"


def test_pytriton_callable_answers_every_request_once(pipe2, monkeypatch):
    """The PyTriton callable never raises and runs each request once: in one batch a good request, a bad one
    and a good one whose engine call fails (a fault injected into that call only) get an image, a bad-request
    verdict and an internal-error verdict; the engine ran once per plan. The wrapper reads the verdicts back."""
    from pytriton.proxy.types import Request

    from turbo_trt.runner.serving import pytriton_stub
    from turbo_trt.runner.serving.pytriton_server import VERDICT_OUTPUT, make_infer_func

    real = pipe2.run_with_noise
    plans: list[int] = []

    def run_with_noise(prompts, plan, *args, **kwargs):
        plans.append(plan.runs)
        if plan.runs == 2:
            raise RuntimeError("injected: the 2-step engine call failed at /srv/engines/unet.plan")
        return real(prompts, plan, *args, **kwargs)

    monkeypatch.setattr(pipe2, "run_with_noise", run_with_noise)
    lines: list[str] = []
    infer = make_infer_func(pipe2, lines.append)
    good = {"prompt": "good", "seed": 3, "steps": 1}
    batch = [Request(data=request_dict(**good)), Request(data=request_dict("bad", seed=1, steps=7)),
             Request(data=request_dict("fails", seed=4, steps=2))]
    replies = infer(batch)
    assert sorted(plans) == [1, 2], f"engine calls per plan: {plans}"
    assert [sorted(r) for r in replies] == [["image", VERDICT_OUTPUT]] * 3
    assert pytriton_stub.read_verdict(replies[0][VERDICT_OUTPUT][0]) is None
    monkeypatch.setattr(pipe2, "run_with_noise", real)
    np.testing.assert_array_equal(replies[0]["image"][0], alone(pipe2, **good))
    assert pytriton_stub.read_verdict(replies[1][VERDICT_OUTPUT][0]) == (
        "steps: num_inference_steps must be an integer in 1..4, got 7", True)
    message, bad_request = pytriton_stub.read_verdict(replies[2][VERDICT_OUTPUT][0])
    match = INTERNAL_PATTERN.match(message)
    assert not bad_request and match and "/srv" not in message
    assert any(f"internal error (id {match.group(1)})" in line and "injected" in line for line in lines), lines


def test_stub_reads_only_well_formed_verdicts():
    """The wrapper's verdict reader takes exactly one JSON object of the callable's form; anything else raises
    (the wrapper then answers that request with an internal error and an id)."""
    from turbo_trt.runner.serving import errors, pytriton_server, pytriton_stub

    assert pytriton_stub.VERDICT_OUTPUT == pytriton_server.VERDICT_OUTPUT
    assert pytriton_stub.INTERNAL_MESSAGE == errors.INTERNAL_MESSAGE
    text = 'prompt: must be UTF-8 text; byte 0 is "bad"\nx'
    assert pytriton_stub.read_verdict(np.array([pytriton_server.verdict(text, True)], dtype=object)) == (text, True)
    assert pytriton_stub.read_verdict(np.array([b""], dtype=object)) is None
    for broken in ([b"", b""], [], ["text"], [b"not json"], [b'["m", true]'], [b'{"message": "m"}'],
                   [b'{"message": "m", "bad_request": "yes"}'], [b'{"message": 1, "bad_request": true}']):
        with pytest.raises(ValueError):
            pytriton_stub.read_verdict(np.array(broken, dtype=object))

    class Asked:
        def __init__(self, names: list[str]) -> None:
            self.names = names

        def requested_output_names(self) -> list[str]:
            return self.names

    assert pytriton_stub._WithVerdict(Asked(["image"])).requested_output_names() == ["image", "turbo_trt_verdict"]
    assert pytriton_stub._WithVerdict(Asked([])).requested_output_names() == ["turbo_trt_verdict"]
    assert pytriton_stub._WithVerdict(Asked(["image"])).names == ["image"]  # the rest is the request's own


@pytest.mark.parametrize("server_name", ["serve2", "pytriton2"], ids=["default-backend", "pytriton-backend"])
def test_serve_concurrent_clients_are_batched_and_get_their_own_images(server_name, pipe2, request):
    serve2: Server = request.getfixturevalue(server_name)
    requests = []
    for client_index in range(6):
        for k in range(3):
            seed = 100 * client_index + k
            request: dict[str, Any] = {"prompt": f"client {client_index} picture {k}", "seed": seed,
                                       "steps": 1 + (k % 2)}
            if k == 2:
                request.update(image=init_image(seed), strength=1.0)
            requests.append(request)
    expected = [alone(pipe2, **r) for r in requests]
    count_before = serve2.metric("nv_inference_count")
    exec_before = serve2.metric("nv_inference_exec_count")

    def client_job(mine: list[int], protocol: Any) -> dict[int, np.ndarray]:
        client = serve2.http_client() if protocol is httpclient else serve2.grpc_client()
        try:
            return {i: infer(client, protocol, **requests[i]) for i in mine}
        finally:
            client.close()

    jobs = [lambda c=c: client_job(list(range(3 * c, 3 * c + 3)), httpclient if c % 2 else grpcclient)
            for c in range(6)]
    results = run_clients(jobs)
    got: dict[int, np.ndarray] = {}
    for result in results:
        assert not isinstance(result, Exception), result
        got.update(result)
    assert sorted(got) == list(range(len(requests)))  # nothing lost
    for i, image in got.items():
        np.testing.assert_array_equal(image, expected[i], err_msg=f"request {i} got another request's image")
    assert len({image.tobytes() for image in got.values()}) == len(requests)
    # Triton counts an execution when the backend reports its statistics, which can come just after the
    # responses: poll (bounded) until the counters settle.
    deadline = time.monotonic() + 15
    while True:
        inferences = serve2.metric("nv_inference_count") - count_before
        executions = serve2.metric("nv_inference_exec_count") - exec_before
        if inferences >= len(requests) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert inferences == len(requests)
    assert executions < inferences, "the dynamic batcher grouped no requests"
    assert serve2.metric("nv_inference_request_duration_us") > 0


def test_serve_sigterm_answers_requests_in_flight(batch2_bundle, pipe2, tmp_path):
    """On `--backend pytriton` (the default backend passes the signal on to tritonserver, whose drain this
    same Triton does; its clean stop is checked by the serve1 fixture)."""
    server = Server(serve_argv(batch2_bundle, "--backend", "pytriton", "--max-queue-delay-us", "100000"),
                    tmp_path / "log.txt")
    count = 32
    try:
        server.wait_ready()
        sending = threading.Semaphore(0)
        finished: dict[int, float] = {}

        def job(i: int) -> np.ndarray:
            client = server.http_client()
            try:
                sending.release()
                image = infer(client, httpclient, prompt=f"in flight {i}", seed=i, steps=4)
                finished[i] = time.monotonic()
                return image
            finally:
                client.close()

        count_before = server.metric("nv_inference_count")
        results: list[Any] = []
        runner = threading.Thread(target=lambda: results.extend(run_clients([lambda i=i: job(i) for i in range(count)])))
        runner.start()
        for _ in range(count):
            assert sending.acquire(timeout=START_TIMEOUT_S)

        def all_arrived() -> bool:
            # Done + queued, plus at most one batch of 2 executing, covers every request sent: all are in flight.
            done = server.metric("nv_inference_count") - count_before
            queued = server.metric("nv_inference_pending_request_count")
            return done + queued + 2 >= count

        wait_for_metric(server, all_arrived, f"all {count} requests received", timeout=START_TIMEOUT_S)
        assert server.metric("nv_inference_count") - count_before < count, "every request finished before SIGTERM"
        signalled = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        runner.join(180)
        assert not runner.is_alive()
        for i, result in enumerate(results):
            assert isinstance(result, np.ndarray), f"request {i}: {result}"
            np.testing.assert_array_equal(result, alone(pipe2, f"in flight {i}", i, steps=4))
        assert any(t > signalled for t in finished.values()), "every request finished before SIGTERM: none was in flight"
        assert server.proc.wait(STOP_TIMEOUT_S) == 0  # the one signal stops it (a second would exit at once)
        server.stop()
        assert "stopped" in server.log()
    finally:
        if server.proc.poll() is None:
            server.stop()


def _corrupt(bundle: Path, dest: Path) -> Path:
    copy = copy_bundle(bundle, dest)
    target = copy / "onnx" / "unet.onnx"
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    return copy


@pytest.mark.parametrize("backend", ["python", "pytriton"])
def test_serve_corrupted_bundle_never_ready(sd_bundle, tmp_path, backend):
    """`--backend pytriton` checks the bundle before any port opens; the default backend's model checks it in
    Triton's model load, and `serve` exits non-zero when tritonserver does."""
    bundle = _corrupt(sd_bundle[0], tmp_path / "corrupt")
    server = Server(serve_argv(bundle, "--backend", backend), tmp_path / "log.txt")
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.proc.poll() is None and time.monotonic() < deadline:
        assert not server.ready()
        time.sleep(0.5)
    assert server.proc.returncode not in (None, 0)
    log = server.log()
    assert "unet.onnx" in log and "sha256" in log, log[-2000:]
    if backend == "python":
        assert "tritonserver exited with status" in log and "before the model was ready" in log, log[-2000:]
    server.stop()


# ----------------------------------------------------------------- exported repository, stock tritonserver

def stock_server(repository: Path, log: Path) -> Server:
    argv, env = server_command(repository, http_port=0, grpc_port=0, metrics_port=0, address="127.0.0.1",
                               backend_dir=log.parent / "backends")
    argv = [re.sub(r"^--(http|grpc|metrics)-port=0$", r"--\1-port={\1}", a) for a in argv]
    return Server(argv, log, env=env)


@pytest.fixture(scope="module")
def stock(batch2_bundle, tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    export_repository(ExportOptions(engines=batch2_bundle, out=root / "repo", gpus=[], executor="onnxruntime",
                                    max_queue_delay_us=200000))
    server = stock_server(root / "repo", root / "log.txt")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def test_exported_repository_layout(batch2_bundle, tmp_path):
    model = export_repository(ExportOptions(engines=batch2_bundle, out=tmp_path / "repo", gpus=[],
                                            executor="onnxruntime", include_bundle=True))
    config = (model / "config.pbtxt").read_text()
    assert 'backend: "python"' in config and "max_batch_size: 2" in config and "dynamic_batching" in config
    assert 'string_value: "bundle"' in config and (model / "1" / "bundle" / "manifest.json").is_file()
    assert "class TritonPythonModel" in (model / "1" / "model.py").read_text()
    with pytest.raises(Exception, match="--force"):
        export_repository(ExportOptions(engines=batch2_bundle, out=tmp_path / "repo", gpus=[]))
    assert [p.name for p in (tmp_path / "repo").iterdir()] == ["turbo"]  # no temporaries left


def test_stock_tritonserver_serves_export(stock, pipe2):
    requests: list[dict[str, Any]] = [
        {"prompt": "a red cat", "seed": 0},
        {"prompt": "a lighthouse", "seed": 99, "steps": 2},
        {"prompt": "a blue house", "seed": 7, "steps": 2, "image": init_image(5), "strength": 0.5},
    ]
    for protocol in (httpclient, grpcclient):
        client = stock.http_client() if protocol is httpclient else stock.grpc_client()
        try:
            for request in requests:
                np.testing.assert_array_equal(infer(client, protocol, **request), alone(pipe2, **request))
        finally:
            client.close()
    # On a batch-2 bundle, txt2img noise row 0 is the batch-1 draw: equal to a direct call too.
    client = stock.http_client()
    try:
        np.testing.assert_array_equal(infer(client, httpclient, prompt="a red cat", seed=0),
                                      pipe2("a red cat", seed=0, output_type="np")[0])
    finally:
        client.close()


@pytest.mark.parametrize("server_name", ["serve2", "pytriton2", "stock"],
                         ids=["default-backend", "pytriton-backend", "stock-tritonserver"])
def test_bad_request_fails_alone_in_its_batch(server_name, pipe2, batch2_bundle, request):
    check_bad_requests_fail_alone(request.getfixturevalue(server_name), pipe2, batch2_bundle)


def wait_for_metric(server: Server, condition: Callable[[], bool], what: str, timeout: float = 30) -> None:
    """Poll the metrics endpoint (bounded) until `condition` holds: counters land there just after a response."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never showed {what} within {timeout} s")
        time.sleep(0.05)


def check_bad_requests_fail_alone(server: Server, pipe2: TurboPipeline, bundle: Path, attempts: int = 6) -> None:
    """One good request (tritonclient) and one bad one (plain JSON) sent at once, with a long batcher delay:
    once Triton ran them in ONE execution (exec-count delta 1), the good one must have its image and the bad
    one its own clean error. Retried (bounded) while the two arrive too far apart to share an execution on a
    loaded machine. Both send the same inputs: Triton batches only requests that carry the same optional
    inputs."""
    bad = [(request_arrays("", seed=1, steps=1), "prompt: must not be empty"),
           (request_arrays("a cat", seed=1, steps=7), "steps: num_inference_steps must be an integer in 1..4")]

    def call(inputs: dict[str, Any]) -> np.ndarray:
        client = server.http_client()
        try:
            return infer(client, httpclient, **inputs)
        finally:
            client.close()

    executions = []
    for attempt in range(attempts):
        good = {"prompt": f"good {attempt}", "seed": attempt, "steps": 1}
        arrays, rule = bad[attempt % len(bad)]
        count_before = server.metric("nv_inference_count")
        exec_before = server.metric("nv_inference_exec_count")
        image, error = run_clients([lambda g=good: call(g), lambda a=arrays: send_for_error(server, "json", a)])
        assert isinstance(image, np.ndarray), f"the good request failed beside a bad one: {image}"
        np.testing.assert_array_equal(image, alone(pipe2, **good))
        assert isinstance(error, tuple), error
        status, message = error
        assert status in CLIENT_ERROR and message.startswith(rule), (status, message[:600])
        assert_clean(message, server_paths(bundle))
        wait_for_metric(server, lambda c=count_before: server.metric("nv_inference_count") - c >= 2,
                        "both requests")
        executions.append(server.metric("nv_inference_exec_count") - exec_before)
        if executions[-1] == 1:  # both ran in one execution: the bad one failed alone
            assert server.ready()
            return
    raise AssertionError(f"the good and the bad request never shared an execution in {attempts} tries "
                         f"(executions per try: {executions})")


def test_internal_failure_answers_an_id_that_the_log_repeats(refit_bundle, tmp_path):
    """A real fault under running servers of both backends: the bundle's UNet weights live in external data
    that ONNX Runtime memory-maps, so overwriting that file after the servers are ready makes the UNet
    produce NaN and the runner raise NonFiniteOutputError. Each client reads only the short message with an
    id; the server log has the id beside the traceback; the server keeps answering."""
    bundle = copy_bundle(refit_bundle, tmp_path / "bundle")
    servers = {backend: Server(serve_argv(bundle, "--backend", backend), tmp_path / f"{backend}.log")
               for backend in ("python", "pytriton")}
    try:
        for server in servers.values():
            server.wait_ready()
        client = servers["python"].http_client()
        try:
            infer(client, httpclient, prompt="fine before the fault", seed=1)
        finally:
            client.close()
        weights = bundle / "onnx" / "unet.onnx.data"
        with open(weights, "r+b") as handle:  # in place: the mapped pages change under the sessions
            handle.write(b"\xff" * weights.stat().st_size)
        for backend, server in servers.items():
            ids = []
            for protocol in ("json", "grpc", "json"):
                status, message = send_for_error(server, protocol, request_arrays("a cat", seed=2))
                match = INTERNAL_PATTERN.match(message)
                assert match and message == INTERNAL_MESSAGE.format(id=match.group(1)), (backend, message[:600])
                assert status in SERVER_ERROR, (backend, status)
                ids.append(match.group(1))
            assert len(set(ids)) == len(ids), f"{backend}: ids repeat: {ids}"
            assert server.ready()
            for error_id in ids:
                deadline = time.monotonic() + 20  # the server's log reaches the file a moment after the reply
                while (at := (log := server.log()).find(f"internal error (id {error_id})")) < 0:
                    assert time.monotonic() < deadline, f"{backend}: id {error_id} not in the log:\n{log[-3000:]}"
                    time.sleep(0.2)
                entry = log[at:at + 6000]
                assert "Traceback" in entry and "NonFiniteOutputError" in entry, (backend, entry[:3000])
    finally:
        for server in servers.values():
            server.stop()


def test_stock_corrupted_bundle_never_ready(sd_bundle, tmp_path):
    bundle = _corrupt(sd_bundle[0], tmp_path / "corrupt")
    export_repository(ExportOptions(engines=bundle, out=tmp_path / "repo", gpus=[], executor="onnxruntime"))
    server = stock_server(tmp_path / "repo", tmp_path / "log.txt")
    deadline = time.monotonic() + START_TIMEOUT_S
    while server.proc.poll() is None and time.monotonic() < deadline:
        assert not server.ready()
        time.sleep(0.5)
    assert server.proc.returncode not in (None, 0), "tritonserver kept running without its model"
    log = server.log()
    assert "unet.onnx" in log and "sha256" in log, log[-3000:]
    server.stop()


def test_cli_help_lists_serving_commands():
    out = subprocess.run([sys.executable, "-m", "turbo_trt.cli", "--help"], capture_output=True, text=True, timeout=60,
                         env={**os.environ}).stdout
    assert "serve" in out and "export-triton" in out
