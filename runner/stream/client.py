"""`Stream`: one client's frames (newest-wins queue, settings, results); see the package docstring."""

from __future__ import annotations

import collections
import secrets
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import numpy as np

from turbo_trt.errors import InputError, TurboTrtError

from ..inputs import Control, Noise, check_image, check_prompts, check_seed, make_noise, per_net
from ..schedule import Plan, img2img_plan, txt2img_plan
from ..tokenizer import PromptTruncated
from .errors import FrameFailedError, PoolBrokenError, StreamClosedError, StreamInputError
from .records import ERRORS_KEPT, FPS_WINDOW, HOST_CACHE, LATENCY_WINDOW, Settings, StreamResult, _Input, _Job
from .similarity import cosine, thumbnail

if TYPE_CHECKING:
    from .pool import StreamPool

#: `Stream.update`'s default for `similarity` and `control`: leave it as it is (None turns it off).
KEEP: Any = object()



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
        # (the Canny preprocessor or None, (scales, starts, ends)): one attribute, so that a push reads a
        # consistent pair while `update` replaces it
        self._control_state: tuple[Any, tuple[Any, Any, Any]] = (
            self._preprocessor(control), (controlnet_conditioning_scale, control_guidance_start, control_guidance_end))
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
        self._reference: _Input | None = None  # the last frame that ran
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
               strength: float | None = None, similarity: float | None = KEEP, max_skip: int | None = None,
               control: str | None = KEEP, controlnet_conditioning_scale: float | list[float] | None = None) -> None:
        """Change settings for the inputs pushed from now on (all checked first: a bad one changes nothing).
        `similarity=None` turns the filter off, a number in (0, 1] turns it on. ControlNet bundles: `control`
        "canny" makes each frame's edge map the control image, None stops that; `controlnet_conditioning_scale`
        (one number, or one per net) replaces the stream's scales."""
        settings = self._checked(prompt, seed, steps, strength)
        canny = KEEP if control is KEEP else self._preprocessor(control)
        scales: list[float] | None = None
        if controlnet_conditioning_scale is not None:
            name = "controlnet_conditioning_scale"
            if not self._pool.controlnets:
                raise StreamInputError(name, "this bundle has no ControlNet")
            try:
                scales = per_net(controlnet_conditioning_scale, self._pool.controlnets, name)
            except InputError as exc:
                raise StreamInputError(name, str(exc)) from None
        if similarity is not KEEP and similarity is not None and (
                isinstance(similarity, bool) or not isinstance(similarity, (int, float)) or not 0.0 < similarity <= 1.0):
            raise StreamInputError("similarity", f"must be a number in (0, 1] or None (off), got {similarity!r}")
        if max_skip is not None and (isinstance(max_skip, bool) or not isinstance(max_skip, int) or max_skip < 0):
            raise StreamInputError("max_skip", f"must be an integer >= 0, got {max_skip!r}")
        with self._lock:
            self._settings = settings
            old_canny, options = self._control_state
            self._control_state = (old_canny if canny is KEEP else canny,
                                   options if scales is None else (scales, *options[1:]))
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
        from ..preprocess import CannyEdges

        try:
            return CannyEdges(size=(self._pool.height, self._pool.width))
        except TurboTrtError as exc:  # OpenCV is missing: the `controlnet` extra
            raise StreamInputError("control", str(exc)) from None

    def _control(self, plan: Plan, control_image: Any, pixels: np.ndarray | None) -> Control | None:
        """This input's checked ControlNet inputs (None for a bundle without nets)."""
        pool = self._pool
        canny, options = self._control_state
        if control_image is None and canny is not None and pixels is not None:
            edges = np.stack([canny(frame) for frame in pixels])
            control_image = [edges] * pool.controlnets  # the same edge map for every net
        if control_image is None:
            if not pool.controlnets:
                return None
            return pool.pipes[0].control(plan, None)
        try:
            return pool.pipes[0].control(plan, control_image, *options)
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
        last = self._reference
        if last.thumb is None or last.settings != item.settings or self._skips_in_row >= self._max_skip:
            return False
        if not _same_scales(last.control, item.control):
            return False  # the ControlNet scales changed (control turned on or off, a new scale)
        return cosine(item.thumb, last.thumb) >= self._similarity

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


def _same_scales(a: Control | None, b: Control | None) -> bool:
    if a is None or b is None:
        return a is b
    return bool(np.array_equal(a.scales, b.scales))
