"""FLOPs per image per step of a UNet with 0..n ControlNets, at full size, without exporting anything.

    python -m turbo_trt.benchmarks.controlnet_flops --model sd-turbo --nets 2 --out benchmarks/results/NAME

torch's FlopCounterMode on the meta device (no weights, no memory): the UNet, then each net
(`ControlNetModel.from_unet`, the architecture of `--controlnet random` and of the SD 2.1 nets) plus the UNet
with their residuals. The same counting on the tiny preset gives exactly the figures counted from its exported
ONNX graphs (benchmarks/flops.py; see controlnet-tiny-sd-turbo-cpu.md), so it stands in for a graph count where
a full-size export is too slow for the machine at hand.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .environment import environment


def flops(model: str, nets: int, height: int, width: int) -> list[dict[str, Any]]:
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode

    from turbo_trt.builder.presets import preset_spec, shipped_spec
    from turbo_trt.builder.sources import ALIASES

    spec = preset_spec(model) if model.startswith("tiny-") else shipped_spec(ALIASES.get(model, model))
    config = spec.config("unet")
    if spec.family != "sd":
        raise SystemExit("only the SD family is counted here (SDXL's added conditioning needs its text embeds)")
    rows = []
    with torch.device("meta"), torch.no_grad():
        unet = UNet2DConditionModel.from_config(config).half()
        controlnets = [ControlNetModel.from_unet(unet, load_weights_from_unet=False).half() for _ in range(nets)]
        x = torch.empty(1, int(config["in_channels"]), height // 8, width // 8, dtype=torch.half)
        t = torch.tensor([999.0])
        context = torch.empty(1, 77, int(config["cross_attention_dim"]), dtype=torch.half)
        condition = torch.empty(1, 3, height, width, dtype=torch.half)
        for n in range(nets + 1):
            with FlopCounterMode(display=False) as counter:
                down = mid = None
                for net in controlnets[:n]:
                    d, m = net(x, t, encoder_hidden_states=context, controlnet_cond=condition, return_dict=False)
                    down = list(d) if down is None else [a + b for a, b in zip(down, d)]
                    mid = m if mid is None else mid + m
                unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                     mid_block_additional_residual=mid)
            rows.append({"nets": n, "flops": counter.get_total_flops(),
                         "net_params": sum(p.numel() for p in controlnets[0].parameters()) if nets else 0})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sd-turbo")
    parser.add_argument("--nets", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix")
    args = parser.parse_args(argv)
    rows = flops(args.model, args.nets, args.size, args.size)
    env = environment()
    base = rows[0]["flops"]
    lines = [f"# {args.model}: UNet FLOPs per image per step with 0..{args.nets} ControlNets ({args.size}x{args.size})",
             "", f"- machine: {env['machine']['cpu']}, {env['machine']['cores']} cores; GPU: {env['gpu'] or 'none'}",
             f"- versions: torch {env['versions'].get('torch')}, diffusers {env['versions'].get('diffusers')}",
             f"- commit: {env['commit']}", "",
             "torch FlopCounterMode on the meta device (see benchmarks/controlnet_flops.py; on the tiny preset it "
             "equals the count from the exported graphs).", "",
             "| nets | TFLOP / image / step | vs plain UNet |", "|---|---|---|"]
    lines += [f"| {r['nets']} | {r['flops'] / 1e12:.4f} | +{100 * (r['flops'] / base - 1):.1f} % |" for r in rows]
    if args.nets:
        lines += ["", f"One net has {rows[0]['net_params'] / 1e6:.1f} M parameters ({rows[0]['net_params'] * 2 / 2**20:.0f} MiB "
                  "in FP16), the UNet's encoder half plus its zero convolutions and the conditioning embedding."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1) + "\n")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
