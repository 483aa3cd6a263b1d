"""A bundle's deserialized TensorRT engines (the weights), shared by every executor forked from one load.

- Plans are read through an IStreamReaderV2 in chunks, so loading a 4.9 GB SDXL UNet plan does not hold a
  second full copy of it in host memory (older TensorRT 10 without the reader: the plan is read whole).
- Each engine's device footprint is measured as the drop in free device memory while it deserializes.
- Execution contexts are created with user-managed device memory (ExecutionContextAllocationStrategy
  USER_MANAGED): the executor gives all its contexts one shared scratch allocation (they run one after
  another on one stream), sized to the largest need. TensorRT-RTX engines built with REQUIRE_USER_ALLOCATION
  expect exactly that before their enqueues can be stream-captured.
- TensorRT-RTX's runtime (JIT kernel) cache is loaded from the bundle's `runtime_cache/` and attached to
  every context; `save_runtime_cache()` serializes it while no context of any fork runs (`use_lock`
  exclusive) and writes the file only when its bytes changed (see runner/runtime_cache.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from turbo_trt.errors import FlavorError
from turbo_trt.flavors import Flavor
from turbo_trt.io_contract import TensorIO, check_io

from .. import cuda
from ..bundle import Bundle
from ..runtime_cache import RuntimeCacheFile, cache_path
from ..rwlock import ReadWriteLock

if TYPE_CHECKING:  # the common API, typed by tensorrt-stubs (tensorrt_rtx has the same classes)
    import tensorrt as trt_api

#: Bytes handed to TensorRT per read while deserializing (the host copy held at any time).
READ_CHUNK = 64 << 20


def _stream_reader(trt: Any, path: Path) -> Any:
    """An IStreamReaderV2 over `path`, answering each read with at most READ_CHUNK bytes."""

    class _FileReader(trt.IStreamReaderV2):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IStreamReaderV2.__init__(self)
            self.handle = path.open("rb")
            self.bytes_read = 0

        def read(self, num_bytes: int, stream: int) -> bytes:
            data = self.handle.read(min(int(num_bytes), READ_CHUNK))
            self.bytes_read += len(data)
            return data

        def seek(self, offset: int, where: Any) -> bool:
            whence = {trt.SeekPosition.SET: 0, trt.SeekPosition.CUR: 1, trt.SeekPosition.END: 2}[where]
            self.handle.seek(int(offset), whence)
            return True

    return _FileReader()


def deserialize(runtime: Any, trt: Any, path: Path) -> Any:
    """Deserialize one plan file, streamed in chunks where the flavor can (returns None on failure)."""
    reader = None
    if hasattr(trt, "IStreamReaderV2"):
        try:
            reader = _stream_reader(trt, path)
        except RuntimeError:  # the reader needs a CUDA driver; without one, fail below with TensorRT's own word
            reader = None
    if reader is not None:
        try:
            return runtime.deserialize_cuda_engine(reader)
        finally:
            reader.handle.close()
    return runtime.deserialize_cuda_engine(path.read_bytes())


def _address(memory: Any) -> int:
    """TensorRT hands a pointer back as an int or a PyCapsule, by version."""
    if isinstance(memory, int) or memory is None:
        return int(memory or 0)
    import ctypes

    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return int(get(memory, None) or 0)


def counting_allocator(trt: Any) -> Any:
    """An IGpuAllocator (cudaMalloc / cudaFree) that counts every allocation TensorRT asks for, however
    small, so a test or bench can show that no image allocates device memory. Installed only on request
    (`EngineSet(count_allocations=True)`): the default path keeps TensorRT's own allocator."""
    from cuda.bindings import runtime as rt

    class _Counting(trt.IGpuAllocator):  # type: ignore[misc, name-defined]
        def __init__(self) -> None:
            trt.IGpuAllocator.__init__(self)
            self.allocations = 0
            self.allocated_bytes = 0

        def allocate(self, size: int, alignment: int, flags: int) -> int:
            if size == 0:
                return 0
            err, ptr = rt.cudaMalloc(int(size))
            if int(err) != 0:
                return 0
            self.allocations += 1
            self.allocated_bytes += int(size)
            return int(ptr)

        def allocate_async(self, size: int, alignment: int, flags: int, stream: int) -> int:
            return self.allocate(size, alignment, flags)

        def deallocate(self, memory: Any) -> bool:
            address = _address(memory)
            return address == 0 or int(rt.cudaFree(address)[0]) == 0

        def deallocate_async(self, memory: Any, stream: int) -> bool:
            rt.cudaStreamSynchronize(stream)
            return self.deallocate(memory)

        def reallocate(self, address: Any, alignment: int, new_size: int) -> int:
            return 0  # not supported: TensorRT then allocates anew (and that is counted)

    return _Counting()


def scratch_size(engine: Any) -> int:
    """Device memory one execution context needs beyond the weights (TensorRT >= 10.1 has the _v2)."""
    size = getattr(engine, "device_memory_size_v2", None)
    return int(size if size is not None else engine.device_memory_size)


