"""Classifier-free-guided sampling over diffusers' schedulers, shared by the image logger and the scripts.

The loop follows diffusers' ``StableDiffusionPipeline`` step for step (noise drawn on the CPU generator,
``[uncond, cond]`` batching, ``scale_model_input``/``step``), so the same seed gives the same image.
"""
from __future__ import annotations

import inspect
from typing import Callable

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)

from ldm.util import ConfigError

SAMPLERS = {
    "ddim": (DDIMScheduler, {}),
    "plms": (PNDMScheduler, {"skip_prk_steps": True}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "dpm++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
}
# SD v1's published scheduler settings: timesteps offset by one and no "alpha = 1" final step.
SD_DEFAULTS = {"steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}


def make_scheduler(name: str, schedule_config: dict):
    """A diffusers scheduler called ``name`` for a model trained with ``schedule_config``."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    return cls.from_config({**SD_DEFAULTS, **schedule_config, **extra})


def initial_noise(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    """Draw on the CPU like diffusers' ``randn_tensor``, so a seed means the same thing on every device."""
    return torch.randn(shape, generator=generator, device="cpu", dtype=dtype).to(device)


def img2img_timesteps(scheduler, steps: int, strength: float, device=None) -> torch.Tensor:
    """The last ``int(steps * strength)`` timesteps of a ``steps``-step schedule: where img2img starts and runs,
    as diffusers' img2img pipeline computes them (the scheduler is told its start, which sigma-based and
    multistep schedulers need). Empty when ``steps * strength < 1``."""
    scheduler.set_timesteps(steps, device=device)
    start = (steps - min(int(steps * strength), steps)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


@torch.no_grad()
def sample(denoise: Callable, scheduler, cond: torch.Tensor, uncond: torch.Tensor | None, shape,
           steps: int = 50, guidance_scale: float = 7.5, eta: float = 0.0, generator: torch.Generator | None = None,
           latents: torch.Tensor | None = None, timesteps: torch.Tensor | None = None,
           on_step: Callable[[int, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Run the reverse process and return the final latents.

    ``denoise(x, t, context)`` is the network; guidance is applied when ``guidance_scale > 1`` and an
    ``uncond`` context is given. ``latents``/``timesteps`` let img2img start part-way.
    """
    device = cond.device
    if timesteps is None:
        scheduler.set_timesteps(steps, device=device)
        timesteps = scheduler.timesteps
    if latents is None:
        latents = initial_noise(shape, generator, device, cond.dtype) * scheduler.init_noise_sigma
    guided = uncond is not None and guidance_scale > 1.0
    context = torch.cat([uncond, cond]) if guided else cond
    step_params = inspect.signature(scheduler.step).parameters
    extra = {k: v for k, v in (("eta", eta), ("generator", generator)) if k in step_params}
    for i, t in enumerate(timesteps):
        x_in = torch.cat([latents] * 2) if guided else latents
        x_in = scheduler.scale_model_input(x_in, t)
        pred = denoise(x_in, t, context)
        if guided:
            pred_uncond, pred_cond = pred.chunk(2)
            pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        latents = scheduler.step(pred, t, latents, **extra, return_dict=False)[0]
        if on_step is not None:
            on_step(i, t, latents)
    return latents
