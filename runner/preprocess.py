"""Host-side control-image preprocessors for ControlNet bundles (numpy + OpenCV, no torch).

`CannyEdges` turns an RGB frame into the white-on-black edge map a Canny ControlNet reads, as diffusers'
ControlNet examples make it (`cv2.Canny(image, low, high)` on the RGB array, the one-channel result
repeated to three channels). It needs `opencv-python-headless` (`pip install 'turbo-trt[controlnet]'`),
imported on first use with a clear error when absent, so the runner imports without it.

Real time: OpenCV releases the GIL inside Canny, so a stream can run it for frame N+1 in a worker thread
while the engines run frame N. Reusing one `out` buffer per in-flight frame avoids allocating per frame:

    edges = CannyEdges(low=100, high=200)
    control = edges(frame_rgb_uint8, out=buffers[slot])      # uint8 (H, W, 3)
    pipe(prompt, image=frame, control_image=control, ...)     # or the stream's per-frame control input
"""

from __future__ import annotations

from typing import Any

import numpy as np

from turbo_trt.errors import InputError, TurboTrtError

INSTALL_HINT = "pip install 'turbo-trt[controlnet]' (or pip install opencv-python-headless)"


def _cv2() -> Any:
    try:
        import cv2
    except ImportError as exc:
        raise TurboTrtError(f"the Canny preprocessor needs OpenCV, which is not installed ({exc}); {INSTALL_HINT}") \
            from exc
    return cv2


class CannyEdges:
    """RGB frame -> uint8 (H, W, 3) Canny edge map (255 on edges, 0 elsewhere).

    `low` / `high`: the hysteresis thresholds of `cv2.Canny` (diffusers' examples use 100 / 200);
    `size` (height, width): resize the frame first (area interpolation) when it differs, e.g. a camera
    frame to the bundle's size; None keeps the frame's size."""

    def __init__(self, low: int = 100, high: int = 200, size: tuple[int, int] | None = None) -> None:
        if not 0 <= low <= high:
            raise InputError(f"Canny thresholds must satisfy 0 <= low <= high, got low={low}, high={high}")
        self.cv2 = _cv2()
        self.low, self.high, self.size = low, high, size

    def __call__(self, frame: Any, out: np.ndarray | None = None) -> np.ndarray:
        """`frame`: a uint8 (H, W, 3) RGB array or a PIL image; `out`: an optional uint8 (H, W, 3) buffer
        written in place and returned."""
        array = np.asarray(frame.convert("RGB")) if hasattr(frame, "convert") else np.asarray(frame)
        if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
            raise InputError(f"the Canny preprocessor takes uint8 (H, W, 3) RGB frames, got {array.dtype} "
                             f"{list(array.shape)}")
        if self.size is not None and array.shape[:2] != tuple(self.size):
            height, width = self.size
            array = self.cv2.resize(array, (width, height), interpolation=self.cv2.INTER_AREA)
        edges = self.cv2.Canny(np.ascontiguousarray(array), self.low, self.high)
        if out is None:
            out = np.empty((*edges.shape, 3), np.uint8)
        elif out.shape != (*edges.shape, 3) or out.dtype != np.uint8:
            raise InputError(f"out must be uint8 {[*edges.shape, 3]}, got {out.dtype} {list(out.shape)}")
        out[...] = edges[:, :, None]
        return out
