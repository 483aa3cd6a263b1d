"""Frame streams (runner/stream/) on the tiny SD bundle with the ONNX Runtime executor: newest wins,
bit-equality with direct calls, the similarity filter, every fault, streams on forks in threads.

Every wait is bounded (get(timeout=...), join(timeout=...)), so a deadlock fails a test instead of hanging it.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
from PIL import Image

from turbo_trt.runner import TurboPipeline
from turbo_trt.runner.stream import FrameFailedError, PoolBrokenError, StreamClosedError, StreamInputError, StreamPool

from .conftest import direct_image as direct
from .conftest import smooth_frame

WAIT = 60.0  # seconds any single result may take on two busy shared cores


@pytest.fixture(scope="module")
def pipe(sd_bundle):
    pipe = TurboPipeline.from_bundle(sd_bundle[0], executor="onnxruntime")
    yield pipe
    pipe.close()


def frame(seed: int, size: int = 64) -> np.ndarray:
    return np.asarray(smooth_frame(seed, (size, size)))


def next_result(stream):
    result = stream.get(timeout=WAIT)
    assert result is not None, "no result within the time limit"
    return result


def test_results_equal_direct_calls(pipe):
    """txt2img, img2img, and a prompt (and seed) change mid-stream: each processed input equals the direct
    pipeline call with the settings in force when it was pushed, bit for bit."""
    f0, f1, f2 = frame(0), frame(1), frame(2)
    with pipe.stream("a cat, oil painting", steps=2, strength=0.5, seed=7) as stream:
        assert stream.pool.pipes[0] is not pipe and stream.pool.pipes[0].executor.sessions is pipe.executor.sessions
        cases = [  # (push arguments, the direct call's image), pushed one at a time
            ((f0,), {}, direct(pipe, "a cat, oil painting", 7, 2, f0)),
            ((Image.fromarray(f1),), {}, direct(pipe, "a cat, oil painting", 7, 2, f1)),
            ((), {"prompt": "a dog"}, direct(pipe, "a dog", 7, 2)),  # no image: txt2img
            ((f2,), {}, direct(pipe, "a dog", 7, 2, f2)),  # the prompt applies from its push on
            ((f2,), {"seed": 3, "steps": 4, "strength": 0.25}, direct(pipe, "a dog", 3, 4, f2, 0.25)),
            ((), {"prompt": "a dog", "steps": 1}, direct(pipe, "a dog", 3, 1)),
        ]
        for args, kwargs, want in cases:
            seq = stream.push(*args, **kwargs)
            result = next_result(stream)
            assert result.seq == seq and not result.skipped and result.latency_s > 0
            assert result.image.shape == (64, 64, 3) and result.image.dtype == np.uint8
            np.testing.assert_array_equal(result.image, want)
        stats = stream.stats()
        assert stats["pushed"] == stats["processed"] == len(cases)
        assert stats["dropped"] == stats["skipped"] == stats["failed"] == 0
        assert stats["latency_ms_p50"] > 0 and stats["latency_ms_p99"] >= stats["latency_ms_p50"] and stats["fps"] > 0
    unseeded = pipe.stream("a lighthouse")
    try:
        unseeded.push(prompt="a lighthouse")
        np.testing.assert_array_equal(next_result(unseeded).image, direct(pipe, "a lighthouse", unseeded.seed, 1))
    finally:
        unseeded.close()


@pytest.mark.parametrize("queue", [1, 3])
def test_newest_wins(pipe, queue):
    """Pushes far faster than the engine: the oldest waiting inputs are dropped, results come out in
    increasing seq, the newest inputs all run, and pushed = processed + dropped once idle."""
    delivered: list = []
    pool = StreamPool([pipe.fork()])
    frames = [frame(10 + i) for i in range(24)]
    try:
        stream = pool.stream("a boat", steps=2, strength=0.5, seed=1, queue=queue,
                             notify=lambda: delivered.append(stream.get(timeout=0)))
        seqs = [stream.push(f) for f in frames]
        assert seqs == list(range(24))
        for _ in range(int(WAIT * 20)):
            if stream.idle:
                break
            threading.Event().wait(0.05)
        assert stream.idle
        got = [r for r in delivered if r is not None]
        order = [r.seq for r in got]
        assert order == sorted(order) and len(set(order)) == len(order)
        stats = stream.stats()
        assert stats["pushed"] == 24 == stats["processed"] + stats["dropped"] + stats["skipped"] + stats["failed"]
        assert stats["dropped"] >= 24 - queue - 2 and stats["failed"] == stats["skipped"] == 0
        assert order[-queue:] == list(range(24 - queue, 24))  # the newest `queue` inputs were waiting last: all ran
        assert stats["processed"] == len(got)
        for result in (got[0], got[-1]):
            np.testing.assert_array_equal(result.image, direct(pipe, "a boat", 1, 2, frames[result.seq]))
        assert stream.get(timeout=0) is None  # nothing newer than what was returned
    finally:
        pool.close()


def test_similarity_filter(pipe):
    """A frame close to the last frame that ran (same settings) reuses its output at once; after max_skip
    skips in a row one runs anyway; a different frame or a new prompt always runs."""
    a, b = frame(40), frame(41)
    near = np.clip(a.astype(int) + np.random.default_rng(0).integers(-2, 3, a.shape), 0, 255).astype(np.uint8)
    with pipe.stream("a fox", steps=2, strength=0.5, seed=5, similarity=0.98, max_skip=2) as stream:
        first = (stream.push(a), next_result(stream))
        np.testing.assert_array_equal(first[1].image, direct(pipe, "a fox", 5, 2, a))
        outcomes = []
        for image, kwargs in [(a, {}), (near, {}), (a, {}), (b, {}), (near, {}), (near, {"prompt": "a wolf"})]:
            seq = stream.push(image, **kwargs)
            result = next_result(stream)
            assert result.seq == seq
            outcomes.append(result)
        assert [r.skipped for r in outcomes] == [True, True, False, False, False, False]
        np.testing.assert_array_equal(outcomes[0].image, first[1].image)
        np.testing.assert_array_equal(outcomes[1].image, first[1].image)
        np.testing.assert_array_equal(outcomes[2].image, first[1].image)  # ran (max_skip reached): same frame
        np.testing.assert_array_equal(outcomes[3].image, direct(pipe, "a fox", 5, 2, b))
        np.testing.assert_array_equal(outcomes[4].image, direct(pipe, "a fox", 5, 2, near))  # near a, not b
        np.testing.assert_array_equal(outcomes[5].image, direct(pipe, "a wolf", 5, 2, near))
        stats = stream.stats()
        assert stats["skipped"] == 2 and stats["processed"] == 5 and stats["pushed"] == 7


def test_faults(pipe):
    """Bad inputs raise at push naming the field and queue nothing; an engine failure reaches the next get
    naming the frame and the stream goes on; close is idempotent, counts waiting inputs as dropped and joins
    the worker; get and push after it raise."""
    good = frame(50)
    stream = pipe.stream("a tree", steps=2, strength=0.5, seed=2)
    bad = [
        ({"image": Image.fromarray(good).resize((64, 32))}, "image", "aspect ratio"),
        ({"image": good.astype(np.float32)}, "image", "uint8"),
        ({"image": np.zeros((64, 64, 4), np.uint8)}, "image", r"\(H, W, 3\)"),
        ({"image": np.zeros((32, 32, 3), np.uint8)}, "image", "64x64"),
        ({"image": good, "prompt": 5}, "prompt", "string"),
        ({"image": good, "steps": 9}, "steps", "1..4"),
        ({"image": good, "strength": 0.0}, "strength", r"\(0, 1\]"),
        ({"image": good, "strength": 0.2}, "strength", "0 steps"),
        ({"image": good, "seed": -1}, "seed", "2\\*\\*63"),
    ]
    for kwargs, name, message in bad:
        with pytest.raises(StreamInputError, match=message) as info:
            stream.push(**kwargs)
        assert info.value.field == name
    assert stream.stats()["pushed"] == 0 and stream.settings.prompt == "a tree" and stream.settings.steps == 2
    worker = stream.pool.pipes[0].executor
    sessions = worker.sessions
    worker.sessions = {**sessions, "unet": sessions["vae_decoder"]}  # a real ONNX Runtime failure: wrong graph
    try:
        seq = stream.push(good)
        assert seq == 0  # nothing was queued by the bad pushes
        with pytest.raises(FrameFailedError, match="frame 0 failed") as failure:
            stream.get(timeout=WAIT)
        assert failure.value.seq == 0 and failure.value.__cause__ is not None
    finally:
        worker.sessions = sessions
    stream.push(good)
    np.testing.assert_array_equal(next_result(stream).image, direct(pipe, "a tree", 2, 2, good))
    for i in range(6):
        stream.push(frame(60 + i))
    threads = stream.pool._threads
    stream.close()
    stream.close()  # idempotent
    assert not any(t.is_alive() for t in threads)
    stats = stream.stats()
    assert stats["failed"] == 1 and stats["waiting"] == 0 and stats["running"] == 0
    assert stats["pushed"] == stats["processed"] + stats["dropped"] + stats["failed"] + stats["skipped"]
    with pytest.raises(StreamClosedError):
        stream.get(timeout=0)
    with pytest.raises(StreamClosedError):
        stream.push(good)


def test_pool_of_two_forks_three_streams_in_threads(pipe):
    """Three streams on a pool of two forks, each pushing bursts from its own thread: per stream, results
    come in increasing seq, pushed = processed + dropped once idle, and every result equals the direct call
    with that stream's settings on the frame of its seq."""
    frames = [frame(70 + i) for i in range(4)]
    pushes = 8  # push i sends frames[i % 4]
    got: dict[int, list] = {s: [] for s in range(3)}
    errors: list[BaseException] = []
    pool = StreamPool([pipe.fork(), pipe.fork()])
    try:
        streams = [pool.stream(f"thread {s}", steps=2, strength=0.5, seed=s) for s in range(3)]

        def work(s: int) -> None:
            try:
                stream = streams[s]
                for i in range(pushes):
                    stream.push(frames[i % 4])
                    if i % 2:  # bursts of two: the first of each pair usually waits and is replaced
                        result = stream.get(timeout=0.01)
                        if result is not None:
                            got[s].append(result)
                while not stream.idle or stream._result is not None:
                    result = stream.get(timeout=WAIT)
                    assert result is not None, "no result within the time limit"
                    got[s].append(result)
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(s,)) for s in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=WAIT * 3)
        assert not any(t.is_alive() for t in threads), "a stream thread hung"
        assert not errors, errors
        assert pool.runs == sum(stream.stats()["processed"] for stream in streams)
        want: dict = {}
        for s, stream in enumerate(streams):
            seqs = [r.seq for r in got[s]]
            assert seqs == sorted(set(seqs)) and seqs[-1] == pushes - 1, seqs
            stats = stream.stats()
            assert stats["pushed"] == pushes == stats["processed"] + stats["dropped"]
            assert stats["processed"] >= len(got[s]) and stats["failed"] == stats["skipped"] == 0
            for result in got[s]:
                key = (s, result.seq % 4)
                if key not in want:
                    want[key] = direct(pipe, f"thread {s}", s, 2, frames[result.seq % 4])
                np.testing.assert_array_equal(result.image, want[key])
    finally:
        pool.close()


