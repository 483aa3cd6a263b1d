"""Small state machines of the GPU path that need no GPU: the prompt cache's two-phase slot use (a failed
run must not leave a slot that later serves a hit) and the runtime-cache file (atomic, locked, serialized
while no context runs, written only when changed)."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

from turbo_trt.runner.cache import SlotLRU
from turbo_trt.runner.runtime_cache import RuntimeCacheFile, cache_path, read_cache, write_cache


def test_next_slot_is_what_assign_returns_and_changes_nothing():
    lru = SlotLRU(2)
    assert lru.next_slot(b"a") == 0 and len(lru) == 0
    assert lru.assign(b"a") == 0
    assert lru.next_slot(b"b") == 1 and lru.assign(b"b") == 1
    lru.lookup(b"a")  # b is now the least recently used
    assert lru.next_slot(b"c") == 1 and lru.lookup(b"b") == 1  # peeking evicted nothing
    lru.lookup(b"a")
    assert lru.assign(b"c") == 1 and lru.lookup(b"b") is None


def test_failed_fill_evicts_the_slot_it_may_have_overwritten():
    lru = SlotLRU(1)
    lru.assign(b"old")
    slot = lru.next_slot(b"new")  # the run writes into the old prompt's slot, then fails
    lru.evict_slot(slot)
    assert lru.lookup(b"old") is None and lru.lookup(b"new") is None
    assert lru.next_slot(b"new") == slot  # and the slot is free again


def _writer(path: str, byte: int) -> None:
    for _ in range(30):
        assert write_cache(Path(path), bytes([byte]) * 200_000)


def test_runtime_cache_file_is_never_torn(tmp_path):
    path = cache_path(tmp_path, "NVIDIA H100 80GB HBM3", "1.7.1.116")
    assert path.parent.name == "runtime_cache" and path.name == "nvidia-h100-80gb-hbm3-1.7.1.116.bin"
    assert read_cache(path) is None
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_writer, args=(str(path), b)) for b in (1, 2)]
    for w in writers:
        w.start()
    seen = set()
    while any(w.is_alive() for w in writers):
        data = read_cache(path)
        if data is not None:
            assert len(data) == 200_000 and len(set(data)) == 1  # one writer's whole file, never a mix
            seen.add(data[0])
    for w in writers:
        w.join()
        assert w.exitcode == 0
    assert read_cache(path)[0] in (1, 2) and seen <= {1, 2}
    assert not [p for p in path.parent.iterdir() if p.name not in (path.name, path.name + ".lock")]


def test_runtime_cache_in_a_read_only_bundle_is_skipped(tmp_path):
    path = cache_path(tmp_path / "ro", "gpu", "1.0")
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        import os

        if os.geteuid() == 0:  # root writes anyway; check the writable case instead
            assert write_cache(path, b"x") and read_cache(path) == b"x"
        else:
            assert write_cache(path, b"x") is False and read_cache(path) is None
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_cold_start_child_process_reports_each_phase(sd_bundle):
    from turbo_trt.benchmarks.cold_start import measure_in_child

    cold = measure_in_child(sd_bundle[0], "onnxruntime", 1, runtime_cache=True, strict_targets=True, timeout=300)
    assert "error" not in cold, cold
    assert cold["total_s"] > cold["first_run_s"] > 0 and cold["runtime_cache_loaded"] is False
    broken = measure_in_child(sd_bundle[0].parent / "missing", "onnxruntime", 1, True, True, timeout=300)
    assert "missing" in broken["error"]


def test_runtime_cache_serialized_while_no_context_runs_and_written_only_when_changed(tmp_path):
    """Three forks compile kernels into one cache (each entry lands in two writes, as an image's JIT work
    does, under the engines' lock held shared) while a fourth thread keeps saving through RuntimeCacheFile
    with the same lock: every file written holds whole entries only. Saving with nothing new writes nothing
    (same inode: no rename), a reload of equal bytes writes nothing, and new bytes are written."""
    import os
    import threading
    import time

    from turbo_trt.runner.rwlock import ReadWriteLock

    path = cache_path(tmp_path, "gpu", "1.0")
    store = RuntimeCacheFile(path)
    assert store.load() is None and store.save_if_changed(bytes, ReadWriteLock().exclusive()) is False
    lock = ReadWriteLock()
    cache = bytearray()

    def compile_kernels() -> None:
        for _ in range(60):
            with lock.shared():
                cache.extend(b"<")
                time.sleep(0.0005)  # the entry is half-written here
                cache.extend(b">")
                store.mark_changed()

    forks = [threading.Thread(target=compile_kernels) for _ in range(3)]
    for fork in forks:
        fork.start()
    files = 0
    while any(fork.is_alive() for fork in forks):
        if store.save_if_changed(lambda: bytes(cache), lock.exclusive()):
            data = read_cache(path)
            assert data is not None and data.count(b"<") == data.count(b">"), data  # whole entries only
            files += 1
    for fork in forks:
        fork.join()
    assert store.save(lambda: bytes(cache), lock.exclusive()) and read_cache(path) == bytes(cache)
    assert cache.count(b"<") == cache.count(b">") == 180
    assert files > 0 and store.writes >= 2 and not store.pending
    writes, inode = store.writes, os.stat(path).st_ino
    assert store.save(lambda: bytes(cache), lock.exclusive())  # unchanged: True, nothing written
    assert store.save_if_changed(lambda: bytes(cache), lock.exclusive()) is False  # nothing compiled since
    assert store.writes == writes and os.stat(path).st_ino == inode
    again = RuntimeCacheFile(path)  # another process's load: equal bytes are not rewritten either
    assert again.load() == bytes(cache) and again.save(lambda: bytes(cache), ReadWriteLock().exclusive())
    assert again.writes == 0 and os.stat(path).st_ino == inode
    assert again.save(lambda: bytes(cache) + b"<>", ReadWriteLock().exclusive()) and again.writes == 1
    assert read_cache(path) == bytes(cache) + b"<>"


def test_runtime_cache_accepted_compares_with_its_own_serialization(tmp_path):
    """After TensorRT-RTX accepts the file, later saves compare with what the cache serializes to (which may
    differ from the file's bytes): a save with nothing compiled since writes nothing; without `accepted` the
    same save would rewrite the file."""
    from turbo_trt.runner.rwlock import ReadWriteLock

    path = cache_path(tmp_path, "gpu", "1.0")
    assert write_cache(path, b"file bytes")
    reserialized = lambda: b"same cache, other bytes"  # noqa: E731
    store = RuntimeCacheFile(path)
    assert store.load() == b"file bytes"
    store.accepted(reserialized)
    assert store.save(reserialized, ReadWriteLock().exclusive()) and store.writes == 0
    assert read_cache(path) == b"file bytes"
    plain = RuntimeCacheFile(path)
    plain.load()
    assert plain.save(reserialized, ReadWriteLock().exclusive()) and plain.writes == 1
