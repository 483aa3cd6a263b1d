"""Frame streams: live video and as-you-type prompts through a pipeline, one engine run per frame.

    with pipe.stream("a cat, oil painting", steps=2, strength=0.5, seed=0) as stream:
        seq = stream.push(frame)            # img2img (PIL image or uint8 (H, W, 3)); returns its sequence number
        seq = stream.push(prompt="a dog")   # txt2img when no image is given
        result = stream.get(timeout=1.0)    # newest finished result not yet returned, or None

Rules (README, "Real time"):
- Newest wins: at most `queue` inputs wait; a newer push replaces the oldest waiting one (counted as
  dropped, never run). Results come out in increasing `seq`; `get` never returns an older result than one
  it already returned (a result nobody fetched before a newer one finished is passed over).
- Pipelined: a push does its host work (checks, resize, tokens, noise) in the caller's thread while the
  engines run; a worker thread per pipeline launches the next waiting input the moment the last one
  finishes (the executor's split `launch` / `wait`), and the consumer encodes in its own thread.
- Deterministic: one seed per stream (settings change only where a push or `update` changes them), so a
  processed frame's image equals `pipe(prompt, image=frame, strength=..., num_inference_steps=...,
  seed=..., output_type="np")[0]` bit for bit, and a txt2img input equals `pipe(prompt, ...)` likewise.
- Similarity filter (opt-in): a frame whose downscaled copy (SIMILARITY_SIDE^2 pixels, scaled to [-1, 1])
  has cosine >= `similarity` with that of the last frame that ran, under the same settings, does not run:
  its result is the last output, `skipped=True`. After `max_skip` skips in a row one runs anyway. The
  decision depends only on the frames that reach the engine, never on a random draw. Its limit: cosine
  measures the pattern of deviations from mid-gray, not their size, so a frame whose contrast around
  mid-gray changes by a constant factor (fades towards or away from gray) counts as identical.
- Faults: a bad input raises at `push` (StreamInputError naming the field) and queues nothing; an engine
  failure reaches the caller as FrameFailedError naming the frame, in seq order with the results (at most
  ERRORS_KEPT wait), and the stream goes on; `close()` is idempotent, counts the waiting inputs as dropped
  and joins the threads it owns; `get`/`push` after it raise StreamClosedError. A pipeline whose executor
  reports itself broken (a sticky CUDA error) is retired: its worker ends and the others go on; when none
  is left, or a worker dies of an unexpected error (its inputs fail with FrameFailedError), the pool is
  broken and `push`/`get` raise PoolBrokenError.

A `StreamPool` runs the inputs of any number of streams on one or more pipelines (forks sharing the
weights, one worker thread each), serving the streams with waiting inputs round robin, one input per
stream at a time. `TurboPipeline.stream()` makes a pool of one fork that only its stream uses; the live
server (runner/live) shares one pool among its clients. A worker holds its pipeline's lock from launch to
wait, so a pipeline given to a pool may still be called directly: the call waits for the image that runs.
No torch is imported here.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from turbo_trt.errors import InputError, TurboTrtError

from .inputs import Control, Noise, check_image, check_prompts, check_seed, latent_shape, make_noise
from .schedule import Plan, img2img_plan, txt2img_plan
from .tokenizer import PromptTruncated

if TYPE_CHECKING:
    from .executors.base import Launched
    from .pipeline import TurboPipeline

log = logging.getLogger("turbo_trt.stream")

#: Side of the downscaled copy the similarity filter compares (area average over blocks).
SIMILARITY_SIDE = 32
#: Results kept for the fps and latency figures of `stats()`.
FPS_WINDOW = 32
LATENCY_WINDOW = 512
#: Distinct prompts / noise sets kept per stream (tokens and seeded noise are made once each).
HOST_CACHE = 16
#: Engine failures kept per stream until `get` raises them (older ones are counted, not kept).
ERRORS_KEPT = 8
#: `Stream.update`'s default for `similarity`: leave the filter as it is (None turns it off).
KEEP: Any = object()


class StreamInputError(InputError):
    """A push or settings change broke a rule; `field` names what (prompt, seed, steps, strength, image, ...)."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field}: {rule}")
        self.field = field
        self.rule = rule


class StreamClosedError(TurboTrtError):
    """The stream (or its pool) was closed."""


class PoolBrokenError(TurboTrtError):
    """The stream pool can run nothing more: every pipeline's executor is broken, or a worker died of an
    unexpected error (logged)."""