class WorkerBug(BaseException):
    """Stands for an unexpected error inside a stream worker (not an engine failure)."""


def test_worker_death_breaks_the_pool_and_close_from_a_worker(pipe):
    """A worker that dies of an unexpected error fails the input it held with FrameFailedError and breaks
    the pool: get and push then raise PoolBrokenError. A pool closed from its own worker (a notify callback)
    does not deadlock: the worker closes its pipeline as it ends."""
    pool = StreamPool([pipe.fork()])
    executor = pool.pipes[0].executor

    def launch(*args):
        raise WorkerBug("a bug")

    executor.launch = launch
    try:
        stream = pool.stream("a kite", steps=2, seed=1)
        stream.push(frame(80))
        with pytest.raises(FrameFailedError, match="frame 0 failed") as failure:
            stream.get(timeout=WAIT)
        assert isinstance(failure.value.__cause__, WorkerBug)
        with pytest.raises(PoolBrokenError, match="worker 0 died"):
            stream.get(timeout=WAIT)
        with pytest.raises(PoolBrokenError):
            stream.push(frame(81))
        pool._threads[0].join(WAIT)
        assert not pool._threads[0].is_alive() and pool.health()["broken"]
    finally:
        pool.close()
    assert pool._pipes_closed == {0}

    pool = StreamPool([pipe.fork()])
    closed = threading.Event()

    def close_from_worker() -> None:
        pool.close()
        closed.set()

    stream = pool.stream("a kite", steps=2, seed=1, notify=close_from_worker)
    stream.push(frame(82))
    assert closed.wait(WAIT), "close() from the worker did not return"
    pool._threads[0].join(WAIT)
    assert not pool._threads[0].is_alive() and pool._pipes_closed == {0}
    assert stream.closed and stream.stats()["processed"] == 1
