"""Train the tiny presets on the shapes language: ``python -m turbo_trt.builder.train_tiny --family sd|sdxl``.

The method (seeded; every number below is recorded in ``training.json``):

1. **Data.** Every training scene of the language (:func:`shape_prompts.training_scenes`, the held-back
   split excluded) drawn once at the preset's size; each step samples scenes and, for a centred shape,
   one of its phrasings.
2. **VAE.** The preset's ``AutoencoderKL`` starts from its seeded initialization and is fitted on the
   images as a plain autoencoder: L1 plus squared error of the reconstruction from the posterior mean, the
   pixels of the shape weighted ``1 + shape_weight`` (:func:`image_loss`; a small shape is 5 % of the
   image, and the corners that tell a square from a circle are a fraction of that).
   Then an exact re-parameterization (the ``quant_conv`` mean rows and ``post_quant_conv`` input
   columns) centres the posterior means per channel and scales them so that ``scaling_factor``
   latents have unit variance, as a diffusion model expects (the decoder's function is unchanged), and
   the posterior's spread is set to a constant :data:`POSTERIOR_STD` (img2img samples from it).
3. **Text encoder(s) and UNet**, as a few-step generator with the Turbo scheduler's conventions
   (``EulerDiscreteScheduler`` / ``EulerAncestralDiscreteScheduler``, trailing spacing; the tiny presets
   predict v, see ``presets._tiny_scheduler``; epsilon works too): for each sample a timestep is drawn
   from the trailing timesteps that 1 to 4 steps use (their union also holds every img2img entry
   timestep), half of the draws at the first (999), which alone makes a 1-step image.
   ``x_t = x0 + sigma * noise`` (the Euler forward process), the UNet sees ``x_t / sqrt(sigma^2 + 1)``
   and the pipeline's prompt embeddings (SDXL: both encoders' penultimate states, pooled text embeds and
   the size's ``add_time_ids``), and the loss is the squared error of the clean latent its output
   implies under the scheduler's prediction type (v: ``x0_hat = x_t / (sigma^2 + 1) - sigma /
   sqrt(sigma^2 + 1) * v_hat``) against the scene's latent, the latent cells the shape touches weighted
   ``1 + latent_shape_weight`` (as in the VAE: the shape class lives in a few cells). Since each prompt has exactly one image, a
   good ``x0_hat`` at 999 is the whole 1-step image; at the later timesteps the same regression keeps
   2-4 steps and img2img on the data.

Writes ``save_pretrained`` directories (safetensors) for every part and ``training.json`` (settings,
losses, seconds, versions, sha256 of every file) into ``--out`` (default: the package's shipped
weights, which the presets load). A run writes into a temporary directory first and swaps it in whole.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np

from turbo_trt.progress import Progress

from . import shape_prompts
from .presets import PRESET_FAMILIES, WEIGHTS_DIR, build_part, preset_spec
from .tiny_tokenizer import write_tiny_clip_tokenizer

#: Standard deviation of the VAE posterior in scaled-latent units (the latents have unit variance).
POSTERIOR_STD = 0.01


@dataclass(frozen=True)
class TrainSettings:
    family: str
    seed: int = 0
    size: int = 64
    vae_steps: int = 1500  # the defaults are the settings of the shipped weights (both families)
    vae_batch: int = 16
    vae_lr: float = 3e-3
    shape_weight: float = 8.0  # VAE loss: extra weight of the pixels that differ from the background
    unet_steps: int = 2000
    unet_batch: int = 32
    unet_lr: float = 2e-3
    text_encoder_lr: float = 5e-4
    latent_shape_weight: float = 8.0  # UNet loss: extra weight of the latent cells the shape touches
    first_timestep_share: float = 0.5  # share of draws at the first trailing timestep (the 1-step one)
    warmup_steps: int = 100
    grad_clip: float = 1.0
    threads: int = 1
    eval_prompts: int = 120  # held-back prompts scored with the diffusers pipeline at the end
    max_scenes: int | None = None  # train on the first N training scenes only (smoke tests); None: all
    vae_from: str | None = None  # start the VAE from a trained one (the families share its architecture)


@dataclass
class Batch:
    images: Any  # (B, 3, H, W) float in [-1, 1]
    latents: Any  # (B, 4, h, w) scaled latents
    ids: dict[str, Any]  # tokenizer part -> (B, 77) int64


class ShapesData:
    """Training scenes, their images and the token ids of every phrasing (fixed per run)."""

    def __init__(self, family: str, size: int, max_scenes: int | None = None) -> None:
        import torch
        from transformers import CLIPTokenizer

        self.scenes = shape_prompts.training_scenes()[:max_scenes]
        images = np.stack([shape_prompts.render(s, size) for s in self.scenes])
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        spec = preset_spec(f"tiny-{family}-turbo", trained=False)
        phrasings = [s.phrasings() for s in self.scenes]
        self.phrasing_index = [(i, j) for i, p in enumerate(phrasings) for j in range(len(p))]
        flat = [p for ps in phrasings for p in ps]
        self.ids: dict[str, Any] = {}
        import tempfile

        with tempfile.TemporaryDirectory(prefix="turbo-trt-tok-") as tmp:
            for part, pad in spec.pad_tokens.items():
                write_tiny_clip_tokenizer(Path(tmp) / part, pad)
                tok = CLIPTokenizer.from_pretrained(Path(tmp) / part)
                enc = tok(flat, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt")
                self.ids[part] = enc.input_ids
        self.first_phrasing = torch.tensor([k for k, (i, j) in enumerate(self.phrasing_index) if j == 0])
        self.scene_of_phrasing = torch.tensor([i for i, _ in self.phrasing_index])
        self.latents: Any = None

    def sample(self, generator: Any, batch: int) -> Batch:
        import torch

        rows = torch.randint(len(self.phrasing_index), (batch,), generator=generator)
        scenes = self.scene_of_phrasing[rows]
        latents = None if self.latents is None else self.latents[scenes]
        return Batch(self.images[scenes], latents, {k: v[rows] for k, v in self.ids.items()})


def _lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


def train_vae(vae: Any, data: ShapesData, s: TrainSettings, progress: Progress, generator: Any) -> dict[str, Any]:
    import torch

    vae.train()
    opt = torch.optim.Adam(vae.parameters(), lr=s.vae_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _lr_factor(k, s.vae_steps, s.warmup_steps))
    start, losses = time.monotonic(), []
    for step in range(s.vae_steps):
        batch = data.sample(generator, s.vae_batch)
        recon = vae.decode(vae.encode(batch.images).latent_dist.mean).sample
        mse = torch.nn.functional.mse_loss(recon, batch.images)
        loss = image_loss(recon, batch.images, s.shape_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), s.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(mse.detach()))
        _report(progress, "vae", step, s.vae_steps, start, losses)
    vae.eval()
    return {"final_mse": float(np.mean(losses[-50:])), "seconds": round(time.monotonic() - start, 1)}


def shape_mask(images: Any) -> Any:
    """(B, 1, H, W): 1 where a pixel's colour differs from the image's background (its top-left pixel,
    which no shape of the language reaches: the margin is 6 % of the side) by more than 0.05 summed over
    the channels in [-1, 1] units (6 levels; only the faintest anti-aliased edge pixels fall under), 0
    elsewhere."""
    return ((images - images[:, :, :1, :1]).abs().sum(dim=1, keepdim=True) > 0.05).float()


def latent_weights(images: Any, latent_size: tuple[int, int], weight: float) -> Any:
    """(B, 1, h, w) weights of the UNet's latent loss: ``1 + weight`` on the latent cells that hold a pixel
    of the shape, 1 elsewhere."""
    import torch

    return 1.0 + weight * torch.nn.functional.adaptive_max_pool2d(shape_mask(images), latent_size)


def image_loss(recon: Any, images: Any, shape_weight: float) -> Any:
    """L1 plus squared error per pixel, the shape's pixels weighted ``1 + shape_weight``: a small shape
    covers 5 % of the image, and without the weight its corners (square against circle) cost next to
    nothing."""
    diff = recon - images
    weight = 1.0 + shape_weight * shape_mask(images)
    return (weight * (diff.abs() + diff**2)).mean()


def normalize_latents(vae: Any, images: Any) -> dict[str, Any]:
    """Centre and scale the posterior means (exactly, see the module docstring); returns what was done."""
    import torch

    with torch.no_grad():
        means = torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean for i in range(0, len(images), 256)])
        centre = means.mean(dim=(0, 2, 3))
        k = 1.0 / (float((means - centre[None, :, None, None]).std()) * vae.config.scaling_factor)
        c = vae.config.latent_channels
        qw, qb = vae.quant_conv.weight, vae.quant_conv.bias  # (2c, 2c, 1, 1): rows 0..c-1 mean, c..2c-1 logvar
        qw[:c] *= k
        qb[:c] = (qb[:c] - centre) * k
        # The posterior's spread: a constant, small against the unit-variance scaled latents.
        qw[c:] = 0.0
        qb[c:] = 2 * math.log(POSTERIOR_STD / vae.config.scaling_factor)
        pw, pb = vae.post_quant_conv.weight, vae.post_quant_conv.bias  # z -> pw @ z + pb
        pb += (pw[:, :, 0, 0] @ centre)
        pw /= k
    return {"latent_scale": k, "latent_centre": [float(v) for v in centre], "posterior_std": POSTERIOR_STD}


def encode_all(vae: Any, images: Any) -> Any:
    import torch

    with torch.no_grad():
        return torch.cat([vae.encode(images[i:i + 256]).latent_dist.mean
                          for i in range(0, len(images), 256)]) * vae.config.scaling_factor


class Conditioner:
    """The pipeline's prompt embeddings from token ids, differentiable (mirrors diffusers' encode_prompt)."""

    def __init__(self, family: str, encoders: dict[str, Any], size: int) -> None:
        import torch

        self.family, self.encoders = family, encoders
        self.time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)

    def __call__(self, ids: dict[str, Any]) -> tuple[Any, dict[str, Any] | None]:
        import torch

        if self.family == "sd":
            return self.encoders["text_encoder"](ids["tokenizer"])[0], None
        out1 = self.encoders["text_encoder"](ids["tokenizer"], output_hidden_states=True)
        out2 = self.encoders["text_encoder_2"](ids["tokenizer_2"], output_hidden_states=True)
        embeds = torch.cat([out1.hidden_states[-2], out2.hidden_states[-2]], dim=-1)
        pooled = out2[0]
        return embeds, {"text_embeds": pooled, "time_ids": self.time_ids.repeat(len(pooled), 1)}


def trailing_table(scheduler: Any) -> tuple[list[int], dict[int, float]]:
    """The timesteps 1..4 trailing steps use (union, first = 999) and each one's sigma, from the scheduler."""
    sigmas: dict[int, float] = {}
    for n in range(1, 5):
        scheduler.set_timesteps(n)
        for t, sigma in zip(scheduler.timesteps.tolist(), scheduler.sigmas.tolist()):
            sigmas[int(round(t))] = float(sigma)
    return sorted(sigmas, reverse=True), sigmas