class FrameFailedError(TurboTrtError):
    """The engines failed on one input; `seq` names it and `__cause__` is the executor's error. The stream
    stays usable."""

    def __init__(self, seq: int, cause: BaseException) -> None:
        super().__init__(f"frame {seq} failed ({type(cause).__name__}): {cause}")
        self.seq = seq


@dataclass(frozen=True)
class StreamResult:
    seq: int
    image: np.ndarray  # uint8 (H, W, 3)
    latency_s: float  # from push to the result being ready
    skipped: bool  # the similarity filter reused the last output


@dataclass(frozen=True)
class Settings:
    """What a stream's images depend on besides the frame; changed by `push(...)` keywords or `update`."""

    prompt: str
    seed: int
    steps: int
    strength: float


@dataclass
class _Input:
    seq: int
    pushed_at: float
    settings: Settings
    ids: dict[str, np.ndarray]
    plan: Plan
    noise: Noise
    pixels: np.ndarray | None  # uint8 (B, H, W, 3) for img2img
    thumb: np.ndarray | None  # the similarity filter's downscaled copy (when the filter is on)
    control: Control | None = None  # ControlNet bundles: this input's control images and per-run scales


@dataclass
class _Job:
    stream: Stream
    item: _Input
    launched: Launched | None = None
    lock: threading.Lock | None = None  # the pipeline's lock, held from launch to wait
    delivered: bool = False
    image: np.ndarray | None = None
    error: BaseException | None = None
    skipped: bool = False


