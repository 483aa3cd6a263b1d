"""The host-side Canny preprocessor (runner/preprocess.py): real OpenCV on synthetic frames."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from turbo_trt.errors import InputError
from turbo_trt.runner.preprocess import CannyEdges

from .conftest import write_import_blocker


def _square(size: int = 64) -> np.ndarray:
    frame = np.zeros((size, size, 3), np.uint8)
    frame[16:48, 16:48] = (200, 40, 90)  # a coloured square on black
    return frame


def test_canny_marks_the_square_outline_only():
    edges = CannyEdges()(_square())
    assert edges.shape == (64, 64, 3) and edges.dtype == np.uint8
    assert set(np.unique(edges)) == {0, 255}
    assert (edges[..., 0] == edges[..., 1]).all() and (edges[..., 0] == edges[..., 2]).all()
    on = edges[..., 0] > 0
    assert on[14:50, 14:50].sum() == on.sum()  # every edge pixel sits at the square's border ...
    assert not on[20:44, 20:44].any()  # ... none inside it
    assert on[:, 15:18].any() and on[:, 46:49].any() and on[15:18, :].any() and on[46:49, :].any()  # all 4 sides
    assert not CannyEdges(low=2000, high=3000)(_square()).any()  # thresholds above every gradient: no edges


def test_canny_resizes_reuses_its_buffer_and_reads_pil():
    from PIL import Image

    frame = np.repeat(np.repeat(_square(), 2, axis=0), 2, axis=1)  # 128x128 camera frame
    out = np.full((64, 64, 3), 7, np.uint8)
    result = CannyEdges(size=(64, 64))(Image.fromarray(frame), out=out)
    assert result is out and out[..., 0].any() and set(np.unique(out)) == {0, 255}
    with pytest.raises(InputError, match="uint8 \\(H, W, 3\\)"):
        CannyEdges()(np.zeros((64, 64), np.uint8))
    with pytest.raises(InputError, match="out must be uint8"):
        CannyEdges()(_square(), out=np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(InputError, match="low <= high"):
        CannyEdges(low=200, high=100)


def test_missing_opencv_is_a_clear_error(tmp_path):
    env = write_import_blocker(tmp_path, ("cv2",))
    code = ("from turbo_trt.runner.preprocess import CannyEdges\n"
            "from turbo_trt.errors import TurboTrtError\n"
            "try:\n    CannyEdges()\nexcept TurboTrtError as exc:\n    print(exc)\n")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "needs OpenCV" in done.stdout and "opencv-python-headless" in done.stdout
