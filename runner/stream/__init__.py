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

from .client import KEEP, Stream
from .errors import FrameFailedError, PoolBrokenError, StreamClosedError, StreamInputError
from .pool import StreamPool
from .records import Settings, StreamResult
from .similarity import cosine, thumbnail

__all__ = ["KEEP", "FrameFailedError", "PoolBrokenError", "Settings", "Stream", "StreamClosedError", "StreamInputError",
           "StreamPool", "StreamResult", "cosine", "thumbnail"]
