"""The torch modules that get exported: each wraps a diffusers/transformers part together with the cheap
math around it, so that everything between token ids and uint8 pixels runs inside the engines.

Each wrapper takes its inputs in the dtypes the bundle declares (see specs.py), casts to the dtype of the
wrapped network, and returns outputs in the declared dtypes. The same wrapper, around an FP32 network,
is the reference the exported FP16 graph is validated against.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def _dtype_of(module: nn.Module) -> torch.dtype:
    return next(module.parameters()).dtype


class TextEncoderGraph(nn.Module):
    """int32 token ids -> the hidden states the pipeline feeds the UNet (and, for SDXL's second encoder,
    the projected pooled embedding).

    `hidden_layer`: "last" (SD: `last_hidden_state`, after the final layer norm) or "penultimate" (SDXL:
    `hidden_states[-2]`, as `StableDiffusionXLPipeline.encode_prompt` with clip_skip=None).
    """

    def __init__(self, encoder: Any, hidden_layer: str, pooled: bool) -> None:
        super().__init__()
        if hidden_layer not in ("last", "penultimate"):
            raise ValueError(hidden_layer)
        self.encoder: Any = encoder
        self.penultimate = hidden_layer == "penultimate"
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> Any:
        out = self.encoder(input_ids.to(torch.int64), output_hidden_states=self.penultimate, return_dict=True)
        hidden = out.hidden_states[-2] if self.penultimate else out.last_hidden_state
        hidden = hidden.to(torch.float16)
        if self.pooled:
            return hidden, out.text_embeds.to(torch.float16)
        return hidden


class UNetStepGraph(nn.Module):
    """One denoising step: UNet plus the Euler / Euler-ancestral update, in FP32 around the FP16 UNet.

    `step_coeffs` = (c_in, a, b, c): the UNet sees `c_in * latents` and the output is
    `a * latents + b * model_output + c * step_noise`. The runner derives the four numbers on the host from
    the manifest's sigma tables; they also absorb the initial-noise scale and both prediction types.
    SDXL: the two encoders' hidden states are concatenated here and add_time_ids are constants of the
    static shape (orig size = target size = (height, width), crop (0, 0)), as the pipeline builds them.
    """

    add_time_ids: torch.Tensor

    def __init__(self, unet: Any, add_time_ids: tuple[float, ...] | None) -> None:
        super().__init__()
        self.unet: Any = unet
        self.sdxl = add_time_ids is not None
        if add_time_ids is not None:
            self.register_buffer("add_time_ids", torch.tensor([add_time_ids], dtype=torch.float32), persistent=False)

    def forward(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        step_coeffs: torch.Tensor,
        step_noise: torch.Tensor,
        prompt_embeds: torch.Tensor,
        prompt_embeds_2: torch.Tensor | None = None,
        text_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        dtype = _dtype_of(self.unet)
        c_in, a, b, c = step_coeffs[0], step_coeffs[1], step_coeffs[2], step_coeffs[3]
        model_in = (latents * c_in).to(dtype)
        added: dict[str, torch.Tensor] | None = None
        context = prompt_embeds
        if self.sdxl:
            assert prompt_embeds_2 is not None and text_embeds is not None
            context = torch.cat([prompt_embeds, prompt_embeds_2], dim=-1)
            batch = latents.shape[0]
            # FP32 on purpose: the UNet concatenates text_embeds with its FP32 time-id embedding; eager torch
            # promotes that concat to FP32, but the dynamo exporter emits a mixed FP16/FP32 Concat that ONNX
            # Runtime rejects. Upcasting FP16 values is exact, so the math is unchanged.
            added = {
                "text_embeds": text_embeds.to(torch.float32),
                "time_ids": self.add_time_ids.to(dtype).expand(batch, -1),
            }
        out = self.unet(model_in, timestep, encoder_hidden_states=context.to(dtype),
                        added_cond_kwargs=added, return_dict=False)[0]
        return a * latents + b * out.to(torch.float32) + c * step_noise


class ControlledUNetStepGraph(nn.Module):
    """UNetStepGraph with ControlNets fused in: each net reads the step's UNet input, timestep and text
    conditioning plus its own conditioning image, and its residuals, times its scale, are summed over the
    nets and added to the UNet's skip connections, as diffusers' ControlNet pipelines (and
    MultiControlNetModel) do with guess_mode off and no CFG.

    `control_image` uint8 (n, B, H, W, 3) -> float [0, 1] NCHW: the pipelines' control image processor
    (`VaeImageProcessor(do_normalize=False)`) does exactly this at the static size (no [-1, 1] mapping); the
    nets' own `controlnet_conditioning_channel_order` (rgb / bgr) is applied inside their forward.
    `control_scale` fp32 (n): each net's scale for this step; the runner sends 0 for a net outside its
    control_guidance_start/end window (diffusers' controlnet_keep) and for a call without control images,
    which gives the plain UNet's prediction (0 * residual = 0 exactly). Two forward signatures, one per
    family, since the exporter reads the inputs positionally (`_SdForward`, `_SdxlForward`)."""

    add_time_ids: torch.Tensor
    #: The child whose weights LoRAs change (builder/lora_map.py): the UNet, not the nets.
    weight_part = "unet"

    def __init__(self, unet: Any, controlnets: list[Any], add_time_ids: tuple[float, ...] | None) -> None:
        super().__init__()
        self.unet: Any = unet
        self.controlnets = nn.ModuleList(controlnets)
        self.sdxl = add_time_ids is not None
        if add_time_ids is not None:
            self.register_buffer("add_time_ids", torch.tensor([add_time_ids], dtype=torch.float32), persistent=False)

    def _step(self, latents: torch.Tensor, timestep: torch.Tensor, step_coeffs: torch.Tensor,
              step_noise: torch.Tensor, prompt_embeds: torch.Tensor, prompt_embeds_2: torch.Tensor | None,
              text_embeds: torch.Tensor | None, control_image: torch.Tensor, control_scale: torch.Tensor) -> torch.Tensor:
        dtype = _dtype_of(self.unet)
        c_in, a, b, c = step_coeffs[0], step_coeffs[1], step_coeffs[2], step_coeffs[3]
        model_in = (latents * c_in).to(dtype)
        added: dict[str, torch.Tensor] | None = None
        context = prompt_embeds
        if self.sdxl:
            assert prompt_embeds_2 is not None and text_embeds is not None
            context = torch.cat([prompt_embeds, prompt_embeds_2], dim=-1)
            added = {  # as UNetStepGraph (FP32 text_embeds: see there)
                "text_embeds": text_embeds.to(torch.float32),
                "time_ids": self.add_time_ids.to(dtype).expand(latents.shape[0], -1),
            }
        context = context.to(dtype)
        # the cast comes first: TensorRT has no uint8 Transpose
        conditions = (control_image.to(torch.float32) / 255.0).permute(0, 1, 4, 2, 3)
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        for i, net in enumerate(self.controlnets):
            net_down, net_mid = net(model_in, timestep, encoder_hidden_states=context,
                                    controlnet_cond=conditions[i].to(dtype), conditioning_scale=control_scale[i].to(dtype),
                                    added_cond_kwargs=added, guess_mode=False, return_dict=False)
            if down is None or mid is None:
                down, mid = list(net_down), net_mid
            else:  # MultiControlNetModel: the residuals of all nets are summed
                down = [d + e for d, e in zip(down, net_down)]
                mid = mid + net_mid
        out = self.unet(model_in, timestep, encoder_hidden_states=context, added_cond_kwargs=added,
                        down_block_additional_residuals=down, mid_block_additional_residual=mid,
                        return_dict=False)[0]
        return a * latents + b * out.to(torch.float32) + c * step_noise


class _SdForward(ControlledUNetStepGraph):
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, step_coeffs: torch.Tensor,
                step_noise: torch.Tensor, prompt_embeds: torch.Tensor, control_image: torch.Tensor,
                control_scale: torch.Tensor) -> torch.Tensor:
        return self._step(latents, timestep, step_coeffs, step_noise, prompt_embeds, None, None,
                          control_image, control_scale)


class _SdxlForward(ControlledUNetStepGraph):
    def forward(self, latents: torch.Tensor, timestep: torch.Tensor, step_coeffs: torch.Tensor,
                step_noise: torch.Tensor, prompt_embeds: torch.Tensor, prompt_embeds_2: torch.Tensor,
                text_embeds: torch.Tensor, control_image: torch.Tensor, control_scale: torch.Tensor) -> torch.Tensor:
        return self._step(latents, timestep, step_coeffs, step_noise, prompt_embeds, prompt_embeds_2, text_embeds,
                          control_image, control_scale)


class _VaeGraph(nn.Module):
    """Holds the VAE and its latent conventions, honoured as the family's diffusers pipelines do:
    `scaling_factor`, and for SDXL per-channel `latents_mean` / `latents_std` when the config has both.
    `shift_factor` is ignored, as the SD / SDXL pipelines ignore it (a replacement VAE with a non-zero one is
    rejected before export: vae.check_vae_fits). `AutoencoderTiny` (TAESD) has scaling 1 and no shift; its
    latent_magnitude / latent_shift only serve its own 8-bit latent round trip (`forward`), which the pipelines never use."""

    latents_mean: torch.Tensor
    latents_std: torch.Tensor

    def __init__(self, vae: Any, family: str = "sd") -> None:
        super().__init__()
        self.vae: Any = vae
        self.tiny = type(vae).__name__ == "AutoencoderTiny"
        self.scaling = float(vae.config.scaling_factor)
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        self.per_channel = family == "sdxl" and mean is not None and std is not None
        if self.per_channel:
            view = lambda v: torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1)  # noqa: E731
            self.register_buffer("latents_mean", view(mean), persistent=False)
            self.register_buffer("latents_std", view(std), persistent=False)


class VaeDecodeGraph(_VaeGraph):
    """FP32 latents -> uint8 NHWC RGB, exactly as the pipeline's decode + `output_type="pil"` path:
    `decode(latents / scaling_factor)` (SDXL with latents_mean/std: `latents * std / scaling +
    mean`), then `(x / 2 + 0.5).clamp(0, 1) * 255`, rounded (half to even, like numpy). Transposes happen in
    float: TensorRT has no uint8 Transpose. A second output counts the non-finite decoded values, so NaN/inf
    can be reported instead of cast to black; the validation gate compares the float image that count
    reads (see validate.float_outputs). With `keep_float` set, the float image of the last call is kept in
    `last_float` (the FP32 reference's side of that comparison; never set while exporting)."""

    keep_float = False
    last_float: torch.Tensor | None = None

    def forward(self, latents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.per_channel:
            z = latents * self.latents_std / self.scaling + self.latents_mean
        else:
            z = latents / self.scaling
        decoded = self.vae.decode(z.to(_dtype_of(self.vae)), return_dict=False)[0].to(torch.float32)
        if self.keep_float:
            self.last_float = decoded.detach()
        nonfinite = torch.logical_not(torch.isfinite(decoded)).sum(dtype=torch.int32).reshape(1)
        image = (decoded / 2 + 0.5).clamp(0, 1) * 255
        return image.permute(0, 2, 3, 1).round().to(torch.uint8), nonfinite


class VaeEncodeGraph(_VaeGraph):
    """uint8 NHWC RGB + noise -> the img2img pipeline's noised starting latents:
    `scaling * (mean + std * sample_noise) + noise_sigma * latent_noise`, where the first noise is the
    posterior sample's (`latent_dist.sample`) and the second the scheduler's `add_noise` at the first
    img2img timestep (noise_sigma = that step's sigma).

    AutoencoderTiny has no posterior: its encoder's output is the latents (diffusers' `retrieve_latents`
    takes `.latents` and draws no noise), so `sample_noise` is ignored. It stays a graph input, as the
    runner's IO contract says, by entering the sum multiplied by zero (exact for the finite noise the
    runner feeds)."""

    def forward(
        self, image: torch.Tensor, sample_noise: torch.Tensor, latent_noise: torch.Tensor, noise_sigma: torch.Tensor
    ) -> torch.Tensor:
        dtype = _dtype_of(self.vae)
        pixels = (image.to(torch.float32).permute(0, 3, 1, 2) / 255.0) * 2.0 - 1.0
        if self.tiny:
            sample = self.vae.encode(pixels.to(dtype), return_dict=False)[0].to(torch.float32)
            sample = sample + 0.0 * sample_noise
        else:
            dist = self.vae.encode(pixels.to(dtype), return_dict=False)[0]
            sample = (dist.mean + dist.std * sample_noise.to(dtype)).to(torch.float32)
        if self.per_channel:
            init = (sample - self.latents_mean) * self.scaling / self.latents_std
        else:
            init = sample * self.scaling
        return init + noise_sigma * latent_noise


def build_wrapper(component: str, pipe: Any, family: str, height: int, width: int) -> nn.Module:
    """The exportable module for a component of `pipe` (dispatch on the spec's `wrapper` name)."""
    if component == "text_encoder":
        return TextEncoderGraph(pipe.text_encoder, "penultimate" if family == "sdxl" else "last", pooled=False)
    if component == "text_encoder_2":
        return TextEncoderGraph(pipe.text_encoder_2, "penultimate", pooled=True)
    if component == "unet":
        time_ids = (float(height), float(width), 0.0, 0.0, float(height), float(width))
        nets = list(getattr(pipe, "turbo_controlnets", None) or [])
        if nets:
            cls = _SdxlForward if family == "sdxl" else _SdForward
            return cls(pipe.unet, nets, time_ids if family == "sdxl" else None)
        return UNetStepGraph(pipe.unet, time_ids if family == "sdxl" else None)
    if component == "vae_decoder":
        return VaeDecodeGraph(pipe.vae, family)
    if component == "vae_encoder":
        return VaeEncodeGraph(pipe.vae, family)
    raise KeyError(component)
