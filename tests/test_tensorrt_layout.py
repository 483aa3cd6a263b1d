"""The TensorRT executor's dataflow, checked without a GPU.

The executor binds every context's tensor addresses once at load and runs a program of copies and
enqueues (`runner/executors/tensorrt_layout.py`). Here the same Layout allocates from a host arena (an
address is an offset into one numpy buffer), and the same program is replayed: copies are memmoves in
the arena, and an enqueue runs the bundle's real ONNX graph with ONNX Runtime, reading its inputs from and
writing its outputs to the addresses the context is bound to. The images must equal the ONNX Runtime
executor's bit for bit: any wrong binding, step position, plan row, cache copy or upload size changes them.
"""

from __future__ import annotations

import numpy as np
import pytest

from turbo_trt.io_contract import manifest_io
from turbo_trt.runner.bundle import Bundle
from turbo_trt.runner.executors.onnxruntime import OnnxRuntimeExecutor
from turbo_trt.runner.executors.tensorrt_layout import ALIGN, Layout, plan_row, unet_context
from turbo_trt.runner.inputs import latent_shape, make_noise
from turbo_trt.runner.pipeline import TurboPipeline

from .conftest import VARIANTS, bundle_variant


class _Buffer:
    def __init__(self, ptr: int, nbytes: int, array: np.ndarray | None = None) -> None:
        self.ptr, self.nbytes, self.array = ptr, nbytes, array


