"""`turbo-trt live`: the real CLI in a subprocess (uvicorn on a free loopback port, ONNX Runtime on the tiny
bundle), driven by a real WebSocket client (the `websockets` package) and by Debian's Chromium through
Playwright (the system executable: no browser is downloaded).

Tolerances: a PNG result is lossless and must equal the direct pipeline call bit for bit. A JPEG result
(quality 90, 4:4:4) differs from it only by the result's encoding (the server decodes the client's JPEG
frame exactly as PIL does here, so the input is the same): PSNR >= 30 dB and a mean absolute error <= 6
levels. The tiny random-weight model's output is close to noise, JPEG's worst case (measured: 31.9 dB,
5.1 levels); at 4:2:0 it would be 25.9 dB, 9.7 levels.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from turbo_trt.benchmarks.serve_bench import free_ports
from turbo_trt.runner import TurboPipeline

from .conftest import direct_image as direct
from .conftest import smooth_frame

START_TIMEOUT_S = 120
WAIT = 60.0  # any single reply on two busy shared cores
MAX_CLIENTS = 3
MAX_MESSAGE = 65536


class LiveServer:
    def __init__(self, bundle: Path, log: Path) -> None:
        self.port = free_ports(1)[0]
        self.url = f"http://127.0.0.1:{self.port}/"
        self.log_path = log
        self._log = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "turbo_trt.cli", "live", "--engines", str(bundle), "--port", str(self.port),
             "--executor", "onnxruntime", "--max-clients", str(MAX_CLIENTS), "--max-message", str(MAX_MESSAGE)],
            stdout=self._log, stderr=subprocess.STDOUT)

    def log(self) -> str:
        return self.log_path.read_text()

    def get(self, path: str) -> tuple[int, dict[str, str], bytes]:
        with urllib.request.urlopen(self.url.rstrip("/") + path, timeout=10) as response:
            return response.status, dict(response.headers), response.read()

    def health(self) -> dict:
        return json.loads(self.get("/health")[2])

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"turbo-trt live exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if self.health()["status"] == "ready":
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"turbo-trt live did not get ready in {START_TIMEOUT_S} s:\n{self.log()}")

    def wait_clients(self, count: int) -> None:
        deadline = time.monotonic() + 10
        while self.health()["clients"] != count:
            assert time.monotonic() < deadline, f"clients stayed at {self.health()['clients']}, expected {count}"
            time.sleep(0.05)

    def ws(self):
        return connect(f"ws://127.0.0.1:{self.port}/ws", open_timeout=10, close_timeout=5, max_size=2**24)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        try:
            code = self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait(timeout=10)
        self._log.close()
        return code


@pytest.fixture(scope="module")
def live(sd_bundle, tmp_path_factory):
    server = LiveServer(sd_bundle[0], tmp_path_factory.mktemp("live") / "live.log")
    try:
        server.wait_ready()
        yield server
    finally:
        code = server.stop()
    assert code == 0, server.log()
    assert "Traceback" not in server.log(), server.log()


@pytest.fixture(scope="module")
def pipe(sd_bundle):
    pipe = TurboPipeline.from_bundle(sd_bundle[0], executor="onnxruntime")
    yield pipe
    pipe.close()


def picture(seed: int, fmt: str = "PNG", size: tuple[int, int] = (64, 64)) -> bytes:
    out = io.BytesIO()
    smooth_frame(seed, size).save(out, format=fmt)
    return out.getvalue()


def decoded(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def receive_result(ws) -> tuple[dict, np.ndarray]:
    meta = json.loads(ws.recv(timeout=WAIT))
    assert "error" not in meta, meta
    assert set(meta) == {"seq", "latency_ms", "skipped", "dropped", "fps"}
    data = ws.recv(timeout=WAIT)
    assert isinstance(data, bytes)
    return meta, decoded(data)


def receive_error(ws) -> dict:
    reply = json.loads(ws.recv(timeout=WAIT))
    assert set(reply) >= {"error", "field", "input"}, reply
    return reply


def test_page_health_and_config(live):
    status, headers, body = live.get("/")
    page = body.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    for element in ('id="prompt"', 'id="seed"', 'id="steps"', 'id="strength"', 'id="camera"', 'id="upload"',
                    'id="output"', 'id="stats"'):
        assert element in page
    assert "http://" not in page and "https://" not in page  # nothing from elsewhere (no CDN)
    assert "default-src 'self'" in headers["content-security-policy"]
    assert live.get("/static/live.js")[0] == 200 and live.get("/static/live.css")[0] == 200
    health = live.health()
    assert health["status"] == "ready" and health["max_clients"] == MAX_CLIENTS and health["executor"] == "onnxruntime"
    config = json.loads(live.get("/config")[2])
    assert (config["width"], config["height"], config["max_steps"], config["img2img"]) == (64, 64, 4, True)
    assert config["controlnets"] == 0 and config["controls"] == ["none", "canny"]
    assert f"serving {live.url}" in live.log()


def test_results_equal_direct_calls(live, pipe):
    frame_png, frame_jpeg = picture(1), picture(2, "JPEG")
    with live.ws() as ws:
        ws.send(json.dumps({"format": "png", "prompt": "a red cat", "seed": 3, "steps": 2, "generate": True}))
        meta, image = receive_result(ws)
        assert meta["seq"] == 0 and not meta["skipped"] and meta["dropped"] == 0 and meta["latency_ms"] > 0
        np.testing.assert_array_equal(image, direct(pipe, "a red cat", 3, 2))
        ws.send(json.dumps({"strength": 0.5}))  # no prompt: settings only
        ws.send(frame_png)
        meta, image = receive_result(ws)
        assert meta["seq"] == 1
        np.testing.assert_array_equal(image, direct(pipe, "a red cat", 3, 2, decoded(frame_png)))
        ws.send(json.dumps({"prompt": "a dog", "seed": 4}))  # settings alone start nothing ...
        ws.send(json.dumps({"generate": True}))  # ... text-to-image is asked for
        meta, image = receive_result(ws)
        assert meta["seq"] == 2
        np.testing.assert_array_equal(image, direct(pipe, "a dog", 4, 2))
        ws.send(json.dumps({"format": "jpeg", "steps": 4, "strength": 0.75}))
        ws.send(frame_jpeg)
        meta, image = receive_result(ws)
        assert meta["seq"] == 3 and meta["fps"] >= 0
        want = direct(pipe, "a dog", 4, 4, decoded(frame_jpeg), 0.75)
        error = image.astype(np.float64) - want
        psnr = 10 * np.log10(255.0**2 / max(float(np.mean(error**2)), 1e-12))
        assert psnr >= 30.0 and np.abs(error).mean() <= 6.0, (psnr, np.abs(error).mean())
        ws.send(json.dumps({"similarity": 0.98}))
        ws.send(frame_jpeg)
        meta, again = receive_result(ws)
        assert meta["seq"] == 4  # similarity turned on after frame 3 ran: no thumbnail to compare with, runs
        ws.send(frame_jpeg)
        meta, skipped = receive_result(ws)
        assert meta["seq"] == 5 and meta["skipped"]
        np.testing.assert_array_equal(skipped, again)


def test_every_bad_message_gets_an_error_and_the_connection_stays(live, pipe):
    gif = io.BytesIO()
    Image.new("RGB", (64, 64)).save(gif, format="GIF")
    bad: list[tuple[str | bytes, str, bool]] = [  # (message, field, whether it was an input)
        ("not json", "message", False),
        ("[1, 2]", "message", False),
        (json.dumps({"colour": "red"}), "colour", False),
        (json.dumps({"prompt": 5}), "prompt", False),
        (json.dumps({"prompt": "a" * 2001, "generate": True}), "prompt", True),  # over 2,000 characters
        (json.dumps({"generate": "yes"}), "generate", False),
        (json.dumps({"seed": -1, "generate": True}), "seed", True),
        (json.dumps({"seed": 1.5}), "seed", False),
        (json.dumps({"steps": 9}), "steps", False),
        (json.dumps({"strength": 2}), "strength", False),
        (json.dumps({"similarity": 1.5}), "similarity", False),
        (json.dumps({"format": "gif"}), "format", False),
        (json.dumps({"control": "sobel"}), "control", False),
        (json.dumps({"control": "canny"}), "control", False),  # this bundle has no ControlNet
        (json.dumps({"control_scale": 0.5}), "control_scale", False),  # likewise
        (json.dumps({"prompt": None}), "prompt", False),
        (json.dumps({"prompt": "x" * MAX_MESSAGE}), "message", False),
        (b"\x89PNG not really", "frame", True),
        (gif.getvalue(), "frame", True),
        (picture(5, size=(64, 32)), "frame", True),  # another aspect ratio
        (b"\0" * (MAX_MESSAGE + 1), "message", True),
    ]
    with live.ws() as ws:
        for message, name, is_input in bad:
            ws.send(message)
            reply = receive_error(ws)
            assert (reply["field"], reply["input"]) == (name, is_input), (message[:40], reply)
        ws.send(json.dumps({"steps": 1}))  # fine alone: 1 step of text-to-image ...
        ws.send(picture(6))  # ... but 1 step at strength 0.5 runs no image-to-image step
        reply = receive_error(ws)
        assert reply["field"] == "strength" and "0 steps" in reply["error"] and reply["input"]
        ws.send(json.dumps({"format": "png", "prompt": "still here", "seed": 1, "generate": True}))
        meta, image = receive_result(ws)
        assert meta["seq"] == 0  # none of the bad messages queued anything
        np.testing.assert_array_equal(image, direct(pipe, "still here", 1, 1))
        ws.send(b"\0" * (MAX_MESSAGE + 8192))  # over the transport's limit (4 KiB of slack): closed, not read
        with pytest.raises(ConnectionClosed) as info:
            ws.recv(timeout=WAIT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1009


def test_foreign_origin_is_refused(live):
    """A browser page from another site must not drive the local server (the Origin header is checked)."""
    with pytest.raises(InvalidStatus) as info:
        connect(f"ws://127.0.0.1:{live.port}/ws", origin="http://evil.example", open_timeout=10)
    assert info.value.response.status_code == 403
    with connect(f"ws://127.0.0.1:{live.port}/ws", origin=f"http://127.0.0.1:{live.port}", open_timeout=10) as ws:
        ws.send(json.dumps({"steps": 1}))  # accepted: settings only, nothing comes back
    live.wait_clients(0)


def test_client_limit(live):
    live.wait_clients(0)
    with contextlib.ExitStack() as stack:
        clients = [stack.enter_context(live.ws()) for _ in range(MAX_CLIENTS)]
        live.wait_clients(MAX_CLIENTS)
        with live.ws() as extra:
            with pytest.raises(ConnectionClosed) as info:
                extra.recv(timeout=WAIT)
        assert info.value.rcvd is not None and info.value.rcvd.code == 1013
        assert f"the limit is {MAX_CLIENTS} (--max-clients)" in info.value.rcvd.reason
        clients[0].close()
        live.wait_clients(MAX_CLIENTS - 1)
        with live.ws() as again:
            again.send(json.dumps({"prompt": "a seat is free", "generate": True}))
            receive_result(again)
    live.wait_clients(0)


def test_disconnect_mid_frame_costs_the_others_nothing(live, pipe):
    """A client sends two slow frames and leaves at once: the first runs (the engine was idle), the second
    waits and is dropped with the client, never run; another client's results keep coming, equal to direct
    calls. The engine-run count is exact: one more run means the leaving client's waiting frame ran."""
    live.wait_clients(0)
    frames = [picture(20 + i) for i in range(3)]
    with live.ws() as other:
        other.send(json.dumps({"format": "png", "prompt": "the other client", "seed": 9, "steps": 2,
                               "generate": True}))
        receive_result(other)
        runs_before = live.health()["runs"]
        with live.ws() as leaving:
            leaving.send(json.dumps({"steps": 4, "strength": 1.0}))
            leaving.send(frames[0])  # runs at once: the engine is idle
            deadline = time.monotonic() + 60  # bounded: wait until the worker has launched it
            while live.health()["runs"] == runs_before and time.monotonic() < deadline:
                time.sleep(0.005)
            assert live.health()["runs"] == runs_before + 1, "the leaving client's first frame never started"
            leaving.send(frames[1])  # waits behind it, and goes with the client
        live.wait_clients(1)
        for i in range(3):
            other.send(frames[i])
            meta, image = receive_result(other)
            np.testing.assert_array_equal(image, direct(pipe, "the other client", 9, 2, decoded(frames[i])))
    live.wait_clients(0)
    time.sleep(0.3)
    runs = live.health()["runs"] - runs_before
    assert runs == 1 + 3, f"{runs} engine runs: expected the leaving client's first frame and the other's three"


