"""Where every tensor of the TensorRT executor lives, and the copies and enqueues that make one image.

Bookkeeping only, no CUDA call: the executor allocates through `cuda.Memory` and turns the program into
cudaMemcpyAsync / execute_async_v3 calls (inside a graph capture or not); tests allocate from a host arena
and replay the same program with ONNX Runtime sessions, so the dataflow is checked without a GPU.

Every execution context's tensor addresses are fixed at load ("bound once"): nothing is re-bound between
enqueues, inside a capture or outside. The UNet has one execution context per step position j =
0..max_steps-1, counted from the last step: context j reads latents[j + 1] and writes latents[j]. So the
VAE decoder always reads latents[0], and an image of n UNet runs starts by putting its initial latents in
latents[n]. Per-plan scalars (timesteps, step coefficients, the img2img noise sigma) sit in one table
uploaded at load; an image's program starts by copying its plan's row into the fixed slots the contexts
read, so one captured graph per (plan, with or without text encoders) needs no host data but the inputs.
ControlNet bundles add one control image buffer (n, B, H, W, 3) that every UNet context reads, and one
scale slot per step position (n float32 at an aligned address), uploaded with the inputs: the scales are
per call (the caller's scales and guidance windows), not per plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from turbo_trt.io_contract import EMBEDDING_FEEDS, TensorIO, manifest_io

from ..bundle import Bundle
from ..schedule import Plan, all_plans

#: Byte alignment TensorRT asks of every tensor address (IExecutionContext.set_tensor_address); every
#: buffer and every plan constant starts on a boundary this size.
ALIGN = 256


class Allocator(Protocol):
    """What the layout needs of a memory owner (`runner.cuda.Memory`, or a test's host arena)."""

    def alloc(self, nbytes: int) -> Any: ...  # has .ptr, .nbytes

    def pinned_array(self, shape: tuple[int, ...], dtype: Any) -> Any: ...  # has .ptr, .array


@dataclass(frozen=True)
class Op:
    """One step of an image's program: a copy (h2d, d2d, d2h: dst, src, nbytes), an enqueue of the
    execution context `name`, or a stage mark `name` (where profiled runs record a CUDA event)."""

    kind: str
    dst: int = 0
    src: int = 0
    nbytes: int = 0
    name: str = ""


def unet_context(position: int) -> str:
    """Key of the UNet execution context for step position `position` (0 = the last step run)."""
    return f"unet@{position}"


def _nbytes(shape: tuple[int, ...], dtype: Any) -> int:
    return int(np.prod(shape)) * np.dtype(dtype).itemsize


class Layout:
    """All device and pinned host buffers of one executor, every context's bindings, and the program."""

    def __init__(self, bundle: Bundle, memory: Allocator, cache_size: int) -> None:
        shapes = bundle.shapes
        io = manifest_io(bundle.manifest["components"])  # equal to the engines' IO (checked at load)
        self.family = bundle.family
        self.encoders = bundle.encoders
        self.img2img = bundle.img2img
        self.max_steps = int(bundle.manifest["scheduler"]["max_steps"])
        self.ancestral = bool(bundle.manifest["scheduler"]["ancestral"])
        lat_shape = (shapes["batch"], shapes["latent_channels"], shapes["latent_height"], shapes["latent_width"])
        image_shape = (shapes["batch"], shapes["height"], shapes["width"], 3)
        self.lat_bytes = _nbytes(lat_shape, np.float32)
        mem = memory
        # host side (pinned, so copies can be captured), each with its device twin
        self.ids = {e: mem.pinned_array((shapes["batch"], shapes["tokens"]), np.int32) for e in self.encoders}
        self.ids_dev = {e: mem.alloc(self.ids[e].array.nbytes) for e in self.encoders}
        self.noise = mem.pinned_array(lat_shape, np.float32)
        self.step_noise = mem.pinned_array((self.max_steps, *lat_shape), np.float32)  # by step position
        self.step_noise_dev = mem.alloc(self.step_noise.array.nbytes)
        self.image = mem.pinned_array(image_shape, np.uint8)
        self.image_dev = mem.alloc(self.image.array.nbytes)
        self.nonfinite = mem.pinned_array((1,), np.int32)
        self.nonfinite_dev = mem.alloc(4)
        # device only
        unet_io: dict[str, TensorIO] = io["unet"]
        self.embeddings = {unet_input: mem.alloc(_nbytes(unet_io[unet_input].shape, unet_io[unet_input].dtype))
                           for _, _, unet_input in EMBEDDING_FEEDS[self.family]}
        self.latents = [mem.alloc(self.lat_bytes) for _ in range(self.max_steps + 1)]
        self.zeros = mem.alloc(self.lat_bytes)  # step noise of non-ancestral schedulers (zeroed at load)
        self.controlnets = int(shapes.get("controlnets", 0))
        if self.controlnets:
            self.control_image = mem.pinned_array((self.controlnets, *image_shape), np.uint8)
            self.control_image_dev = mem.alloc(self.control_image.array.nbytes)
            self.control_scale = mem.pinned_array((self.max_steps, ALIGN // 4), np.float32)  # by step position
            self.control_scale_dev = mem.alloc(self.control_scale.array.nbytes)
        if self.img2img:
            self.init_image = mem.pinned_array(image_shape, np.uint8)
            self.init_image_dev = mem.alloc(self.init_image.array.nbytes)
            self.sample_noise = mem.pinned_array(lat_shape, np.float32)
            self.sample_noise_dev = mem.alloc(self.lat_bytes)
            self.latent_noise_dev = mem.alloc(self.lat_bytes)
            self.encoded = mem.alloc(self.lat_bytes)
        # prompt-embedding cache: `cache_size` slots of every embedding
        self.slots = [{k: mem.alloc(v.nbytes) for k, v in self.embeddings.items()} for _ in range(cache_size)]
        # plan constants: the fixed slots the contexts read, and one row per plan in the same layout
        self.row_bytes = ALIGN * (2 * self.max_steps + 1)
        self.constants = mem.alloc(self.row_bytes)
        plans = all_plans(bundle.manifest["scheduler"])
        self.plan_table = mem.pinned_array((len(plans), self.row_bytes // 4), np.float32)
        self.plan_table_dev = mem.alloc(self.plan_table.array.nbytes)
        self.plan_rows: dict[tuple[str, int, int], int] = {}
        for row, plan in enumerate(plans):
            self.plan_table.array[row] = plan_row(plan, self.max_steps)
            self.plan_rows[plan.key] = row

    # -- fixed addresses ----------------------------------------------------------------------------------
    def timestep(self, position: int) -> int:
        return int(self.constants.ptr) + ALIGN * 2 * position

    def coeffs(self, position: int) -> int:
        return int(self.constants.ptr) + ALIGN * (2 * position + 1)

    @property
    def noise_sigma(self) -> int:
        return int(self.constants.ptr) + ALIGN * 2 * self.max_steps

    def contexts(self) -> list[tuple[str, str]]:
        """(context key, component) of every execution context: encoders, [VAE encoder], one UNet
        context per step position, VAE decoder."""
        keys = [(e, e) for e in self.encoders]
        if self.img2img:
            keys.append(("vae_encoder", "vae_encoder"))
        keys += [(unet_context(j), "unet") for j in range(self.max_steps)]
        keys.append(("vae_decoder", "vae_decoder"))
        return keys

    def bindings(self) -> dict[str, dict[str, int]]:
        """context key -> tensor -> device address, for every IO tensor of every context."""
        out: dict[str, dict[str, int]] = {}
        for encoder in self.encoders:
            out[encoder] = {"input_ids": self.ids_dev[encoder].ptr}
            for enc, output, unet_input in EMBEDDING_FEEDS[self.family]:
                if enc == encoder:
                    out[encoder][output] = self.embeddings[unet_input].ptr
        if self.img2img:
            out["vae_encoder"] = {"image": self.init_image_dev.ptr, "sample_noise": self.sample_noise_dev.ptr,
                                  "latent_noise": self.latent_noise_dev.ptr, "noise_sigma": self.noise_sigma,
                                  "latents": self.encoded.ptr}
        for j in range(self.max_steps):
            step_noise = self.step_noise_dev.ptr + j * self.lat_bytes if self.ancestral else self.zeros.ptr
            out[unet_context(j)] = {
                "latents": self.latents[j + 1].ptr, "next_latents": self.latents[j].ptr,
                "timestep": self.timestep(j), "step_coeffs": self.coeffs(j), "step_noise": step_noise,
                **{name: buffer.ptr for name, buffer in self.embeddings.items()},
            }
            if self.controlnets:
                out[unet_context(j)].update(control_image=self.control_image_dev.ptr,
                                            control_scale=self.control_scale_dev.ptr + j * ALIGN)
        out["vae_decoder"] = {"latents": self.latents[0].ptr, "image": self.image_dev.ptr,
                              "nonfinite": self.nonfinite_dev.ptr}
        return out

    # -- per image ----------------------------------------------------------------------------------------
    def fill(self, ids: dict[str, np.ndarray], noise: Any, image: np.ndarray | None, runs: int,
             control: Any = None) -> None:
        """Copy one call's inputs into the pinned host buffers the program uploads (`control`: a
        runner.inputs.Control; None on a ControlNet bundle: black images at scale 0)."""
        if self.controlnets:
            self.control_scale.array[...] = 0.0
            if control is None:
                self.control_image.array[...] = 0
            else:  # forward step k's scales go to position runs-1-k
                self.control_image.array[...] = control.images
                for k in range(runs):
                    self.control_scale.array[runs - 1 - k, :self.controlnets] = control.scales[k]
        for encoder, array in ids.items():
            self.ids[encoder].array[...] = array
        self.noise.array[...] = noise.latents
        if image is not None:
            self.init_image.array[...] = image
            self.sample_noise.array[...] = noise.sample
        if self.ancestral:  # forward step k runs at position runs-1-k; no step noise given: zeros
            for k in range(runs):
                self.step_noise.array[runs - 1 - k] = noise.steps[k] if noise.steps else 0.0

    def program(self, plan: Plan, with_encoders: bool) -> list[Op]:
        """The copies and enqueues of one image, in stream order."""
        row = self.plan_rows[plan.key]
        runs = plan.runs
        ops = [Op("d2d", self.constants.ptr, self.plan_table_dev.ptr + row * self.row_bytes, self.row_bytes)]
        if with_encoders:
            ops += [Op("h2d", self.ids_dev[e].ptr, self.ids[e].ptr, self.ids[e].array.nbytes) for e in self.encoders]
        if plan.mode == "img2img":
            ops += [Op("h2d", self.init_image_dev.ptr, self.init_image.ptr, self.init_image.array.nbytes),
                    Op("h2d", self.sample_noise_dev.ptr, self.sample_noise.ptr, self.lat_bytes),
                    Op("h2d", self.latent_noise_dev.ptr, self.noise.ptr, self.lat_bytes)]
        else:
            ops.append(Op("h2d", self.latents[runs].ptr, self.noise.ptr, self.lat_bytes))
        if self.ancestral:
            ops.append(Op("h2d", self.step_noise_dev.ptr, self.step_noise.ptr, self.lat_bytes * runs))
        if self.controlnets:
            ops += [Op("h2d", self.control_image_dev.ptr, self.control_image.ptr, self.control_image.array.nbytes),
                    Op("h2d", self.control_scale_dev.ptr, self.control_scale.ptr, ALIGN * runs)]
        ops.append(Op("mark", name="upload"))
        if with_encoders:
            ops += [op for e in self.encoders for op in (Op("enqueue", name=e), Op("mark", name=e))]
        if plan.mode == "img2img":
            ops += [Op("enqueue", name="vae_encoder"),
                    Op("d2d", self.latents[runs].ptr, self.encoded.ptr, self.lat_bytes),
                    Op("mark", name="vae_encoder")]
        for k in range(runs):
            ops += [Op("enqueue", name=unet_context(runs - 1 - k)), Op("mark", name=f"unet[{k}]")]
        ops += [Op("enqueue", name="vae_decoder"), Op("mark", name="vae_decoder"),
                Op("d2h", self.image.ptr, self.image_dev.ptr, self.image.array.nbytes),
                Op("d2h", self.nonfinite.ptr, self.nonfinite_dev.ptr, 4),
                Op("mark", name="download")]
        return ops

    def cache_copies(self, slot: int, store: bool) -> list[Op]:
        """d2d copies between the live embeddings and cache slot `slot` (store: live -> slot)."""
        return [Op("d2d", self.slots[slot][name].ptr, buffer.ptr, buffer.nbytes) if store
                else Op("d2d", buffer.ptr, self.slots[slot][name].ptr, buffer.nbytes)
                for name, buffer in self.embeddings.items()]


def plan_row(plan: Plan, max_steps: int) -> np.ndarray:
    """One plan's constants as float32 in the layout of the fixed slots: position j = runs-1-k holds
    forward step k's timestep (slot 2j) and coefficients (slot 2j+1); the last slot holds noise sigma."""
    words = ALIGN // 4
    row = np.zeros((2 * max_steps + 1) * words, np.float32)
    for k in range(plan.runs):
        j = plan.runs - 1 - k
        row[2 * j * words] = plan.timesteps[k]
        row[(2 * j + 1) * words:(2 * j + 1) * words + 4] = plan.coeffs[k]
    row[2 * max_steps * words] = plan.noise_sigma
    return row