def thumbnail(pixels: np.ndarray, side: int = SIMILARITY_SIDE) -> np.ndarray:
    """uint8 (H, W, 3) -> float32 vector of the area-averaged side x side copy, scaled to [-1, 1] (the
    range the VAE sees), so cosine similarity responds to content rather than to overall brightness."""
    h, w = pixels.shape[:2]
    bh, bw = max(h // side, 1), max(w // side, 1)
    cropped = pixels[: (h // bh) * bh, : (w // bw) * bw].astype(np.float32)
    small = cropped.reshape(h // bh, bh, w // bw, bw, 3).mean(axis=(1, 3))
    return (small / 127.5 - 1.0).ravel()


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    if na == 0.0 or nb == 0.0:
        return 1.0 if na == nb else 0.0
    return float(np.dot(a, b) / (na * nb))


class Stream:
    """One client's frames: a newest-wins queue, its settings, and its results. Made by
    `TurboPipeline.stream()` or `StreamPool.stream()`; use as a context manager or call `close()`."""

    def __init__(self, pool: StreamPool, prompt: str = "", *, steps: int = 1, strength: float = 0.5,
                 seed: int | None = None, queue: int = 1, similarity: float | None = None, max_skip: int = 10,
                 notify: Callable[[], None] | None = None, owns_pool: bool = False, control: str | None = None,
                 controlnet_conditioning_scale: float | list[float] = 1.0,
                 control_guidance_start: float | list[float] = 0.0,
                 control_guidance_end: float | list[float] = 1.0) -> None:
        self._pool = pool
        self._control_options = (controlnet_conditioning_scale, control_guidance_start, control_guidance_end)
        self._canny = self._preprocessor(control)
        self._lock = pool._lock
        self._ready = threading.Condition(self._lock)  # results, errors, close
        if isinstance(queue, bool) or not isinstance(queue, int) or queue < 1:
            raise StreamInputError("queue", f"must be an integer >= 1, got {queue!r}")
        self._queue = queue
        self._settings = Settings("", 0, 1, 0.5)
        self._similarity: float | None = None
        self._max_skip = 10
        self.update(prompt=prompt, seed=secrets.randbelow(2**63) if seed is None else seed, steps=steps,
                    strength=strength, similarity=similarity, max_skip=max_skip)
        self._notify = notify
        self._owns_pool = owns_pool
        self._host_lock = threading.Lock()  # the token and noise caches (pushes may come from several threads)
        self._tokens: collections.OrderedDict[str, dict[str, np.ndarray]] = collections.OrderedDict()
        self._noises: collections.OrderedDict[tuple[int, bool, int], Noise] = collections.OrderedDict()
        # guarded by the pool's lock
        self._waiting: collections.deque[_Input] = collections.deque()
        self._owner: object | None = None  # the worker whose inputs of this stream are not all delivered
        self._in_progress = 0  # taken by a worker, result not delivered yet
        self._frames_in_progress = 0  # of those, img2img inputs
        self._reference: tuple[np.ndarray | None, Settings] | None = None  # the last frame that ran
        self._last_output: np.ndarray | None = None
        self._skips_in_row = 0
        self._result: StreamResult | None = None
        self._returned = -1  # highest seq returned by get (or passed over)
        self._errors: collections.deque[FrameFailedError] = collections.deque(maxlen=ERRORS_KEPT)
        self.truncated: str | None = None  # the words dropped from the last prompt longer than the encoder's limit
        self._closed = False
        self._seq = 0
        self._counts = {"pushed": 0, "processed": 0, "dropped": 0, "skipped": 0, "failed": 0,
                        "prompts_truncated": 0}
        self._latencies: collections.deque[float] = collections.deque(maxlen=LATENCY_WINDOW)
        self._result_times: collections.deque[float] = collections.deque(maxlen=FPS_WINDOW)
        pool._attach(self)

    # -- settings -------------------------------------------------------------------------------------------
    @property
    def pool(self) -> StreamPool:
        return self._pool

    @property
    def settings(self) -> Settings:
        return self._settings

    @property
    def seed(self) -> int:
        return self._settings.seed

    def _checked(self, prompt: Any = None, seed: Any = None, steps: Any = None, strength: Any = None) -> Settings:
        """The current settings with the given ones replaced, each checked with the runner's rules."""
        current = self._settings
        changes: dict[str, Any] = {}
        if prompt is not None:
            try:
                check_prompts(prompt, 1)
                if not isinstance(prompt, str):
                    raise InputError(f"must be a string, got {type(prompt).__name__}")
            except InputError as exc:
                raise StreamInputError("prompt", str(exc)) from None
            changes["prompt"] = prompt
        if seed is not None:
            try:
                changes["seed"] = check_seed(seed)
            except InputError as exc:
                raise StreamInputError("seed", str(exc)) from None
        if steps is not None:
            try:
                txt2img_plan(self._pool.scheduler, steps)
            except InputError as exc:
                raise StreamInputError("steps", str(exc)) from None
            changes["steps"] = int(steps)
        if strength is not None:
            if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0.0 < strength <= 1.0:
                raise StreamInputError("strength", f"must be a number in (0, 1], got {strength!r}")
            changes["strength"] = float(strength)
        return replace(current, **changes) if changes else current

    def update(self, *, prompt: str | None = None, seed: int | None = None, steps: int | None = None,
               strength: float | None = None, similarity: float | None = KEEP, max_skip: int | None = None) -> None:
        """Change settings for the inputs pushed from now on (all checked first: a bad one changes nothing).
        `similarity=None` turns the filter off, a number in (0, 1] turns it on."""
        settings = self._checked(prompt, seed, steps, strength)
        if similarity is not KEEP and similarity is not None and (
                isinstance(similarity, bool) or not isinstance(similarity, (int, float)) or not 0.0 < similarity <= 1.0):
            raise StreamInputError("similarity", f"must be a number in (0, 1] or None (off), got {similarity!r}")
        if max_skip is not None and (isinstance(max_skip, bool) or not isinstance(max_skip, int) or max_skip < 0):
            raise StreamInputError("max_skip", f"must be an integer >= 0, got {max_skip!r}")
        with self._lock:
            self._settings = settings
            if similarity is not KEEP:
                self._similarity = None if similarity is None else float(similarity)
            if max_skip is not None:
                self._max_skip = max_skip

    # -- input ----------------------------------------------------------------------------------------------
    def push(self, image: Any = None, *, prompt: str | None = None, seed: int | None = None,
             steps: int | None = None, strength: float | None = None, control_image: Any = None) -> int:
        """Queue one input and return its sequence number: image-to-image from `image` (a PIL image, resized
        when its aspect ratio matches, or a uint8 (H, W, 3) array of the bundle's size), or text-to-image
        when no image is given. Settings given here apply from this input on. Everything is checked before
        anything is queued; a bad input raises StreamInputError and changes nothing.

        ControlNet bundles: `control_image` (one image per net, as `pipe(control_image=...)` takes it) steers
        this input with the stream's scales and guidance window; a stream made with `control="canny"` makes
        it from each frame itself (`runner/preprocess.py`, in the caller's thread while the engines run the
        frame before). Without either, the nets run at scale 0 (the plain UNet)."""
        pool = self._pool
        settings = self._checked(prompt, seed, steps, strength)
        img2img = image is not None
        if img2img and not pool.img2img:
            raise StreamInputError("image", "this bundle has no VAE encoder (built with --no-img2img): "
                                            "push without an image for text-to-image")
        try:
            plan = (img2img_plan(pool.scheduler, settings.steps, settings.strength) if img2img
                    else txt2img_plan(pool.scheduler, settings.steps))
        except InputError as exc:
            raise StreamInputError("strength" if img2img else "steps", str(exc)) from None
        pixels = thumb = None
        if img2img:
            try:
                pixels = check_image(image, pool.height, pool.width, pool.batch)
            except InputError as exc:
                raise StreamInputError("image", str(exc)) from None
            if self._similarity is not None:
                thumb = thumbnail(pixels[0])
        control = self._control(plan, control_image, pixels)
        if thumb is not None and control_image is not None and control is not None:
            # an explicit control image is part of what the similarity filter compares
            thumb = np.concatenate([thumb.ravel()] + [thumbnail(images[0]).ravel() for images in control.images])
        with self._host_lock:
            ids = self._token_ids(settings.prompt)
            noise = self._noise(settings.seed, img2img, plan.runs)
        now = time.perf_counter()
        with self._lock:
            if self._closed:
                raise StreamClosedError("push() on a closed stream")
            if pool._broken is not None:
                raise PoolBrokenError(pool._broken)
            seq = self._seq
            self._seq += 1
            self._settings = settings
            self._waiting.append(_Input(seq, now, settings, ids, plan, noise, pixels, thumb, control))
            self._counts["pushed"] += 1
            while len(self._waiting) > self._queue:
                self._waiting.popleft()
                self._counts["dropped"] += 1
            pool._work.notify()
        return seq

    def _preprocessor(self, control: str | None) -> Any:
        """The stream's own control-image maker: None, or "canny" (Canny edges of each frame)."""
        if control is None:
            return None
        if control != "canny":
            raise StreamInputError("control", f"must be None or 'canny', got {control!r}")
        if not self._pool.controlnets:
            raise StreamInputError("control", "this bundle has no ControlNet; build one with "
                                              "`turbo-trt build --controlnet ID_OR_DIR`")
        from .preprocess import CannyEdges

        return CannyEdges(size=(self._pool.height, self._pool.width))

    def _control(self, plan: Plan, control_image: Any, pixels: np.ndarray | None) -> Control | None:
        """This input's checked ControlNet inputs (None for a bundle without nets)."""
        pool = self._pool
        if control_image is None and self._canny is not None and pixels is not None:
            edges = np.stack([self._canny(frame) for frame in pixels])
            control_image = [edges] * pool.controlnets  # the same edge map for every net
        if control_image is None:
            if not pool.controlnets:
                return None
            return pool.pipes[0].control(plan, None)
        try:
            return pool.pipes[0].control(plan, control_image, *self._control_options)
        except InputError as exc:
            raise StreamInputError("control_image", str(exc)) from None

    def _token_ids(self, prompt: str) -> dict[str, np.ndarray]:
        ids = self._tokens.get(prompt)
        if ids is None:
            ids, dropped = self._pool.token_ids_checked(prompt)
            if dropped is not None:  # recorded per stream; one warning per stream (warnings filters are global)
                self.truncated = dropped
                with self._lock:
                    self._counts["prompts_truncated"] += 1
                    first = self._counts["prompts_truncated"] == 1
                if first:
                    warnings.warn(f"prompt is longer than the text encoder's limit; dropped: {dropped!r} (warned "
                                  "once per stream: see stream.truncated and stats()['prompts_truncated'])",
                                  PromptTruncated, stacklevel=4)
            self._tokens[prompt] = ids
            if len(self._tokens) > HOST_CACHE:
                self._tokens.popitem(last=False)
        return ids

    def _noise(self, seed: int, img2img: bool, runs: int) -> Noise:
        ancestral = runs if self._pool.ancestral else 0
        key = (seed, img2img, ancestral)
        noise = self._noises.get(key)
        if noise is None:
            noise = make_noise(seed, self._pool.latent_shape, img2img, ancestral)
            self._noises[key] = noise
            if len(self._noises) > HOST_CACHE:
                self._noises.popitem(last=False)
        return noise

    # -- output ---------------------------------------------------------------------------------------------
    def get(self, timeout: float | None = None) -> StreamResult | None:
        """The newest finished result not returned yet, waiting up to `timeout` seconds (None: until one
        comes); None if none came. Raises FrameFailedError for an input the engines failed on (once, in seq
        order with the results), StreamClosedError after close(), PoolBrokenError once the pool can run
        nothing more (after what was delivered before)."""
        deadline = None if timeout is None else time.monotonic() + max(timeout, 0.0)
        with self._lock:
            while True:
                if self._closed:
                    raise StreamClosedError("get() on a closed stream")
                if self._errors and (self._result is None or self._errors[0].seq < self._result.seq):
                    error = self._errors.popleft()
                    self._returned = max(self._returned, error.seq)
                    raise error
                if self._result is not None:
                    result, self._result = self._result, None
                    self._returned = result.seq
                    return result
                if self._pool._broken is not None:
                    raise PoolBrokenError(self._pool._broken)
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._ready.wait(remaining)

    def results(self, timeout: float = 1.0) -> Iterator[StreamResult]:
        """Results as they come, until `timeout` seconds pass without one."""
        while True:
            result = self.get(timeout)
            if result is None:
                return
            yield result

    @property
    def frames_in_flight(self) -> int:
        """Image inputs waiting or running (the live server starts text-to-image only when there are none)."""
        with self._lock:
            return sum(item.pixels is not None for item in self._waiting) + self._frames_in_progress

    @property
    def waiting(self) -> int:
        """Inputs waiting (not running yet)."""
        with self._lock:
            return len(self._waiting)

    @property
    def idle(self) -> bool:
        """Nothing waiting and nothing running."""
        with self._lock:
            return not self._waiting and self._in_progress == 0

    def stats(self) -> dict[str, Any]:
        """pushed, processed, dropped, skipped, failed, waiting, running; fps (results per second over the
        last results), latency_ms_p50 / p99 (push to result, processed frames). Once nothing waits or runs,
        pushed = processed + dropped + skipped + failed."""
        with self._lock:
            out: dict[str, Any] = dict(self._counts)
            out["waiting"] = len(self._waiting)
            out["running"] = self._in_progress
            times = list(self._result_times)
            latencies = list(self._latencies)
        out["fps"] = (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0
        p50, p99 = (np.percentile(np.asarray(latencies) * 1e3, [50, 99]).tolist() if latencies else (None, None))
        out["latency_ms_p50"], out["latency_ms_p99"] = p50, p99
        return out

    # -- lifetime -------------------------------------------------------------------------------------------
    def close(self, timeout: float | None = 60.0) -> None:
        """Stop: waiting inputs are dropped (counted), an input already running finishes and is discarded;
        with a pool of its own (`TurboPipeline.stream`), its worker thread is joined and its fork closed.
        Idempotent."""
        with self._lock:
            already = self._closed
            self._closed = True
            self._counts["dropped"] += len(self._waiting)
            self._waiting.clear()
            self._result = None
            self._ready.notify_all()
        if not already:
            self._pool._detach(self)
        if self._owns_pool:
            self._pool.close(timeout)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- called by the pool's workers, under the lock -------------------------------------------------------
    def _skip(self, item: _Input) -> bool:
        """Whether `item` is close enough to the last frame that ran to reuse its output."""
        if self._similarity is None or item.thumb is None or self._reference is None or self._last_output is None:
            return False
        thumb, settings = self._reference
        if thumb is None or settings != item.settings or self._skips_in_row >= self._max_skip:
            return False
        return cosine(item.thumb, thumb) >= self._similarity

    def _deliver(self, job: _Job, now: float) -> None:
        item = job.item
        job.delivered = True
        self._in_progress -= 1
        if item.pixels is not None:
            self._frames_in_progress -= 1
        if job.error is not None:
            self._counts["failed"] += 1
            if not self._closed:
                self._errors.append(FrameFailedError(item.seq, job.error))
                self._errors[-1].__cause__ = job.error
        else:
            assert job.image is not None
            self._counts["skipped" if job.skipped else "processed"] += 1
            if not job.skipped:
                self._latencies.append(now - item.pushed_at)
            self._result_times.append(now)
            if not self._closed and item.seq > self._returned and (self._result is None or item.seq > self._result.seq):
                if self._result is not None:
                    self._returned = self._result.seq  # finished but never fetched: passed over
                self._result = StreamResult(item.seq, job.image, now - item.pushed_at, job.skipped)
        self._ready.notify_all()


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
                        stream._reference = (item.thumb, item.settings)
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
        from .pipeline import check_finite

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


__all__ = ["FrameFailedError", "PoolBrokenError", "Settings", "Stream", "StreamClosedError", "StreamInputError", "StreamPool",
           "StreamResult", "cosine", "thumbnail"]
