"""Stream benchmark: live video and a typed prompt through `pipe.stream()` and through `turbo-trt live`'s WebSocket.

    python -m turbo_trt.benchmarks.stream_bench --engines engines/sd-turbo \\
        --json benchmarks/results/stream-sd-turbo.json --report benchmarks/results/stream-sd-turbo.md

One run measures, on one bundle and executor:
- engine: the direct pipeline call per image (img2img 2 steps at strength 0.5 = one UNet run; txt2img 1 step).
- codec: JPEG decode of a frame, JPEG (quality 90, 4:4:4) and PNG encode of a result, at the bundle's size.
- video (a synthetic moving picture, sent as JPEG like a camera page does), img2img 2 steps, strength 0.5:
  one-at-a-time (decode, call, encode, in turn) against the stream pipelined (a producer thread decodes
  and pushes whenever no input waits, a consumer thread gets and encodes); a camera that pushes faster
  than the engines run (newest wins: drops); the similarity filter on a video that holds still half the time.
- typed prompt, txt2img 1 step: a sentence typed one character at a time at a typing pace, and in a burst.
- WebSocket: the same video through an in-process `turbo-trt live` app (uvicorn on loopback) with a local
  client keeping one frame in flight; the overhead per frame is the round trip minus the server's push to
  result latency (so it holds frame decode, result encode and both transfers).
fps is results per second of wall time; latency is push to result (the consumer's encode added where it
encodes); p50/p99 by linear interpolation.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from .environment import environment, write_results
from .stats import summarize

SENTENCE = "a red fox in the snow, oil painting"
PROMPT = "a cat, oil painting"


def percentiles(seconds: list[float]) -> dict[str, float | None]:
    """benchmarks/stats.py's summary (ms), or Nones when there is no sample."""
    if not seconds:
        return {"p50_ms": None, "p99_ms": None, "mean_ms": None, "n": 0}
    return dict(summarize(seconds))