def train_generator(unet: Any, cond: Conditioner, scheduler: Any, data: ShapesData, s: TrainSettings,
                    progress: Progress, generator: Any) -> dict[str, Any]:
    import torch

    if scheduler.config.prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"unsupported prediction_type {scheduler.config.prediction_type!r}")
    timesteps, sigmas = trailing_table(scheduler)
    weights = torch.tensor([s.first_timestep_share] + [(1 - s.first_timestep_share) / (len(timesteps) - 1)]
                           * (len(timesteps) - 1))
    t_all = torch.tensor(timesteps, dtype=torch.float32)
    sigma_all = torch.tensor([sigmas[t] for t in timesteps])
    params = [{"params": unet.parameters(), "lr": s.unet_lr}] + [
        {"params": enc.parameters(), "lr": s.text_encoder_lr} for enc in cond.encoders.values()]
    opt = torch.optim.AdamW(params, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda k: _lr_factor(k, s.unet_steps, s.warmup_steps))
    for m in (unet, *cond.encoders.values()):
        m.train()
    all_params = [p for g in params for p in g["params"]]
    start, losses, first_losses = time.monotonic(), [], []
    for step in range(s.unet_steps):
        batch = data.sample(generator, s.unet_batch)
        pick = torch.multinomial(weights, s.unet_batch, replacement=True, generator=generator)
        t, sigma = t_all[pick], sigma_all[pick][:, None, None, None]
        x0 = batch.latents
        noise = torch.randn(x0.shape, generator=generator)
        x_t = x0 + sigma * noise
        c_in = 1 / torch.sqrt(sigma**2 + 1)
        embeds, added = cond(batch.ids)
        out = unet(x_t * c_in, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample
        if scheduler.config.prediction_type == "epsilon":
            x0_hat = x_t - sigma * out
        else:  # v-prediction in the Euler parameterization (diffusers' EulerDiscreteScheduler)
            x0_hat = out * (-sigma / torch.sqrt(sigma**2 + 1)) + x_t / (sigma**2 + 1)
        cell_weights = latent_weights(batch.images, tuple(x0.shape[-2:]), s.latent_shape_weight)
        per_sample = (cell_weights * (x0_hat - x0) ** 2).mean(dim=(1, 2, 3))
        loss = per_sample.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(all_params, s.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        first = per_sample[pick == 0]
        if len(first):
            first_losses.append(float(first.detach().mean()))
        _report(progress, "unet+text", step, s.unet_steps, start, losses)
    for m in (unet, *cond.encoders.values()):
        m.eval()
    return {"final_x0_mse": float(np.mean(losses[-50:])), "final_x0_mse_t999": float(np.mean(first_losses[-50:])),
            "timesteps": timesteps, "sigmas": [sigmas[t] for t in timesteps],
            "seconds": round(time.monotonic() - start, 1)}


def _report(progress: Progress, label: str, step: int, total: int, start: float, losses: list[float]) -> None:
    done = step + 1
    rate = done / max(time.monotonic() - start, 1e-9)
    detail = f"loss {np.mean(losses[-20:]):.4f} {rate:.2f} it/s eta {(total - done) / rate:.0f} s"
    progress.bar(label, done, total, detail)
    if not progress.tty and (done % max(1, total // 20) == 0 or done == total):
        progress.info(f"{label} {done}/{total} {detail}")


def evaluate(spec: Any, size: int, count: int, steps_list: tuple[int, ...] = (1, 2, 4)) -> dict[str, Any]:
    """The image-only score of the diffusers pipeline built from ``spec`` on the first ``count`` held-back
    scenes, per step count (seed = the scene's index)."""
    import torch

    from . import prompt_score
    from .sources import _assemble, import_diffusers_quietly

    import_diffusers_quietly()
    pipe = _assemble(spec, torch.float32)
    pipe.set_progress_bar_config(disable=True)
    scenes = shape_prompts.heldback_scenes(count)
    out: dict[str, Any] = {}
    for steps in steps_list:
        rows = []
        for i, scene in enumerate(scenes):
            image = pipe(scene.prompt(), num_inference_steps=steps, guidance_scale=0.0, height=size, width=size,
                         generator=torch.Generator().manual_seed(i), output_type="np").images[0]
            rows.append(prompt_score.score((image * 255).round().astype(np.uint8), scene))
        out[str(steps)] = prompt_score.summarize(rows)
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def train(s: TrainSettings, out: Path, progress: Progress) -> dict[str, Any]:
    """Train one family's preset and write it to ``out`` (replaced whole at the end)."""
    import torch

    from .presets import build_scheduler

    torch.set_num_threads(s.threads)
    name = f"tiny-{s.family}-turbo"
    spec = preset_spec(name, trained=False)
    total_start = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(s.seed)
        generator = torch.Generator().manual_seed(s.seed)
        scenes = len(shape_prompts.training_scenes()[:s.max_scenes])
        progress.info(f"{name}: rendering {scenes} training scenes at {s.size}x{s.size}")
        data = ShapesData(s.family, s.size, s.max_scenes)
        models = {p: build_part(spec, p) for p in ("vae", "unet", "text_encoder", "text_encoder_2") if p in spec.configs}
        if s.vae_from is not None:
            from .presets import _load_trained

            _load_trained(models["vae"], Path(s.vae_from))
        vae_record = train_vae(models["vae"], data, s, progress, generator) if s.vae_steps else {}
        vae_record.update(normalize_latents(models["vae"], data.images))
        data.latents = encode_all(models["vae"], data.images)
        vae_record["latent_std"] = float(data.latents.std())
        for p in models["vae"].parameters():
            p.requires_grad_(False)
        encoders: dict[str, Any] = {p: m for p, m in models.items() if p.startswith("text_encoder")}
        cond = Conditioner(s.family, encoders, s.size)
        gen_record = train_generator(models["unet"], cond, build_scheduler(spec), data, s, progress, generator)
    out = Path(out)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for part, model in models.items():  # FP16 files: half the bytes; the presets load them into FP32 models
        model.to(torch.float16).save_pretrained(tmp / part, safe_serialization=True)
    files = {str(p.relative_to(tmp)): _sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
    progress.info(f"{name}: scoring the held-back prompts with the diffusers pipeline")
    evaluation = evaluate(dataclasses.replace(spec, weights=tmp), s.size, s.eval_prompts)
    total_bytes = sum((tmp / f).stat().st_size for f in files)
    size_mb = total_bytes / 1e6
    record = {
        "preset": name, "settings": asdict(s), "language": shape_prompts.describe(),
        "training_scenes": len(data.scenes), "vae": vae_record, "generator": gen_record,
        "heldback_score_diffusers": evaluation,
        "seconds": round(time.monotonic() - total_start, 1),
        "versions": {p: metadata.version(p) for p in ("torch", "diffusers", "transformers")},
        "files": files, "bytes": total_bytes,
    }
    (tmp / "training.json").write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    old = out.with_name(f".{out.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    progress.info(f"{name}: wrote {out} ({size_mb:.2f} MB, {record['seconds']:.0f} s)")
    return record


def main(argv: list[str] | None = None) -> int:
    defaults = TrainSettings(family="sd")
    p = argparse.ArgumentParser(prog="python -m turbo_trt.builder.train_tiny", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--family", choices=PRESET_FAMILIES, required=True, help="which tiny preset to train")
    p.add_argument("--out", type=Path, default=None,
                   help="output directory (default: the shipped weights, builder/tiny_weights/tiny-<family>-turbo)")
    for field in ("seed", "vae_steps", "vae_batch", "unet_steps", "unet_batch", "threads", "eval_prompts"):
        p.add_argument("--" + field.replace("_", "-"), type=int, default=getattr(defaults, field))
    for field in ("vae_lr", "unet_lr", "text_encoder_lr", "shape_weight", "latent_shape_weight"):
        p.add_argument("--" + field.replace("_", "-"), type=float, default=getattr(defaults, field))
    p.add_argument("--vae-from", default=None, metavar="DIR",
                   help="start the VAE from a trained one (a save_pretrained folder, e.g. the other family's "
                        "tiny_weights/<preset>/vae: both families share its architecture); with --vae-steps 0 "
                        "it is only re-normalized for this family's scaling_factor")
    p.add_argument("--max-scenes", type=int, default=None, help="train on the first N training scenes only (for a "
                   "quick end-to-end check); default: all")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    args = p.parse_args(argv)
    if args.vae_steps < 0:
        p.error("--vae-steps must be at least 0")
    for field in ("unet_steps", "vae_batch", "unet_batch", "threads"):
        if getattr(args, field) < 1:
            p.error(f"--{field.replace('_', '-')} must be at least 1")
    settings = TrainSettings(
        family=args.family, seed=args.seed, vae_steps=args.vae_steps, vae_batch=args.vae_batch, vae_lr=args.vae_lr,
        unet_steps=args.unet_steps, unet_batch=args.unet_batch, unet_lr=args.unet_lr,
        text_encoder_lr=args.text_encoder_lr, shape_weight=args.shape_weight, latent_shape_weight=args.latent_shape_weight,
        threads=args.threads, eval_prompts=args.eval_prompts,
        max_scenes=args.max_scenes, vae_from=args.vae_from,
        warmup_steps=min(TrainSettings.warmup_steps, max(1, min(args.vae_steps or args.unet_steps, args.unet_steps) // 10)),
    )
    out = args.out or WEIGHTS_DIR / f"tiny-{args.family}-turbo"
    train(settings, out, Progress(enabled=not args.quiet))
    return 0


if __name__ == "__main__":
    sys.exit(main())
