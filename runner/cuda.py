"""Thin, checked wrappers over cuda-python's runtime API (no torch): device and pinned host memory,
streams, copies and CUDA graphs."""

from __future__ import annotations

import ctypes
from dataclasses import dataclass
from typing import Any

import numpy as np


def _rt() -> Any:
    from cuda.bindings import runtime

    return runtime


def check(result: Any) -> Any:
    """cuda-python returns (error, *values); raise on error, return the values."""
    rt = _rt()
    err, *values = result if isinstance(result, tuple) else (result,)
    if int(err) != int(rt.cudaError_t.cudaSuccess):
        name = rt.cudaGetErrorName(err)[1]
        text = rt.cudaGetErrorString(err)[1]
        raise RuntimeError(f"CUDA error {name.decode() if isinstance(name, bytes) else name}: "
                           f"{text.decode() if isinstance(text, bytes) else text}")
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


@dataclass
class DeviceBuffer:
    ptr: int
    nbytes: int


@dataclass
class PinnedArray:
    """A numpy view of page-locked host memory (so copies can be captured into CUDA graphs)."""

    ptr: int
    array: np.ndarray


class Memory:
    """Owns every allocation of one executor; everything is freed by `free_all()`."""

    def __init__(self) -> None:
        self.device: list[DeviceBuffer] = []
        self.pinned: list[PinnedArray] = []

    def alloc(self, nbytes: int) -> DeviceBuffer:
        rt = _rt()
        ptr = int(check(rt.cudaMalloc(max(nbytes, 1))))
        buffer = DeviceBuffer(ptr, nbytes)
        self.device.append(buffer)
        return buffer

    def pinned_array(self, shape: tuple[int, ...], dtype: Any) -> PinnedArray:
        rt = _rt()
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = int(check(rt.cudaMallocHost(max(nbytes, 1))))
        raw = (ctypes.c_byte * max(nbytes, 1)).from_address(ptr)
        array = np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8, count=nbytes).view(dtype).reshape(shape)
        array[...] = 0  # cudaMallocHost does not clear; nothing should ever upload garbage
        pinned = PinnedArray(ptr, array)
        self.pinned.append(pinned)
        return pinned

    @property
    def device_bytes(self) -> int:
        return sum(b.nbytes for b in self.device)

    def free_all(self) -> None:
        rt = _rt()
        for buffer in self.device:
            rt.cudaFree(buffer.ptr)
        for pinned in self.pinned:
            rt.cudaFreeHost(pinned.ptr)
        self.device.clear()
        self.pinned.clear()


def new_stream() -> Any:
    rt = _rt()
    return check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking))


def h2d(dst: int, src: int, nbytes: int, stream: Any) -> None:
    rt = _rt()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))


def d2h(dst: int, src: int, nbytes: int, stream: Any) -> None:
    rt = _rt()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))


def d2d(dst: int, src: int, nbytes: int, stream: Any) -> None:
    rt = _rt()
    check(rt.cudaMemcpyAsync(dst, src, nbytes, rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice, stream))


def memset(dst: int, value: int, nbytes: int, stream: Any) -> None:
    check(_rt().cudaMemsetAsync(dst, value, nbytes, stream))


def synchronize(stream: Any) -> None:
    check(_rt().cudaStreamSynchronize(stream))


def begin_capture(stream: Any) -> None:
    rt = _rt()
    check(rt.cudaStreamBeginCapture(stream, rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal))


def end_capture(stream: Any) -> Any:
    """End capture and instantiate; returns (graph, graph_exec)."""
    rt = _rt()
    graph = check(rt.cudaStreamEndCapture(stream))
    try:
        graph_exec = check(rt.cudaGraphInstantiate(graph, 0))
    except RuntimeError:
        rt.cudaGraphDestroy(graph)
        raise
    return graph, graph_exec


def abort_capture(stream: Any) -> None:
    """Leave capture mode after a failure inside it (the partial graph is discarded)."""
    rt = _rt()
    result = rt.cudaStreamEndCapture(stream)
    if int(result[0]) == 0 and result[1] is not None:
        rt.cudaGraphDestroy(result[1])


def launch(graph_exec: Any, stream: Any) -> None:
    check(_rt().cudaGraphLaunch(graph_exec, stream))


def destroy_graph(graph: Any, graph_exec: Any) -> None:
    rt = _rt()
    rt.cudaGraphExecDestroy(graph_exec)
    rt.cudaGraphDestroy(graph)


def destroy_stream(stream: Any) -> None:
    _rt().cudaStreamDestroy(stream)


def destroy_event(event: Any) -> None:
    _rt().cudaEventDestroy(event)


def memory_info() -> tuple[int, int]:
    """(free, total) device memory in bytes."""
    free, total = check(_rt().cudaMemGetInfo())
    return int(free), int(total)


def new_event(timing: bool = True) -> Any:
    """A CUDA event; timing=False makes one for synchronization only (cheaper to record and wait on)."""
    rt = _rt()
    if timing:
        return check(rt.cudaEventCreate())
    return check(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming))


def event_synchronize(event: Any) -> None:
    """Block until the work recorded before `event` has finished (the GIL is released while waiting)."""
    check(_rt().cudaEventSynchronize(event))


def record(event: Any, stream: Any) -> None:
    check(_rt().cudaEventRecord(event, stream))


def elapsed_ms(start: Any, end: Any) -> float:
    return float(check(_rt().cudaEventElapsedTime(start, end)))