def video(count: int, height: int, width: int, still_from: int | None = None) -> list[np.ndarray]:
    """A gradient background with a disc moving across it (frames after `still_from` repeat that frame)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    frames = []
    for i in range(count):
        t = min(i, still_from) if still_from is not None else i
        cx = width * (0.2 + 0.6 * ((t * 0.07) % 1.0))
        cy = height * (0.5 + 0.25 * np.sin(t * 0.3))
        disc = ((xx - cx) ** 2 + (yy - cy) ** 2) < (0.15 * min(height, width)) ** 2
        frame = np.stack([xx / width * 255, yy / height * 255, np.full_like(xx, 96 + 40 * np.sin(t * 0.2))], -1)
        frame[disc] = (240, 200, 40)
        frames.append(frame.astype(np.uint8))
    return frames


def jpeg(image: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(image).save(out, format="JPEG", quality=90)
    return out.getvalue()


def decode(data: bytes) -> Any:
    from PIL import Image

    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def timed(fn: Any, repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def one_at_a_time(pipe: Any, frames: list[bytes], encode: Any) -> dict[str, Any]:
    latencies = []
    start = time.perf_counter()
    for data in frames:
        t0 = time.perf_counter()
        image = pipe(PROMPT, image=decode(data), strength=0.5, num_inference_steps=2, seed=0, output_type="np")[0]
        encode(image, "jpeg")
        latencies.append(time.perf_counter() - t0)
    wall = time.perf_counter() - start
    return {"frames": len(frames), "results": len(frames), "fps": len(frames) / wall, "latency": percentiles(latencies),
            "dropped": 0, "skipped": 0}


def warm(stream: Any, data: bytes) -> dict[str, Any]:
    """One frame through a new stream's fork before timing (its first image loads kernels, captures graphs,
    fills the prompt cache); returns the counts to subtract."""
    stream.push(decode(data))
    if stream.get(timeout=600) is None:
        raise RuntimeError("the warm-up frame gave no result")
    return stream.stats()


def streamed(pipe: Any, frames: list[bytes], encode: Any, pace_s: float | None = None,
             similarity: float | None = None) -> dict[str, Any]:
    """Producer: decode and push each frame, either whenever no input waits (pace_s None) or every pace_s
    seconds (a camera). Consumer: get, encode. Latency: push to encoded. The fork is warmed first."""
    latencies: list[float] = []
    results = 0
    done = threading.Event()
    pushed_at: dict[int, float] = {}
    with pipe.stream(PROMPT, steps=2, strength=0.5, seed=0, similarity=similarity) as stream:
        before = warm(stream, frames[-1])
        first = stream.stats()["pushed"]

        def consume() -> None:
            nonlocal results
            while True:
                result = stream.get(timeout=0.05)
                if result is None:
                    if not (done.is_set() and stream.idle):
                        continue
                    result = stream.get(timeout=0)  # delivered just before it turned idle
                    if result is None:
                        return
                encode(result.image, "jpeg")
                latencies.append(time.perf_counter() - pushed_at[result.seq - first])
                results += 1

        consumer = threading.Thread(target=consume)
        start = time.perf_counter()
        consumer.start()
        for i, data in enumerate(frames):
            if pace_s is not None:
                time.sleep(max(0.0, start + i * pace_s - time.perf_counter()))
            t0 = time.perf_counter()
            image = decode(data)
            decode_s = time.perf_counter() - t0
            if pace_s is None:
                while stream.waiting:  # a cheap look (stats() sorts latencies)
                    time.sleep(0.0005)
            pushed_at[i] = time.perf_counter() - decode_s  # a frame's latency includes its decode
            assert stream.push(image) == first + i
        done.set()
        consumer.join(timeout=600)
        wall = time.perf_counter() - start
        stats = {key: stream.stats()[key] - before[key] for key in ("dropped", "skipped", "processed")}
    return {"frames": len(frames), "results": results, "fps": results / wall, "latency": percentiles(latencies),
            "dropped": stats["dropped"], "skipped": stats["skipped"], "processed": stats["processed"]}


def typed(pipe: Any, interval_s: float) -> dict[str, Any]:
    """A sentence typed one character at a time (txt2img 1 step); interval 0: every prefix at once."""
    latencies: list[float] = []
    last = None
    with pipe.stream("", steps=1, seed=0) as stream:
        stream.push(prompt="warm up")  # the fork's first image (kernels, graphs) before timing
        if stream.get(timeout=600) is None:
            raise RuntimeError("the warm-up prompt gave no result")
        before = stream.stats()
        start = time.perf_counter()
        for n in range(1, len(SENTENCE) + 1):
            time.sleep(max(0.0, start + n * interval_s - time.perf_counter()))
            stream.push(prompt=SENTENCE[:n])
            while (result := stream.get(timeout=0)) is not None:
                latencies.append(result.latency_s)
                last = result
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            idle = stream.idle
            result = stream.get(timeout=0.05)
            if result is not None:
                latencies.append(result.latency_s)
                last = result
            elif idle:
                break
        wall = time.perf_counter() - start
        stats = stream.stats()
        final_equal = last is not None and bool(np.array_equal(
            last.image, pipe(SENTENCE, num_inference_steps=1, seed=0, output_type="np")[0]))
    return {"characters": len(SENTENCE), "interval_ms": interval_s * 1e3,
            "processed": stats["processed"] - before["processed"], "dropped": stats["dropped"] - before["dropped"],
            "results_returned": len(latencies), "seconds": wall,
            "latency": percentiles(latencies), "final_image_equals_direct_call": final_equal}


def websocket(pipe: Any, frames: list[bytes]) -> dict[str, Any]:
    """The live app in this process (uvicorn on a loopback port), a websockets client with one frame in flight."""
    import uvicorn
    from websockets.sync.client import connect

    from turbo_trt.runner.live.app import LiveApp, LiveLimits
    from turbo_trt.runner.live.server import WS_MAX_QUEUE, bind, ws_max_size
    from turbo_trt.runner.stream import StreamPool

    pool = StreamPool([pipe.fork()])
    app = LiveApp(pool, LiveLimits(), pipe.executor.name)
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app.asgi(), log_level="warning", lifespan="off",
                                           ws_max_size=ws_max_size(LiveLimits().max_message), ws_max_queue=WS_MAX_QUEUE))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    round_trips, server_ms, sizes = [], [], []
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("the in-process live server did not start")
            time.sleep(0.01)
        with connect(f"ws://127.0.0.1:{port}/ws", max_size=2**24) as ws:
            ws.send(json.dumps({"prompt": PROMPT, "seed": 0, "steps": 2, "strength": 0.5, "generate": True}))
            ws.recv(timeout=600)
            ws.recv(timeout=600)  # the txt2img it asked for
            ws.send(frames[-1])  # warm the pool's fork with one frame before timing
            ws.recv(timeout=600)
            ws.recv(timeout=600)
            start = time.perf_counter()
            for data in frames:
                t0 = time.perf_counter()
                ws.send(data)
                meta = json.loads(ws.recv(timeout=600))
                image = ws.recv(timeout=600)
                round_trips.append(time.perf_counter() - t0)
                server_ms.append(meta["latency_ms"])
                sizes.append(len(image))
            wall = time.perf_counter() - start
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        pool.close()
    overhead = [rt - ms / 1e3 for rt, ms in zip(round_trips, server_ms)]
    return {"frames": len(frames), "fps": len(frames) / wall, "round_trip": percentiles(round_trips),
            "server_push_to_result": percentiles([ms / 1e3 for ms in server_ms]),
            "overhead_per_frame": percentiles(overhead), "frame_bytes_mean": float(np.mean([len(f) for f in frames])),
            "result_bytes_mean": float(np.mean(sizes))}


def run(engines: Path, executor: str, frames: int, note: str | None, websocket_on: bool = True) -> dict[str, Any]:
    from turbo_trt.runner import TurboPipeline
    from turbo_trt.runner.live.protocol import encode_image

    pipe = TurboPipeline.from_bundle(engines, executor=executor)
    height, width = int(pipe.shapes["height"]), int(pipe.shapes["width"])
    log = lambda m: print(f"stream_bench: {m}", file=sys.stderr, flush=True)  # noqa: E731
    moving = video(frames, height, width)
    encoded = [jpeg(f) for f in moving]
    still = [jpeg(f) for f in video(frames, height, width, still_from=frames // 2)]
    repeat = max(3, min(frames, 10))
    log("warm-up")
    pipe(PROMPT, image=moving[0], strength=0.5, num_inference_steps=2, seed=0, output_type="np")
    pipe(PROMPT, num_inference_steps=1, seed=0, output_type="np")
    log("engine and codec")
    engine = {
        "img2img_2_steps_strength_0.5": percentiles(timed(lambda: pipe(PROMPT, image=moving[1], strength=0.5,
                                                                       num_inference_steps=2, seed=0, output_type="np"),
                                                        repeat)),
        "txt2img_1_step": percentiles(timed(lambda: pipe(PROMPT, num_inference_steps=1, seed=0, output_type="np"), repeat)),
    }
    # The engines' own time per image on the path a stream's worker takes: launch + wait on a warmed fork
    # with the prompt cached (no tokenizing, noise or resizing: those happen at push, off this path).
    from turbo_trt.runner.inputs import check_image, latent_shape, make_noise

    plan, ids = pipe.plan(2, 0.5), pipe.token_ids([PROMPT])
    noise = make_noise(0, latent_shape(pipe.shapes), True, 0)
    pixels = check_image(moving[1], height, width, pipe.batch)
    fork = pipe.fork()
    try:
        launch_wait = lambda: fork.executor.wait(fork.executor.launch(ids, plan, noise, pixels))  # noqa: E731
        launch_wait()  # warm-up: kernels, graphs, the prompt cache
        engine["engine_only_img2img"] = percentiles(timed(launch_wait, repeat))
    finally:
        fork.close()
    result_image = pipe(PROMPT, image=moving[1], strength=0.5, num_inference_steps=2, seed=0, output_type="np")[0]
    codec = {
        "jpeg_decode_frame": percentiles(timed(lambda: decode(encoded[0]), 20)),
        "jpeg_encode_result": percentiles(timed(lambda: encode_image(result_image, "jpeg"), 20)),
        "png_encode_result": percentiles(timed(lambda: encode_image(result_image, "png"), 20)),
    }
    log("video: one at a time")
    serial = one_at_a_time(pipe, encoded, encode_image)
    log("video: pipelined stream")
    pipelined = streamed(pipe, encoded, encode_image)
    camera_fps = 2.0 * pipelined["fps"]
    log(f"video: camera at {camera_fps:.1f} fps")
    camera = streamed(pipe, encoded, encode_image, pace_s=1.0 / camera_fps)
    camera["camera_fps"] = camera_fps
    log("video: similarity filter (0.98, still second half)")
    similar = streamed(pipe, still, encode_image, similarity=0.98)
    log("typed prompt")
    engine_s = (engine["txt2img_1_step"]["p50_ms"] or 0.0) / 1e3
    typing = typed(pipe, interval_s=max(0.1, 0.5 * engine_s))
    burst = typed(pipe, interval_s=0.0)
    ws = None
    if websocket_on:
        log("WebSocket")
        ws = websocket(pipe, encoded)
    pipe.close()
    engine_img2img = engine["engine_only_img2img"]["p50_ms"]
    return {
        "schema": "turbo-trt-stream-bench/1",
        "environment": environment(),
        "note": note,
        "bundle": {"path": str(engines), "model": pipe.bundle.manifest.get("model", {}).get("id"),
                   "height": height, "width": width, "batch": pipe.batch},
        "executor": pipe.executor.name,
        "device": "gpu" if pipe.executor.name != "onnxruntime" else "cpu",
        "settings": {"frames": frames, "video": "img2img, 2 steps, strength 0.5 (one UNet run)",
                     "typed": "txt2img, 1 step", "prompt": PROMPT, "sentence": SENTENCE},
        "engine": engine,
        "codec": codec,
        "video": {"one_at_a_time": serial, "pipelined": pipelined, "camera": camera, "similarity": similar,
                  "pipelined_speedup": pipelined["fps"] / serial["fps"],
                  "pipelined_fps_share_of_engine": pipelined["fps"] * (engine_img2img or float("nan")) / 1e3},
        "typed": {"typing": typing, "burst": burst},
        "websocket": ws,
    }


def _ms(value: float | None) -> str:
    return "–" if value is None else f"{value:.1f}"


def markdown(r: dict[str, Any]) -> str:
    env = r["environment"]
    b = r["bundle"]
    v = r["video"]
    lines = [
        f"# Stream benchmark: {b['model']} {b['width']}x{b['height']}, {r['executor']} ({r['device']})",
        "",
        f"Machine: {env['machine']['cpu']}, {env['machine']['cores']} cores; GPU: {env['gpu'] or 'none'}; "
        f"commit {env['commit']}; versions: " + ", ".join(f"{k} {v}" for k, v in sorted(env["versions"].items())) + ".",
    ]
    if r.get("note"):
        lines += ["", f"Note: {r['note']}"]
    e, c = r["engine"], r["codec"]
    lines += [
        "", "## Engine and codec (p50 / p99 ms)", "",
        "| what | p50 | p99 |", "|---|---|---|",
        f"| direct call, img2img 2 steps strength 0.5 | {_ms(e['img2img_2_steps_strength_0.5']['p50_ms'])} | "
        f"{_ms(e['img2img_2_steps_strength_0.5']['p99_ms'])} |",
        f"| direct call, txt2img 1 step | {_ms(e['txt2img_1_step']['p50_ms'])} | {_ms(e['txt2img_1_step']['p99_ms'])} |",
        f"| engines only, img2img 2 steps strength 0.5 (launch + wait on a warm fork, prompt cached) | "
        f"{_ms(e['engine_only_img2img']['p50_ms'])} | {_ms(e['engine_only_img2img']['p99_ms'])} |",
        f"| JPEG decode of a frame | {_ms(c['jpeg_decode_frame']['p50_ms'])} | {_ms(c['jpeg_decode_frame']['p99_ms'])} |",
        f"| JPEG encode of a result (q90, 4:4:4) | {_ms(c['jpeg_encode_result']['p50_ms'])} | "
        f"{_ms(c['jpeg_encode_result']['p99_ms'])} |",
        f"| PNG encode of a result | {_ms(c['png_encode_result']['p50_ms'])} | {_ms(c['png_encode_result']['p99_ms'])} |",
        "", "## Video, img2img (2 steps, strength 0.5), frames sent as JPEG", "",
        "| mode | frames | ran | results | fps | latency p50 ms | p99 ms | dropped | skipped |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, label in [("one_at_a_time", "one at a time (decode, call, encode)"),
                        ("pipelined", "stream, pipelined (producer/consumer threads)"),
                        ("camera", f"stream, camera at {v['camera'].get('camera_fps', 0):.1f} fps (newest wins)"),
                        ("similarity", "stream, similarity 0.98, still 2nd half")]:
        m = v[name]
        lines.append(f"| {label} | {m['frames']} | {m.get('processed', m['results'])} | {m['results']} | {m['fps']:.2f} | "
                     f"{_ms(m['latency']['p50_ms'])} | "
                     f"{_ms(m['latency']['p99_ms'])} | {m['dropped']} | {m['skipped']} |")
    lines += ["", "ran: frames the engines ran; results: the ones the consumer got (a result that finished while a "
                  "newer one was not fetched yet is passed over); fps: results per second of wall time.",
              "", f"Pipelined / one at a time: {v['pipelined_speedup']:.2f}x. Pipelined fps x engine time per image "
                  f"(p50) = {v['pipelined_fps_share_of_engine']:.2f} (1.0: the engines never wait; the GPU target is "
                  ">= 0.95). Pipelined latency holds one input waiting behind the one running (the producer keeps "
                  "the queue full); the camera row is the latency a live source sees."]
    lines += ["", "## Typed prompt, txt2img 1 step", "",
              "| pace | characters | processed | dropped | latency p50 ms | p99 ms | last image = direct call |",
              "|---|---|---|---|---|---|---|"]
    for name in ("typing", "burst"):
        t = r["typed"][name]
        pace = f"{t['interval_ms']:.0f} ms per character" if t["interval_ms"] else "all at once"
        lines.append(f"| {pace} | {t['characters']} | {t['processed']} | {t['dropped']} | {_ms(t['latency']['p50_ms'])} | "
                     f"{_ms(t['latency']['p99_ms'])} | {t['final_image_equals_direct_call']} |")
    ws = r.get("websocket")
    if ws:
        lines += ["", "## WebSocket (in-process `turbo-trt live` app, local client, one frame in flight, JPEG)", "",
                  "| what | p50 ms | p99 ms |", "|---|---|---|",
                  f"| round trip (send frame to image received) | {_ms(ws['round_trip']['p50_ms'])} | "
                  f"{_ms(ws['round_trip']['p99_ms'])} |",
                  f"| server push to result | {_ms(ws['server_push_to_result']['p50_ms'])} | "
                  f"{_ms(ws['server_push_to_result']['p99_ms'])} |",
                  f"| overhead per frame (decode, encode, transfers) | {_ms(ws['overhead_per_frame']['p50_ms'])} | "
                  f"{_ms(ws['overhead_per_frame']['p99_ms'])} |",
                  "", f"{ws['fps']:.2f} fps over {ws['frames']} frames; mean frame {ws['frame_bytes_mean'] / 1024:.1f} KiB, "
                      f"mean result {ws['result_bytes_mean'] / 1024:.1f} KiB."]
    if r.get("reading"):
        lines += ["", "## Reading", "", r["reading"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engines", type=Path, help="bundle directory (not needed with --render)")
    parser.add_argument("--executor", default="auto")
    parser.add_argument("--frames", type=int, default=60, help="frames of the synthetic video per scenario")
    parser.add_argument("--no-websocket", action="store_true", help="skip the WebSocket part (needs the live extra)")
    parser.add_argument("--note", default=None, help="free text recorded with the result (e.g. machine load)")
    parser.add_argument("--json", type=Path, required=True)
    parser.add_argument("--report", type=Path, default=None)
    parser.add_argument("--render", action="store_true", help="only rewrite --report from an existing --json")
    args = parser.parse_args(argv)
    if args.render:
        result = json.loads(args.json.read_text())
    else:
        if args.engines is None:
            parser.error("--engines is required")
        result = run(args.engines, args.executor, args.frames, args.note, not args.no_websocket)
    write_results(result, None if args.render else args.json, args.report, markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