def test_live_server_imports_no_torch(tmp_path):
    from .conftest import write_import_blocker

    env = write_import_blocker(tmp_path, ("torch", "diffusers", "transformers"))
    code = ("import sys, turbo_trt.runner.live.server, turbo_trt.runner.live.app, turbo_trt.runner.stream, "
            "turbo_trt.commands.live, starlette.applications, uvicorn\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('torch', 'diffusers', 'transformers')]\n"
            "assert not bad, bad\nprint('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_controlnet_bundle_steers_frames_by_their_edges(sd_control_bundle, tmp_path):
    """On a ControlNet bundle a client turns on `"control": "canny"` with a scale: each frame is steered by its
    own edge map, equal bit for bit to the direct call with that edge map for both nets; a scale change makes
    the similarity filter run the frame again; "none" is the plain picture again; a bad scale is refused."""
    from turbo_trt.runner.preprocess import CannyEdges

    server = LiveServer(sd_control_bundle[0], tmp_path / "live.log")
    prompt = "a yellow triangle on a black background"
    try:
        server.wait_ready()
        assert json.loads(server.get("/config")[2])["controlnets"] == 2
        ours = TurboPipeline.from_bundle(sd_control_bundle[0], executor="onnxruntime")
        frame = picture(7)
        edges = CannyEdges()(decoded(frame))
        with contextlib.closing(ours), server.ws() as ws:
            ws.send(json.dumps({"format": "png", "prompt": prompt, "seed": 11, "steps": 2, "strength": 0.5,
                                "control": "canny", "control_scale": 0.8, "similarity": 0.98}))
            ws.send(frame)
            _, steered = receive_result(ws)
            want = ours(prompt, image=decoded(frame), strength=0.5, num_inference_steps=2, seed=11,
                        control_image=[edges, edges], controlnet_conditioning_scale=0.8, output_type="np")[0]
            np.testing.assert_array_equal(steered, want)
            ws.send(json.dumps({"control_scale": 0.3}))
            ws.send(frame)  # the same frame: only the scale changed, so the filter must not reuse the last output
            meta, weaker = receive_result(ws)
            assert not meta["skipped"]
            np.testing.assert_array_equal(weaker, ours(
                prompt, image=decoded(frame), strength=0.5, num_inference_steps=2, seed=11,
                control_image=[edges, edges], controlnet_conditioning_scale=0.3, output_type="np")[0])
            ws.send(json.dumps({"control": "none"}))
            ws.send(frame)
            meta, plain = receive_result(ws)
            assert not meta["skipped"]
            np.testing.assert_array_equal(plain, direct(ours, prompt, 11, 2, decoded(frame)))
            assert not np.array_equal(plain, steered)  # the nets did steer
            ws.send(json.dumps({"control_scale": [1.0]}))  # one scale for two nets
            reply = receive_error(ws)
            assert reply["field"] == "control_scale" and "2 ControlNet" in reply["error"], reply
    finally:
        code = server.stop()
    assert code == 0 and "Traceback" not in server.log(), server.log()


# -- the page in a real browser ------------------------------------------------------------------------------
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run",
                 "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream"]


