"""`StreamPool`: pipelines running the inputs of any number of streams, one worker thread each."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ..inputs import latent_shape
from .client import Stream
from .errors import PoolBrokenError, StreamClosedError
from .records import _Job

if TYPE_CHECKING:
    from ..pipeline import TurboPipeline

log = logging.getLogger("turbo_trt.stream")


class StreamPool:
    """Pipelines (forks sharing weights) running the inputs of any number of streams; one worker thread
    per pipeline, streams with waiting inputs served round robin, at most one input per stream running.
    Each worker holds its pipeline's lock (`TurboPipeline._lock`) from launch to wait, so direct calls on
    a pipeline given here wait for the pool's image instead of running into its execution state."""

    def __init__(self, pipes: Sequence[TurboPipeline], close_pipes: bool = True) -> None:
        if not pipes:
            raise ValueError("a stream pool needs at least one pipeline")
        first = pipes[0]
        self.pipes = list(pipes)
        self._close_pipes = close_pipes
        self.scheduler = first.scheduler
        self.height, self.width = int(first.shapes["height"]), int(first.shapes["width"])
        self.batch = first.batch
        self.img2img = bool(first.bundle.img2img)
        self.controlnets = first.controlnets
        self.ancestral = bool(first.scheduler["ancestral"])
        self.latent_shape = latent_shape(first.shapes)
        self._tokenizers = first.tokenizers
        self._lock = threading.Lock()
        self._work = threading.Condition(self._lock)
        self._streams: list[Stream] = []
        self._next = 0  # round-robin position in _streams
        self._closed = False
        self._broken: str | None = None  # why the pool can run nothing more
        self.retired: dict[int, str] = {}  # pipeline index -> why its executor is broken (its worker ended)
        self._pipes_closed: set[int] = set()
        self.runs = 0  # engine runs launched (all streams)
        self._threads = [threading.Thread(target=self._worker, args=(i, pipe), name=f"turbo-trt-stream-{i}",
                                          daemon=True) for i, pipe in enumerate(self.pipes)]
        for thread in self._threads:
            thread.start()

    def stream(self, prompt: str = "", **options: Any) -> Stream:
        """A new stream on this pool (options as `TurboPipeline.stream`)."""
        return Stream(self, prompt, **options)

    def token_ids(self, prompt: str) -> dict[str, np.ndarray]:
        return self.token_ids_checked(prompt)[0]

    def token_ids_checked(self, prompt: str) -> tuple[dict[str, np.ndarray], str | None]:
        """encoder -> int32 (batch, 77) ids of `prompt`, and the words dropped from it (None when it fits);
        no warning."""
        ids: dict[str, np.ndarray] = {}
        dropped = None
        for name, tokenizer in self._tokenizers.items():
            row, cut = tokenizer.encode_checked(prompt)
            ids[name] = np.stack([row] * self.batch)
            dropped = dropped if cut is None or (dropped is not None and len(dropped) >= len(cut)) else cut
        return ids, dropped

    @property
    def streams(self) -> int:
        with self._lock:
            return len(self._streams)

    @property
    def broken(self) -> str | None:
        """Why the pool can run nothing more, or None."""
        return self._broken

    def health(self) -> dict[str, Any]:
        """engines (pipelines still serving), retired ({index: reason}), broken (reason or None)."""
        with self._lock:
            return {"engines": len(self.pipes) - len(self.retired), "retired": dict(self.retired),
                    "broken": self._broken}

    def _attach(self, stream: Stream) -> None:
        with self._lock:
            if self._closed:
                raise StreamClosedError("the stream pool is closed")
            if self._broken is not None:
                raise PoolBrokenError(self._broken)
            self._streams.append(stream)

    def _detach(self, stream: Stream) -> None:
        with self._lock:
            if stream in self._streams:
                index = self._streams.index(stream)
                self._streams.pop(index)
                if index < self._next:
                    self._next -= 1
            self._work.notify_all()

    def close(self, timeout: float | None = 60.0) -> None:
        """Close every stream, let the workers finish what runs, join them (up to `timeout` seconds each) and
        close the pipelines. Idempotent. Called from a worker thread (e.g. a stream's `notify` callback), it
        leaves that worker's pipeline to the worker, which closes it as it ends."""
        with self._lock:
            if self._closed:
                streams: list[Stream] = []
            else:
                self._closed = True
                streams = list(self._streams)
            self._work.notify_all()
        for stream in streams:
            stream.close()
        alive = False
        for index, thread in enumerate(self._threads):
            if thread is threading.current_thread():
                continue  # this worker closes its pipeline on its way out
            thread.join(timeout)
            if thread.is_alive():
                alive = True
            else:
                self._close_pipe(index)
        if alive:
            warnings.warn("a stream worker is still running after close(); it closes its pipeline when it ends",
                          RuntimeWarning, stacklevel=2)

    def _close_pipe(self, index: int) -> None:
        with self._lock:
            if not self._close_pipes or index in self._pipes_closed:
                return
            self._pipes_closed.add(index)
        self.pipes[index].close()

    def __enter__(self) -> StreamPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- workers ---------------------------------------------------------------------------------------------
    def _take(self, me: object, block: bool) -> tuple[list[_Job], _Job | None]:
        """Under no lock: the next input to run (round robin over streams with waiting inputs, each stream
        whose earlier inputs are all delivered or were taken by this worker), and the inputs skipped on the
        way. Blocks for work when `block`; returns ([], None) when there is none, or the pool is closing."""
        with self._lock:
            while True:
                skips: list[_Job] = []
                count = len(self._streams)
                for offset in range(count):
                    index = (self._next + offset) % count
                    stream = self._streams[index]
                    if not stream._waiting or stream._owner not in (None, me):
                        continue
                    while stream._waiting:
                        item = stream._waiting.popleft()
                        stream._owner = me
                        stream._in_progress += 1
                        if item.pixels is not None:
                            stream._frames_in_progress += 1
                        try:
                            skip = stream._skip(item)
                        except Exception:  # the filter is an optimization: run the frame
                            log.exception("the similarity filter failed; the frame runs")
                            skip = False
                        if skip:
                            stream._skips_in_row += 1
                            assert stream._last_output is not None
                            skips.append(_Job(stream, item, image=stream._last_output.copy(), skipped=True))
                            continue
                        stream._skips_in_row = 0
                        stream._reference = item
                        self._next = (index + 1) % count
                        self.runs += 1
                        return skips, _Job(stream, item)
                if skips or not block or self._closed:
                    return skips, None
                self._work.wait()

    def _worker(self, index: int, pipe: TurboPipeline) -> None:
        """Launch the next input, then deliver the last one (and any skipped on the way) while it runs. Every
        job taken is delivered (a failure as FrameFailedError) and every launch waited for, whatever fails."""
        me = threading.current_thread()
        executor = pipe.executor
        running: _Job | None = None  # launched (or failed to launch), not waited for
        owned: list[_Job] = []  # taken and not delivered
        try:
            while True:
                finished = None
                if running is not None:
                    finished, running = self._finish(executor, running), None
                retire = executor.broken
                skips, job = ([], None) if retire else self._take(me, block=finished is None)
                owned = ([finished] if finished is not None else []) + skips + ([job] if job is not None else [])
                if not owned:
                    return  # closing
                if job is not None:
                    self._launch(pipe, job)
                    running = job
                self._deliver_all(([finished] if finished is not None else []) + skips)
                owned = [job] if job is not None else []
                if retire:
                    self._retire(index, retire)
                    return
        except BaseException as exc:
            log.exception("stream worker %d died; the stream pool is broken", index)
            if running is not None and running.launched is not None and running.error is None:
                with contextlib.suppress(Exception):
                    executor.wait(running.launched)  # never leave a launch in flight
            if running is not None and running.lock is not None:
                running.lock.release()
                running.lock = None
            self._die(index, exc, owned)
        finally:
            if self._closed:
                self._close_pipe(index)

    def _launch(self, pipe: TurboPipeline, job: _Job) -> None:
        """Take the pipeline's lock and launch; a failure becomes the job's error (lock released)."""
        pipe._lock.acquire()
        job.lock = pipe._lock
        try:
            job.launched = pipe.executor.launch(job.item.ids, job.item.plan, job.item.noise, job.item.pixels,
                                                 job.item.control)
        except BaseException as exc:
            job.lock = None
            pipe._lock.release()
            if not isinstance(exc, Exception):
                raise  # the worker's handler fails the job and breaks the pool
            job.error = exc  # delivered as this frame's failure

    def _deliver_all(self, jobs: list[_Job]) -> None:
        if not jobs:
            return
        now = time.perf_counter()
        with self._lock:
            for done in jobs:
                done.stream._deliver(done, now)
            for done in jobs:
                if done.stream._in_progress == 0:
                    done.stream._owner = None
            self._work.notify_all()
        for stream in dict.fromkeys(done.stream for done in jobs):
            if stream._notify is not None and not stream._closed:
                try:
                    stream._notify()
                except Exception:  # noqa: S110 - a consumer that has gone away (e.g. its event loop closed)
                    pass

    def _retire(self, index: int, reason: str) -> None:
        log.error("stream pipeline %d retired: its executor is broken (%s)", index, reason)
        with self._lock:
            self.retired[index] = reason
            if len(self.retired) == len(self.pipes):
                self._broken = f"every engine is broken (last: {reason})"
            self._wake_all()

    def _die(self, index: int, exc: BaseException, owned: list[_Job]) -> None:
        """An unexpected error ended worker `index`: its undelivered jobs fail, and the pool is broken."""
        with self._lock:
            self._broken = f"stream worker {index} died of an unexpected error ({type(exc).__name__})"
        for job in owned:
            if not job.delivered:
                job.error = job.error or exc
                job.skipped = False
        with contextlib.suppress(Exception):
            self._deliver_all([job for job in owned if not job.delivered])
        with self._lock:
            self._wake_all()

    def _wake_all(self) -> None:
        """Under the lock: every stream's waiters and the workers."""
        for stream in self._streams:
            stream._ready.notify_all()
        self._work.notify_all()

    def _finish(self, executor: Any, job: _Job) -> _Job:
        """Wait for a launched job (or take its launch failure), release the pipeline's lock and record the
        output for the skip filter."""
        from ..pipeline import check_finite

        if job.error is None:
            assert job.launched is not None
            try:
                images, nonfinite = executor.wait(job.launched)
                check_finite(nonfinite)
                job.image = images[0]
            except Exception as exc:
                job.error = exc
            finally:
                if job.lock is not None:
                    job.lock.release()
                    job.lock = None
        with self._lock:
            stream = job.stream
            if job.error is not None:
                stream._reference = None
            elif stream._similarity is not None:
                assert job.image is not None
                stream._last_output = job.image.copy()  # the caller may write into the result's array
            else:
                stream._last_output = None
        return job