class ArenaMemory:
    """Host stand-in for device + pinned memory: one byte arena, 256-aligned bump allocation from 256."""

    def __init__(self, size: int = 16 << 20) -> None:
        self.arena = np.zeros(size, np.uint8)
        self.top = ALIGN

    def _take(self, nbytes: int) -> int:
        ptr = self.top
        self.top += -(-max(nbytes, 1) // ALIGN) * ALIGN
        assert self.top <= self.arena.size, "arena too small for the test bundle"
        return ptr

    def alloc(self, nbytes: int) -> _Buffer:
        return _Buffer(self._take(nbytes), nbytes)

    def pinned_array(self, shape, dtype) -> _Buffer:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        ptr = self._take(nbytes)
        return _Buffer(ptr, nbytes, self.arena[ptr:ptr + nbytes].view(dtype).reshape(shape))

    def view(self, ptr: int, shape, dtype) -> np.ndarray:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        return self.arena[ptr:ptr + nbytes].view(dtype).reshape(shape)


class ArenaReplay:
    """Runs a Layout's programs on the arena with the bundle's ONNX graphs (ONNX Runtime, CPU)."""

    def __init__(self, bundle: Bundle, sessions: dict, cache_size: int = 2) -> None:
        self.memory = ArenaMemory()
        self.layout = Layout(bundle, self.memory, cache_size)
        self.io = manifest_io(bundle.manifest["components"])
        self.components = dict(self.layout.contexts())
        self.bindings = self.layout.bindings()
        self.sessions = sessions
        a = self.memory.arena
        lat = self.layout.lat_bytes
        a[self.layout.zeros.ptr:self.layout.zeros.ptr + lat] = 0  # the executor's memset at load
        t = self.layout.plan_table
        a[self.layout.plan_table_dev.ptr:self.layout.plan_table_dev.ptr + t.nbytes] = a[t.ptr:t.ptr + t.nbytes]
        self.enqueued: list[str] = []

    def execute(self, ops) -> None:
        a = self.memory.arena
        for op in ops:
            if op.kind in ("h2d", "d2d", "d2h"):
                a[op.dst:op.dst + op.nbytes] = a[op.src:op.src + op.nbytes].copy()
            elif op.kind == "enqueue":
                self.enqueued.append(op.name)
                component = self.components[op.name]
                tensors = self.io[component]
                feeds = {name: self.memory.view(self.bindings[op.name][name], t.shape, t.dtype).copy()
                         for name, t in tensors.items() if t.is_input}
                outputs = [name for name, t in tensors.items() if not t.is_input]
                for name, value in zip(outputs, self.sessions[component].run(outputs, feeds)):
                    t = tensors[name]
                    self.memory.view(self.bindings[op.name][name], t.shape, t.dtype)[...] = value

    def image(self, ids, plan, noise, image, slot=None, store=None, control=None):
        """What TensorRTExecutor.run does, cache copies included (slot: hit; store: miss with a free slot)."""
        self.layout.fill(ids, noise, image, plan.runs, control)
        if slot is not None:
            self.execute(self.layout.cache_copies(slot, store=False))
        self.execute(self.layout.program(plan, with_encoders=slot is None))
        if store is not None:
            self.execute(self.layout.cache_copies(store, store=True))
        return self.layout.image.array.copy(), int(self.layout.nonfinite.array[0])


@pytest.fixture(scope="module", params=VARIANTS)
def setup(request, sd_bundle, sdxl_bundle):
    bundle = bundle_variant(request.param, sd_bundle, sdxl_bundle)
    reference = OnnxRuntimeExecutor(bundle, cache_size=0)
    replay = ArenaReplay(bundle, reference.sessions)
    return TurboPipeline(bundle, reference), replay


CASES = [(1, None), (2, None), (4, None), (2, 0.5), (4, 0.75), (1, 1.0)]


@pytest.mark.parametrize("steps,strength", CASES)
def test_program_matches_onnxruntime_executor(setup, steps, strength):
    pipe, replay = setup
    shapes = pipe.shapes
    plan = pipe.plan(steps, strength)
    img2img = strength is not None
    ancestral = bool(pipe.scheduler["ancestral"])
    noise = make_noise(steps * 7, latent_shape(shapes), img2img, plan.runs if ancestral else 0)
    image = (np.random.default_rng(steps).integers(0, 256, (1, shapes["height"], shapes["width"], 3), dtype=np.uint8)
             if img2img else None)
    ids = pipe.token_ids(["a red cat on a green sofa"])
    want, want_nonfinite = pipe.executor.run(ids, plan, noise, image)
    replay.enqueued.clear()
    got, nonfinite = replay.image(ids, plan, noise, image, store=0)
    np.testing.assert_array_equal(got, want)
    assert nonfinite == want_nonfinite == 0
    # the UNet ran once per step, from position runs-1 down to 0; encoders ran; the decoder ran last
    unets = [name for name in replay.enqueued if name.startswith("unet@")]
    assert unets == [unet_context(j) for j in reversed(range(plan.runs))]
    assert replay.enqueued[-1] == "vae_decoder" and replay.enqueued[0] == "text_encoder"
    assert ("vae_encoder" in replay.enqueued) == img2img
    # another prompt (stored in slot 1) overwrites the live embeddings; then a hit on slot 0 (embeddings
    # copied back, encoders skipped) must give the first prompt's image again
    other, _ = replay.image(pipe.token_ids(["a lighthouse at dusk"]), plan, noise, image, store=1)
    assert not np.array_equal(other, want)
    replay.enqueued.clear()
    hit, _ = replay.image(ids, plan, noise, image, slot=0)
    np.testing.assert_array_equal(hit, want)
    assert not any(name.startswith("text_encoder") for name in replay.enqueued)


def test_every_binding_is_aligned_and_every_io_is_bound(setup):
    _, replay = setup
    layout = replay.layout
    for key, tensors in replay.bindings.items():
        component = replay.components[key]
        assert set(tensors) == set(replay.io[component]), key
        for name, address in tensors.items():
            assert address % ALIGN == 0, (key, name)
    # each UNet position reads the buffer the one before it (in run order) wrote; the decoder reads latents[0]
    for j in range(layout.max_steps):
        assert replay.bindings[unet_context(j)]["next_latents"] == layout.latents[j].ptr
        assert replay.bindings[unet_context(j)]["latents"] == layout.latents[j + 1].ptr
    assert replay.bindings["vae_decoder"]["latents"] == layout.latents[0].ptr


def test_plan_row_puts_forward_step_k_at_position_runs_minus_1_minus_k(setup):
    pipe, _ = setup
    plan = pipe.plan(4, 0.75)  # 3 runs
    row = plan_row(plan, 4).reshape(9, ALIGN // 4)
    for k in range(plan.runs):
        j = plan.runs - 1 - k
        assert row[2 * j, 0] == plan.timesteps[k]
        np.testing.assert_array_equal(row[2 * j + 1, :4], plan.coeffs[k])
    assert row[8, 0] == np.float32(plan.noise_sigma)
    assert not row[2 * plan.runs:8].any()  # unused positions stay zero


@pytest.mark.parametrize("steps,strength", [(4, None), (4, 0.75), (1, None)])
def test_controlnet_program_matches_onnxruntime_executor(sd_control_bundle, steps, strength):
    """A bundle with two fused ControlNets: the control image buffer and the per-position scale slots carry a
    call's images and per-run scales (different in every run here), and no control means scale 0."""
    from turbo_trt.builder.validation_inputs import edge_map
    from turbo_trt.runner.bundle import open_bundle

    bundle = open_bundle(sd_control_bundle[0], files="onnx")
    reference = OnnxRuntimeExecutor(bundle, cache_size=0)
    pipe, replay = TurboPipeline(bundle, reference), ArenaReplay(bundle, reference.sessions)
    shapes = pipe.shapes
    plan = pipe.plan(steps, strength)
    rng = np.random.default_rng(steps)
    images = [edge_map(rng, 1, shapes["height"], shapes["width"]) for _ in range(2)]
    windows = ([0.0, 0.25], [0.75, 1.0]) if plan.runs > 1 else (0.0, 1.0)
    control = pipe.control(plan, images, [1.0, 0.5], *windows)
    noise = make_noise(11, latent_shape(shapes), strength is not None, 0)
    init = images[0] if strength is not None else None
    ids = pipe.token_ids(["a red cat on a green sofa"])
    want, _ = reference.run(ids, plan, noise, init, control)
    got, nonfinite = replay.image(ids, plan, noise, init, store=0, control=control)
    np.testing.assert_array_equal(got, want)
    assert nonfinite == 0
    off, _ = replay.image(ids, plan, noise, init, slot=0)  # no control: black images at scale 0
    np.testing.assert_array_equal(off, reference.run(ids, plan, noise, init)[0])
    assert not np.array_equal(off, got)
    for j in range(replay.layout.max_steps):
        assert replay.bindings[unet_context(j)]["control_scale"] == replay.layout.control_scale_dev.ptr + j * ALIGN