def wait_until(page, expression: str) -> None:
    """Poll a JavaScript expression until it is true (WAIT seconds at most). Playwright's wait_for_function
    polls through an eval inside the page, which the page's Content-Security-Policy (no 'unsafe-eval')
    refuses whenever the first check is false; page.evaluate runs from outside the page and is allowed."""
    deadline = time.monotonic() + WAIT
    while not page.evaluate(expression):
        assert time.monotonic() < deadline, f"not true after {WAIT} s: {expression}"
        time.sleep(0.05)


def test_page_in_chromium(live, tmp_path):
    """Type a prompt and see #output change; start the (fake) camera and see frames flow with fps in #stats;
    no console errors; a screenshot for the test log."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium (see .ci/run)")
    live.wait_clients(0)
    problems: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
                                    env={**os.environ, "HOME": str(tmp_path)})
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.goto(live.url)
            wait_until(page, "document.body.dataset.state === 'ready'")
            assert page.locator("#control-box").is_hidden()  # this bundle has no ControlNet
            page.locator("#prompt").press_sequentially("a red circle", delay=30)
            wait_until(page, "document.querySelector('#output').src.startsWith('blob:')")
            first = page.locator("#output").get_attribute("src")
            page.locator("#prompt").press_sequentially(" on a blue background", delay=30)
            wait_until(page, f"document.querySelector('#output').src !== {first!r}")
            page.locator("#camera").click()
            wait_until(page, "Number(document.querySelector('#stats').dataset.results) >= 12 && "
                             "Number(document.querySelector('#stats').dataset.fps) > 0")
            stats = page.locator("#stats").inner_text()
            assert "fps" in stats and float(stats.split(" fps")[0]) > 0, stats
            wait_until(page, "document.querySelector('#output').complete && "
                             "document.querySelector('#output').naturalWidth > 0")
            assert page.evaluate("document.querySelector('#output').naturalWidth") == 64  # the bundle's size
            shot = tmp_path / "live-page.png"
            page.screenshot(path=str(shot))
            print(f"screenshot: {shot}")
            page.set_viewport_size({"width": 390, "height": 844})  # a phone
            assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
            page.screenshot(path=str(tmp_path / "live-page-phone.png"))
            print(f"screenshot: {tmp_path / 'live-page-phone.png'}")
        finally:
            browser.close()
    assert problems == []
