"""Loading a model to sample with, choosing its device and precision, and the helpers the sampling scripts
share. The sampling itself (``txt2img``, ``img2img``) lives in ``ldm.sampling``, the one path the training
callbacks use too; it is re-exported here for the scripts.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import torch

from ldm.sampling import img2img, txt2img  # noqa: F401  (the scripts call them from here)
from ldm.util import ConfigError

PRECISIONS = ("auto", "autocast", "full", "fp32", "fp16", "bf16")
DTYPES = {"full": torch.float32, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def pick_device(name: str = "auto") -> torch.device:
    """``auto``: the first of CUDA, Apple MPS and CPU that this machine has."""
    if name != "auto":
        device = torch.device(name)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: this machine has no CUDA device (try --device auto)")
        return device
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(precision: str, device: torch.device) -> torch.dtype:
    """``auto``/``autocast`` (CompVis's default name): fp16 on CUDA, fp32 on MPS and CPU; ``full`` = fp32."""
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if precision in ("auto", "autocast"):
        return torch.float16 if device.type == "cuda" else torch.float32
    return DTYPES[precision]


def precision_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype and k != "full")


def load(ckpt: str, config: str | None = None, device: str | torch.device = "cpu",
         dtype: torch.dtype = torch.float32, ema: bool = True, lora: str | None = None, lora_scale: float = 1.0):
    """A model ready to sample: weights from ``ckpt`` (run dir, training checkpoint, diffusers folder or single
    file), plus a LoRA adapter file at ``lora_scale`` when ``lora`` is given, the UNet and text encoder in
    ``dtype`` on ``device``. The VAE stays fp32 (SD v1's overflows in fp16)."""
    from ldm.weights.load import load_model

    model = load_model(ckpt, config=config, ema=ema, device=device)
    if lora:
        from ldm.lora import load_lora

        if not Path(lora).is_file():
            raise ConfigError(f"--lora {lora!r} is not a file (a LoRA .safetensors, kohya or diffusers layout, e.g. <run>/lora/...)")
        load_lora(model, lora, lora_scale)
    if dtype != torch.float32:
        # nn.Module.to: diffusers' own .to warns about fp32-only modules even when the UNet has none.
        torch.nn.Module.to(model.unet, dtype)
        model.cond_stage_model.to(dtype)
    return model


def truncation_warnings(model, prompts: Sequence[str]) -> list[str]:
    """One line per distinct prompt longer than the model's text encoder reads, saying where it was cut."""
    return model.cond_stage_model.prompt_warnings(prompts)


def image_channels(model) -> int:
    """Channels of the images the model makes and reads: the VAE's, or the pixels' themselves in pixel space."""
    return model.first_stage_model.image_channels


def to_uint8(images: torch.Tensor):
    """(B, C, H, W) in [-1, 1] → (B, H, W, C) uint8 numpy, rounded as diffusers' ``output_type="pil"``."""
    x = (images.detach().float().cpu() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    return (x * 255).round().astype("uint8")


def decode_frame(model, scheduler, latents: torch.Tensor) -> torch.Tensor:
    """Decode the current latents of a run for a progress frame. Sigma-parameterised schedulers (Euler) keep
    ``x0 + sigma * noise`` with sigma up to ~15, which decodes to saturated noise; their latents are divided by
    ``sqrt(sigma^2 + 1)`` first, giving the variance-preserving ``x_t`` that DDIM-like schedulers keep."""
    if float(scheduler.init_noise_sigma) > 1.0 and getattr(scheduler, "step_index", None) is not None:
        sigma = scheduler.sigmas[scheduler.step_index].to(latents.device)
        latents = latents / (sigma ** 2 + 1) ** 0.5
    return model.first_stage_model.decode(latents)


def warn(lines: Sequence[str]) -> None:
    for line in lines:
        print(line, file=sys.stderr)
