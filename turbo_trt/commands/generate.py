"""`turbo-trt generate`: images from a built bundle."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from .common import EXECUTOR_HELP, HelpFormatter, executors, lora_arguments


def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "generate",
        help="generate an image from a built bundle",
        description="Run a bundle: text-to-image, or image-to-image with --image. Uses the TensorRT engines "
                    "on a GPU (CUDA graphs) or the ONNX graphs on the CPU with ONNX Runtime.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--engines", type=Path, required=True, help="bundle directory written by `turbo-trt build`")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt; repeat for several images, up to the bundle's batch")
    p.add_argument("--steps", type=int, default=1, help="inference steps (1..4)")
    p.add_argument("--seed", type=int, default=None, help="noise seed in [0, 2**63); default: random, printed")
    p.add_argument("--noise", type=Path, default=None,
                   help="standard-normal initial noise (.npy, shape (batch, 4, height/8, width/8)), used as "
                        "diffusers uses latents=")
    p.add_argument("--image", type=Path, default=None, help="init image for image-to-image")
    p.add_argument("--strength", type=float, default=0.5,
                   help="image-to-image strength in (0, 1]; int(steps * strength) must be >= 1")
    p.add_argument("--control-image", action="append", default=[], metavar="PATH[:SCALE]",
                   help="ControlNet bundles: the control image of one net and its scale (default 1.0); repeat once "
                        "per net, in the order the nets were built. Without it the nets are off (scale 0)")
    p.add_argument("--control-start", type=float, default=0.0,
                   help="fraction of the UNet runs after which the ControlNets start acting")
    p.add_argument("--control-end", type=float, default=1.0,
                   help="fraction of the UNet runs after which the ControlNets stop acting")
    p.add_argument("--executor", choices=executors(), default="auto", help=EXECUTOR_HELP)
    p.add_argument("--ignore-targets", action="store_true",
                   help="run TensorRT engines even on a GPU outside the compute capabilities they were built for")
    p.add_argument("--out", type=Path, required=True,
                   help="output PNG; with several prompts, NAME-0.png, NAME-1.png, ...")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA (.safetensors) at run time, scale default 1.0; repeatable; needs a bundle "
                        "built with --refittable")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from ..errors import InputError
    from ..runner.pipeline import TurboPipeline

    noise = None
    if args.noise is not None:
        try:
            noise = np.load(args.noise, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise InputError(f"--noise {args.noise}: not a readable .npy file ({exc})") from exc
    image = None
    if args.image is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(args.image)
            image.load()
        except (OSError, UnidentifiedImageError) as exc:
            raise InputError(f"--image {args.image}: not a readable image ({exc})") from exc
    controls = [control_argument(value) for value in args.control_image]
    if not controls and (args.control_start, args.control_end) != (0.0, 1.0):
        raise InputError("--control-start / --control-end need --control-image")
    if args.out.suffix.lower() != ".png":
        raise InputError(f"--out must name a .png file, got {args.out}")
    import secrets

    seed = secrets.randbelow(2**63) if args.seed is None else args.seed
    pipe = TurboPipeline.from_bundle(args.engines, executor=args.executor, strict_targets=not args.ignore_targets)
    print(pipe.executor_choice.describe(), file=sys.stderr)
    if hasattr(pipe.executor, "describe_memory"):
        print(pipe.executor.describe_memory(), file=sys.stderr)
    if args.lora:
        pipe.set_loras(dict(lora_arguments(args.lora)))
    control = {}
    if controls:
        control = {"control_image": [picture for picture, _ in controls],
                   "controlnet_conditioning_scale": [scale for _, scale in controls],
                   "control_guidance_start": args.control_start, "control_guidance_end": args.control_end}
    images = pipe(args.prompt, num_inference_steps=args.steps, seed=seed, noise=noise, image=image,
                  strength=args.strength, **control)
    from ..fsutil import atomic_path

    outs = [args.out] if len(images) == 1 else [args.out.with_name(f"{args.out.stem}-{i}.png") for i in range(len(images))]
    for picture, out in zip(images, outs):
        with atomic_path(out) as tmp:
            picture.save(tmp, format="PNG")
        print(f"{out} (seed {seed}, {pipe.executor.name})")
    return 0


def control_argument(value: str) -> tuple[Any, float]:
    """`PATH[:SCALE]` -> (the loaded image, scale); a path that itself holds ':' works when no scale follows."""
    from PIL import Image, UnidentifiedImageError

    from ..errors import InputError

    path, scale = value, 1.0
    head, sep, tail = value.rpartition(":")
    if sep and head:
        try:
            scale = float(tail)
            path = head
        except ValueError:
            pass
    try:
        picture = Image.open(path)
        picture.load()
    except (OSError, UnidentifiedImageError) as exc:
        raise InputError(f"--control-image {value}: not a readable image ({exc})") from exc
    return picture, scale
