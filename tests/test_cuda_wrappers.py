"""runner/cuda.py against the real cuda-python bindings on a machine without a usable CUDA driver.

cuda-python checks argument counts and converts arguments before it calls the driver, so every wrapper
must get as far as the driver and report the driver's error as a RuntimeError naming it. A wrong argument
count or type surfaces here as TypeError/ValueError instead, which is how a binding mistake in the
executor's CUDA calls is caught without a GPU. (On a GPU machine tests/test_gpu.py runs them for real.)
"""

from __future__ import annotations

import numpy as np
import pytest

runtime = pytest.importorskip("cuda.bindings.runtime")

from turbo_trt.runner import cuda  # noqa: E402

pytestmark = pytest.mark.skipif(runtime.cudaGetDeviceCount()[0] == runtime.cudaError_t.cudaSuccess,
                                reason="a CUDA device is present: tests/test_gpu.py exercises these calls")

NO_DRIVER = r"CUDA error cudaError(InsufficientDriver|NoDevice|NotSupported)"
STREAM = runtime.cudaStream_t()
EVENT = runtime.cudaEvent_t()

CALLS = {
    "alloc": lambda: cuda.Memory().alloc(16),
    "pinned_array": lambda: cuda.Memory().pinned_array((2, 3), np.float32),
    "new_stream": cuda.new_stream,
    "h2d": lambda: cuda.h2d(0, 0, 16, STREAM),
    "d2h": lambda: cuda.d2h(0, 0, 16, STREAM),
    "d2d": lambda: cuda.d2d(0, 0, 16, STREAM),
    "memset": lambda: cuda.memset(0, 0, 16, STREAM),
    "synchronize": lambda: cuda.synchronize(STREAM),
    "begin_capture": lambda: cuda.begin_capture(STREAM),
    "end_capture": lambda: cuda.end_capture(STREAM),
    "launch": lambda: cuda.launch(runtime.cudaGraphExec_t(), STREAM),
    "memory_info": cuda.memory_info,
    "new_event": cuda.new_event,
    "new_sync_event": lambda: cuda.new_event(timing=False),
    "event_synchronize": lambda: cuda.event_synchronize(EVENT),
    "record": lambda: cuda.record(EVENT, STREAM),
    "elapsed_ms": lambda: cuda.elapsed_ms(EVENT, EVENT),
}


@pytest.mark.parametrize("name", sorted(CALLS))
def test_each_wrapper_reaches_the_driver(name):
    with pytest.raises(RuntimeError, match=NO_DRIVER):
        CALLS[name]()


def test_cleanup_wrappers_never_raise():
    cuda.abort_capture(STREAM)
    cuda.destroy_graph(runtime.cudaGraph_t(), runtime.cudaGraphExec_t())
    cuda.destroy_stream(STREAM)
    cuda.destroy_event(EVENT)
    memory = cuda.Memory()
    memory.free_all()
    assert memory.device == [] and memory.pinned == [] and memory.device_bytes == 0


def test_a_binding_mistake_is_not_mistaken_for_a_driver_error():
    """The control: a wrong call fails in the binding, not with the driver error the tests above expect."""
    with pytest.raises(TypeError):
        cuda.check(runtime.cudaMemcpyAsync(0, 0, 16, runtime.cudaMemcpyKind.cudaMemcpyHostToDevice))
