"""Text-to-image and image-to-image with a loaded LatentDiffusion, step for step as diffusers' pipelines.

``txt2img`` follows ``StableDiffusionPipeline`` and ``img2img`` follows ``StableDiffusionImg2ImgPipeline``: the
same prompt encoding, the same draws from the same ``torch.Generator`` in the same order (VAE posterior sample,
then the start noise, then any per-step noise), the same scheduler calls. So ``generator=torch.Generator("cpu")
.manual_seed(S)`` here and in diffusers gives the same images for the same weights and scheduler settings.

A batch shares one generator, which draws the whole ``(B, 4, h, w)`` start noise at once, exactly as diffusers
does for a list of prompts or ``num_images_per_prompt``. (``LatentDiffusion.generate``, used by the training
image logger, instead gives every caption its own seed, so a logged prompt looks the same in every grid.)
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

from ldm.sampling import img2img_timesteps, initial_noise, make_scheduler, sample
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
            raise ConfigError(f"--lora {lora!r} is not a file (a diffusers LoRA .safetensors, e.g. <run>/lora/...)")
        load_lora(model, lora, lora_scale)
    if dtype != torch.float32:
        # nn.Module.to: diffusers' own .to warns about fp32-only modules even when the UNet has none.
        torch.nn.Module.to(model.unet, dtype)
        model.cond_stage_model.to(dtype)
    return model


def truncation_warnings(model, prompts: Sequence[str]) -> list[str]:
    """One line per distinct prompt longer than the text encoder reads, saying where it was cut."""
    cond = model.cond_stage_model
    tokenizer, limit = getattr(cond, "tokenizer", None), getattr(cond, "max_length", None)
    if tokenizer is None or limit is None:
        return []
    lines = []
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids  # start and end tokens included
        if len(ids) <= limit:
            continue
        kept = tokenizer.decode(ids[1:limit - 1]).split()
        dropped = tokenizer.decode(ids[limit - 1:-1])
        dropped = dropped if len(dropped) <= 80 else dropped[:77] + "..."
        lines.append(f"warning: prompt {prompt[:40]!r}... is {len(ids) - 2} tokens but the text encoder reads "
                     f"{limit - 2}: truncated after word {len(kept)} ('... {' '.join(kept[-4:])}'), dropping "
                     f"{len(ids) - limit} tokens: {dropped!r}")
    return lines


def encode(model, prompts: Sequence[str], negative_prompt: str, scale: float):
    """Context for the prompts, and for the negative prompt when guidance is on (``scale > 1``), as diffusers."""
    cond = model.cond_stage_model(list(prompts))
    uncond = model.cond_stage_model([negative_prompt] * len(prompts)) if scale > 1.0 else None
    return cond, uncond


def _denoiser(model) -> Callable:
    return lambda x, t, c: model.unet(x, t, encoder_hidden_states=c).sample


def image_channels(model) -> int:
    """Channels of the images the model makes: the VAE's input, or the latents themselves in pixel space."""
    vae = getattr(model.first_stage_model, "vae", None)
    return vae.config.in_channels if vae is not None else model.first_stage_model.latent_channels


def latent_shape(model, n: int, height: int, width: int) -> tuple[int, ...]:
    down = model.first_stage_model.downsample
    return n, model.first_stage_model.latent_channels, height // down, width // down


@torch.inference_mode()  # no autograd bookkeeping at all: a little less per-op work than no_grad
def txt2img(model, prompts: Sequence[str], height: int, width: int, negative_prompt: str = "",
            generator: torch.Generator | None = None, sampler: str = "ddim", steps: int = 50, scale: float = 7.5,
            eta: float = 0.0, on_step: Callable | None = None, scheduler=None) -> torch.Tensor:
    """One image per prompt, in [-1, 1]: ``StableDiffusionPipeline(prompts, negative_prompt=..., generator=...)``.

    ``scheduler`` (default: a fresh ``sampler``) lets a caller watch its state from ``on_step(i, t, latents)``.
    """
    scheduler = scheduler or make_scheduler(sampler, model.schedule.scheduler_config())
    cond, uncond = encode(model, prompts, negative_prompt, scale)
    z = sample(_denoiser(model), scheduler, cond, uncond, latent_shape(model, len(prompts), height, width),
               steps=steps, guidance_scale=scale, eta=eta, generator=generator, on_step=on_step)
    return model.first_stage_model.decode(z)


@torch.inference_mode()
def img2img(model, init: torch.Tensor, prompts: Sequence[str], strength: float = 0.75, negative_prompt: str = "",
            generator: torch.Generator | None = None, sampler: str = "ddim", steps: int = 50, scale: float = 7.5,
            eta: float = 0.0, on_step: Callable | None = None, scheduler=None) -> torch.Tensor:
    """Redraw ``init`` ((1, 3, H, W) in [-1, 1]) once per prompt: ``StableDiffusionImg2ImgPipeline``.

    The image is encoded once (one posterior draw), repeated for the batch, noised to the first of the last
    ``int(steps * strength)`` timesteps and denoised from there. Below one step (``strength`` ~ 0) the
    result is the init image through the VAE; diffusers refuses that case.
    """
    scheduler = scheduler or make_scheduler(sampler, model.schedule.scheduler_config())
    cond, uncond = encode(model, prompts, negative_prompt, scale)
    timesteps = img2img_timesteps(scheduler, steps, strength, cond.device)
    z0 = model.first_stage_model.encode(init.to(cond.device), generator).to(cond.dtype)
    z0 = z0.repeat(len(prompts), 1, 1, 1)
    if len(timesteps) == 0:
        return model.first_stage_model.decode(z0)
    noise = initial_noise(z0.shape, generator, cond.device, cond.dtype)
    latents = scheduler.add_noise(z0, noise, timesteps[:1].repeat(len(prompts)))
    z = sample(_denoiser(model), scheduler, cond, uncond, z0.shape, steps=steps, guidance_scale=scale, eta=eta,
               generator=generator, latents=latents, timesteps=timesteps, on_step=on_step)
    return model.first_stage_model.decode(z)


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