class EngineSet:
    """Deserialized engines of one bundle (the weights), shareable by several executors."""

    def __init__(self, bundle: Bundle, flavor: Flavor, gpu_name: str = "gpu", runtime_cache: bool = True,
                 count_allocations: bool = False) -> None:
        self.bundle = bundle
        self.flavor = flavor
        trt = flavor.trt
        self.logger: trt_api.ILogger = trt.Logger(trt.Logger.WARNING)
        self.runtime: trt_api.Runtime = trt.Runtime(self.logger)
        self.allocator: Any = None  # with count_allocations: .allocations, .allocated_bytes
        if count_allocations:
            self.allocator = counting_allocator(trt)
            self.runtime.gpu_allocator = self.allocator
        self.engines: dict[str, trt_api.ICudaEngine] = {}
        self.weights_bytes: dict[str, int] = {}  # measured: free device memory lost while deserializing
        for name in bundle.components():
            rel = bundle.component(name)["engine"]
            free_before = cuda.memory_info()[0]
            engine = deserialize(self.runtime, trt, bundle.path / rel)
            if engine is None:
                raise FlavorError(f"{flavor.name} {flavor.version} could not deserialize {rel} "
                                  "(its log above says why)")
            self.weights_bytes[name] = max(0, free_before - cuda.memory_info()[0])
            self.engines[name] = engine
        self.weights_version = 0  # bumped by every refit; executors recapture their graphs when it moves
        self.use_lock = ReadWriteLock()  # images: shared; refit: exclusive
        self._configs: list[Any] = []  # runtime configs stay referenced as long as their contexts
        self.cache_file: Path | None = None
        self.cache_store: RuntimeCacheFile | None = None
        self.cache: Any = None
        self.cache_loaded = False  # a cache file was there and TensorRT-RTX accepted it
        if runtime_cache and self._has_runtime_cache():
            self.cache_file = cache_path(bundle.path, gpu_name, flavor.version)
            self.cache_store = RuntimeCacheFile(self.cache_file)
            maker: Any = next(iter(self.engines.values())).create_runtime_config()  # RTX-only API below
            self.cache = maker.create_runtime_cache()
            self._configs.append(maker)
            blob = self.cache_store.load()
            self.cache_loaded = bool(blob) and bool(self.cache.deserialize(blob))
            if self.cache_loaded:
                self.cache_store.accepted(self.cache.serialize)  # compare later saves with its own bytes
            elif blob:
                self.cache_store.digest = None  # refused: the first save replaces it

    def _has_runtime_cache(self) -> bool:
        engine = next(iter(self.engines.values()))
        return hasattr(engine, "create_runtime_config") and hasattr(self.flavor.trt, "IRuntimeCache")

    def create_context(self, name: str) -> trt_api.IExecutionContext:
        """An execution context of engine `name` with user-managed device memory (and the runtime cache)."""
        trt = self.flavor.trt
        engine = self.engines[name]
        strategy = trt.ExecutionContextAllocationStrategy.USER_MANAGED
        if self.cache is not None:
            config: Any = engine.create_runtime_config()  # set_runtime_cache is TensorRT-RTX's
            config.set_execution_context_allocation_strategy(strategy)
            config.set_runtime_cache(self.cache)
            self._configs.append(config)
            context = engine.create_execution_context(config)
        else:
            context = engine.create_execution_context(strategy)
        if context is None:
            raise FlavorError(f"{self.flavor.name} could not create an execution context for {name}")
        return context

    def save_runtime_cache(self) -> bool:
        """Serialize the runtime cache while no context runs and write it into the bundle if it changed
        (atomic, file-locked). True when the file holds the current cache; False when there is none. Never
        call it while holding `use_lock` shared (an image in flight): it waits for every image to end."""
        if self.cache is None or self.cache_store is None:
            return False
        return self.cache_store.save(self.cache.serialize, self.use_lock.exclusive())

    def runtime_cache_changed(self) -> None:
        """Contexts compiled kernels into the cache (called inside an image; saved after it)."""
        if self.cache_store is not None:
            self.cache_store.mark_changed()

    def save_runtime_cache_if_changed(self) -> bool:
        if self.cache is None or self.cache_store is None:
            return False
        return self.cache_store.save_if_changed(self.cache.serialize, self.use_lock.exclusive())

    def scratch_bytes(self) -> dict[str, int]:
        return {name: scratch_size(engine) for name, engine in self.engines.items()}

    def io(self, name: str) -> dict[str, TensorIO]:
        """tensor name -> shape, dtype and direction as the engine declares it."""
        trt = self.flavor.trt
        engine = self.engines[name]
        out = {}
        for index in range(engine.num_io_tensors):
            tensor = engine.get_tensor_name(index)
            dims = engine.get_tensor_shape(tensor)
            shape = tuple(int(dims[i]) for i in range(len(dims)))
            dtype = np.dtype(trt.nptype(engine.get_tensor_dtype(tensor))).name
            is_input = engine.get_tensor_mode(tensor) == trt.TensorIOMode.INPUT
            out[tensor] = TensorIO(shape, dtype, is_input)
        return out

    def check_io(self) -> None:
        """Every engine's IO matches the buffers the executor binds (see turbo_trt.io_contract)."""
        b = self.bundle
        check_io({name: self.io(name) for name in self.engines}, b.family, b.shapes, b.img2img,
                 f"engines in {b.path}")
