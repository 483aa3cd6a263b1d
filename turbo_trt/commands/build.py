"""`turbo-trt build`: export, validate and compile a bundle."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import TurboTrtError
from .common import ALIASES_HELP, HelpFormatter, defaults, lora_arguments


def add(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    from ..builder.engine import EngineOptions
    from ..builder.options import BuildOptions

    d = {**defaults(BuildOptions), **defaults(EngineOptions)}

    p = sub.add_parser(
        "build",
        help="export, validate and compile a model into an engine bundle",
        description=(
            "Export each subnetwork of an SD-Turbo / SDXL-Turbo pipeline to static-shape FP16 ONNX, validate "
            "it against PyTorch FP32 with ONNX Runtime, compile a TensorRT engine per subnetwork and write "
            "engines/<slug>/manifest.json. A second run with nothing changed rebuilds nothing."
        ),
        formatter_class=HelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help=f"{ALIASES_HELP}, a hub id (owner/name) or a local diffusers pipeline directory")
    p.add_argument("--revision", default=None, help="hub revision (branch, tag or commit) of a hub model")
    p.add_argument("--random-weights", action="store_true",
                   help="full-size architecture of sd-turbo/sdxl-turbo from configs shipped with turbo-trt, "
                        "random weights, no download (for speed work offline)")
    p.add_argument("--out", type=Path, default=None, help="bundle directory (default: engines/<slug>)")
    p.add_argument("--batch", type=int, default=d["batch"], help="static batch size")
    p.add_argument("--height", type=int, default=None,
                   help=f"image height in pixels (default: {d['height']}; the tiny presets: 64, the size they were "
                        "trained at)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: as --height)")
    p.add_argument("--flavor", choices=["tensorrt", "tensorrt-rtx"], default=None,
                   help="engine flavor (default: the first installed of tensorrt, tensorrt-rtx)")
    p.add_argument("--onnx-only", action="store_true", help="stop after ONNX export and validation")
    p.add_argument("--force", action="store_true", help="rebuild everything, even what is up to date")
    p.add_argument("--no-img2img", dest="img2img", action="store_false",
                   help="skip the VAE encoder (the bundle then does txt2img only)")
    p.add_argument("--opt-level", type=int, default=d["optimization_level"],
                   help="TensorRT builder optimization level 0..5")
    p.add_argument("--workspace", type=float, default=d["workspace_gib"],
                   help="TensorRT workspace limit in GiB (default: TensorRT's own)")
    p.add_argument("--targets", default=None,
                   help="tensorrt-rtx only: comma-separated compute capabilities to build for (7.5, 8.0, 8.6, 8.9, "
                        "12.0, 12.1, or 'current' for the local GPU); default: TensorRT-RTX's portable engine for "
                        "Ampere and later (8.0+)")
    p.add_argument("--vae", default=None, metavar="tiny|ID|DIR",
                   help="VAE in place of the pipeline's: 'tiny' (TAESD: madebyollin/taesd or taesdxl; offline with "
                        "the tiny presets and --random-weights), or any AutoencoderKL / AutoencoderTiny as a hub id "
                        "(e.g. madebyollin/sdxl-vae-fp16-fix) or a local save_pretrained directory. Changing it "
                        "rebuilds only the VAE components")
    p.add_argument("--vae-fp32", action="store_true",
                   help="export the VAE in FP32 whatever its config says (the fix when its FP16 graph fails "
                        "validation)")
    p.add_argument("--min-cosine", type=float, default=d["min_cosine"],
                   help="fail validation when an output's cosine similarity to PyTorch FP32 (values centred "
                        "on the reference's mean) is lower; per-component relative-error limits apply too")
    p.add_argument("--lora", action="append", default=[], metavar="PATH_OR_ID[:SCALE]",
                   help="fuse a LoRA (.safetensors, diffusers/PEFT or kohya keys; a local file or hub id "
                        "owner/name[/file.safetensors]) into the weights before export, scale default 1.0; "
                        "repeatable. A changed LoRA or scale rebuilds only the parts it touches")
    p.add_argument("--controlnet", action="append", default=[], metavar="ID_OR_DIR",
                   help="fuse a diffusers ControlNetModel into the UNet engine (a hub id, a local save_pretrained "
                        "directory, or 'random': the UNet's architecture with seeded random weights, offline with "
                        "--random-weights and the tiny presets); repeatable, in the order `generate "
                        "--control-image` takes the images. The UNet then reads a control image and a scale per "
                        "net. Changing the nets rebuilds only the UNet")
    p.add_argument("--refittable", action="store_true",
                   help="build engines whose weights can be refitted, and record the graph weight map, so "
                        "LoRAs can be swapped at run time (`generate --lora`, `pipe.set_loras`)")
    p.add_argument("-q", "--quiet", action="store_true", help="print only the result")


def run(args: argparse.Namespace) -> int:
    from ..progress import Progress

    try:
        from ..builder.build import build
        from ..builder.engine import EngineOptions
        from ..builder.options import BuildOptions, default_size
    except ImportError as exc:
        raise TurboTrtError(
            f"the build stage needs the 'build' extra ({exc.name} is missing): pip install 'turbo-trt[build]'"
        ) from exc
    size = default_size(args.model)
    targets = tuple(t.strip() for t in args.targets.split(",") if t.strip()) if args.targets else ()
    opts = BuildOptions(
        model=args.model, revision=args.revision, random_weights=args.random_weights, out=args.out,
        batch=args.batch, height=size if args.height is None else args.height,
        width=size if args.width is None else args.width, flavor=args.flavor, onnx_only=args.onnx_only,
        force=args.force, img2img=args.img2img, min_cosine=args.min_cosine, vae=args.vae, vae_fp32=args.vae_fp32,
        engine=EngineOptions(optimization_level=args.opt_level, workspace_gib=args.workspace, targets=targets,
                             refittable=args.refittable),
        loras=tuple(lora_arguments(args.lora)), controlnets=tuple(args.controlnet),
    )
    report = build(opts, Progress(enabled=not args.quiet))
    if report.up_to_date:
        print(f"{report.bundle}: up to date")
    else:
        done = ", ".join(report.exported) or "none"
        engines = ", ".join(report.engines_built) or ("none (--onnx-only)" if opts.onnx_only else "none")
        print(f"{report.bundle}: exported {done}; engines built: {engines} ({report.seconds:.1f} s)")
    return 0
