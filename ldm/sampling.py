"""The one sampling path: classifier-free-guided text-to-image, image-to-image and image variations over diffusers'
schedulers, used by the training callbacks (through ``LatentDiffusion.generate``) and by the scripts alike.

``txt2img`` follows ``StableDiffusionPipeline`` and ``img2img`` ``StableDiffusionImg2ImgPipeline`` step for step:
the same conditioning, the same draws from the same generators in the same order (VAE posterior sample, then the
start noise, then any per-step noise), the same scheduler calls. ``generator`` takes the two forms diffusers takes:

- one ``torch.Generator``: diffusers' batch semantics. The whole ``(B, C, h, w)`` start noise and each step's
  noise are drawn at once, so an image depends on its batch mates (the scripts' ``--seed``).
- a list of generators, one per image: every random draw of image ``i`` comes from ``generator[i]``, so the same
  condition and seed give the same image in any batch, with any sampler (the image logger and eval callbacks).

The scheduler settings are the model's (``LatentDiffusion.sampler_config``): those of a diffusers folder's
``scheduler_config.json``, or the defaults of a model trained here; each sampler is built from them with
``from_config`` exactly as diffusers' docs swap schedulers.
"""
from __future__ import annotations

import inspect
from typing import Callable, Sequence, Union

import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler)
from diffusers.utils.torch_utils import randn_tensor

from ldm.models.parts import cat_conditioning, context_of
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
# Keys of a scheduler_config.json that say where it came from rather than how to sample.
_BOOKKEEPING = ("_class_name", "_diffusers_version", "_use_default_values")
Generators = Union[torch.Generator, Sequence[torch.Generator], None]


def default_sampler_config(schedule_config: dict) -> dict:
    """The settings a model trained here samples with: its training schedule and SD v1's published offsets, with
    ``clip_sample`` off. Off in pixel space too, measured: on the same digits-demo checkpoint DDIM with guidance 3
    follows 100% of prompts with it off and 43% with x0 clipped to [-1, 1]; a model that wants clipping says so in
    ``model.params.sampler_config``."""
    return {**schedule_config, "steps_offset": 1, "set_alpha_to_one": False, "clip_sample": False}


def resolve_sampler_config(given: dict | None, defaults: dict) -> dict:
    """A model's sampler settings. A config that names its ``_class_name`` is a whole ``scheduler_config.json`` as
    diffusers writes it (a folder's, an export's) and is taken as it is, so keys it lacks get each scheduler class's
    own default, as in diffusers. Any other config (a YAML's ``sampler_config``) changes only the keys it names."""
    given = dict(given or {})
    if "_class_name" in given:
        return {k: v for k, v in given.items() if k not in ("_diffusers_version", "_use_default_values")}
    check_sampler_keys(given)
    return {**defaults, **given}


def check_sampler_keys(settings: dict, where: str = "model.params.sampler_config") -> None:
    """A key no sampler takes (a typo such as ``clip_sampel``) would be ignored by every ``from_config``: refuse it."""
    import difflib

    known = {name for cls, _ in SAMPLERS.values() for name in inspect.signature(cls.__init__).parameters} - {"self"}
    for key in settings:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=2)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"{where}: {key!r} is not a setting of any sampler ({', '.join(SAMPLERS)}){hint}")


def clean_sampler_config(config: dict) -> dict:
    return {k: v for k, v in dict(config).items() if k not in _BOOKKEEPING}


def make_scheduler(name: str, sampler_config: dict):
    """A diffusers scheduler called ``name`` built from a model's ``sampler_config``, as
    ``SchedulerClass.from_config(pipe.scheduler.config)`` does (keys a class does not take are ignored)."""
    if name not in SAMPLERS:
        raise ConfigError(f"unknown sampler {name!r}; choose one of {', '.join(SAMPLERS)}")
    cls, extra = SAMPLERS[name]
    settings = clean_sampler_config(sampler_config)
    if settings.get("rescale_betas_zero_snr") and not _takes(cls, "rescale_betas_zero_snr"):
        # from_config would drop the setting and sample a zero-terminal-SNR model with the unrescaled schedule.
        able = ", ".join(n for n, (c, _) in SAMPLERS.items() if _takes(c, "rescale_betas_zero_snr"))
        raise ConfigError(f"sampler {name!r} has no rescale_betas_zero_snr setting, which this model's "
                          f"zero-terminal-SNR schedule needs; use one of {able}")
    return cls.from_config({**settings, **extra})


def _takes(cls, setting: str) -> bool:
    return setting in inspect.signature(cls.__init__).parameters


def noise(shape, generator: Generators, device, dtype=torch.float32) -> torch.Tensor:
    """diffusers' ``randn_tensor``: drawn on the generators' device (the CPU for seeds), one row per generator."""
    return randn_tensor(tuple(shape), generator=_one_or_list(generator), device=torch.device(device), dtype=dtype)


def _one_or_list(generator):
    return list(generator) if isinstance(generator, (list, tuple)) else generator


def img2img_timesteps(scheduler, steps: int, strength: float, device=None) -> torch.Tensor:
    """The last ``int(steps * strength)`` timesteps of a ``steps``-step schedule: where img2img starts and runs,
    as diffusers' img2img pipeline computes them (the scheduler is told its start, which sigma-based and
    multistep schedulers need). Empty when ``steps * strength < 1``."""
    scheduler.set_timesteps(steps, device=device)
    start = (steps - min(int(steps * strength), steps)) * scheduler.order
    if hasattr(scheduler, "set_begin_index"):  # schedulers without an index (DDIM, PNDM) need no start
        scheduler.set_begin_index(start)
    return scheduler.timesteps[start:]


@torch.no_grad()
def denoise_loop(denoise: Callable, scheduler, cond, uncond,
                 latents: torch.Tensor, timesteps: torch.Tensor, guidance_scale: float = 7.5, eta: float = 0.0,
                 generator: Generators = None, on_step: Callable | None = None) -> torch.Tensor:
    """Run the reverse process from ``latents`` over ``timesteps`` and return the final latents.

    ``denoise(x, t, conditioning)`` is the network; guidance is applied when ``guidance_scale > 1`` and an
    ``uncond`` conditioning is given; ``on_step(i, t, latents)`` watches each step.
    """
    guided = uncond is not None and guidance_scale > 1.0
    context = cat_conditioning([uncond, cond]) if guided else cond
    step_params = inspect.signature(scheduler.step).parameters
    extra = {k: v for k, v in (("eta", eta), ("generator", _one_or_list(generator))) if k in step_params}
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


def _contexts(model, conds, negative_prompt: str, scale: float, height: int, width: int):
    """The conditioning of ``conds``, and the guidance baseline when guidance is on: the negative prompt's, or the
    conditioner's unconditional one (SD's pipelines encode "" for text, SDXL's zeros; zeros for image embeddings).
    A micro-conditioned model (SDXL) gets the size conditioning of an ``height`` x ``width`` sample on both, as
    diffusers' pipelines give both the same ``add_time_ids``."""
    cond_stage = model.cond_stage_model
    n = len(conds)
    original, crop = cond_stage.sample_sizes(height, width)
    sizes = [torch.tensor([list(v)] * n) for v in ((height, width), original, crop)]
    cond = cond_stage.with_sizes(cond_stage(conds if torch.is_tensor(conds) else list(conds)), *sizes)
    if scale <= 1.0:
        return cond, None
    uncond = cond_stage.negative(negative_prompt, n) if negative_prompt else cond_stage.unconditional(n)
    return cond, cond_stage.with_sizes(uncond, *sizes)


def _check_generators(generator, n: int) -> None:
    if isinstance(generator, (list, tuple)) and len(generator) != n:
        raise ConfigError(f"{len(generator)} generators for {n} images: give one generator, or one per image")


@torch.inference_mode()  # no autograd bookkeeping at all: a little less per-op work than no_grad
def txt2img(model, conds, height: int, width: int, negative_prompt: str = "", generator: Generators = None,
            sampler: str = "ddim", steps: int = 50, scale: float = 7.5, eta: float = 0.0,
            on_step: Callable | None = None, scheduler=None) -> torch.Tensor:
    """One image per condition, in [-1, 1]: ``StableDiffusionPipeline(prompts, negative_prompt=..., generator=...)``.

    ``conds`` is what the model's conditioner takes: captions, or a (B, C, H, W) image tensor in [-1, 1] for an
    image-variations model. ``scheduler`` (default: a fresh ``sampler`` from the model's settings) lets a caller
    watch its state from ``on_step(i, t, latents)``.
    """
    _check_generators(generator, len(conds))
    scheduler = scheduler or make_scheduler(sampler, model.sampler_config)
    cond, uncond = _contexts(model, conds, negative_prompt, scale, height, width)
    context = context_of(cond)
    scheduler.set_timesteps(steps, device=context.device)
    latents = noise(model.latent_shape(len(conds), height, width), generator, context.device, context.dtype)
    latents = latents * scheduler.init_noise_sigma
    z = denoise_loop(model.denoise, scheduler, cond, uncond, latents, scheduler.timesteps, scale, eta, generator,
                     on_step)
    return model.first_stage_model.decode(z)


@torch.inference_mode()
def img2img(model, init: torch.Tensor, prompts: Sequence[str], strength: float = 0.75, negative_prompt: str = "",
            generator: Generators = None, sampler: str = "ddim", steps: int = 50, scale: float = 7.5,
            eta: float = 0.0, on_step: Callable | None = None, scheduler=None) -> torch.Tensor:
    """Redraw ``init`` ((1, C, H, W) in [-1, 1]) once per prompt: ``StableDiffusionImg2ImgPipeline``.

    With one generator the image is encoded once (one posterior draw) and repeated for the batch; with one
    generator per image each image gets its own posterior draw, as diffusers does. It is noised to the first of
    the last ``int(steps * strength)`` timesteps and denoised from there. Below one step (``strength`` ~ 0) the
    result is the init image through the VAE; diffusers refuses that case.
    """
    n = len(prompts)
    _check_generators(generator, n)
    scheduler = scheduler or make_scheduler(sampler, model.sampler_config)
    cond, uncond = _contexts(model, prompts, negative_prompt, scale, *init.shape[-2:])
    context = context_of(cond)
    timesteps = img2img_timesteps(scheduler, steps, strength, context.device)
    init = init.to(context.device)
    encode = model.first_stage_model.encode
    if isinstance(generator, (list, tuple)):
        z0 = torch.cat([encode(init, g) for g in generator]).to(context.dtype)
    else:
        z0 = encode(init, generator).to(context.dtype).repeat(n, 1, 1, 1)
    if len(timesteps) == 0:
        return model.first_stage_model.decode(z0)
    latents = scheduler.add_noise(z0, noise(z0.shape, generator, context.device, context.dtype),
                                  timesteps[:1].repeat(n))
    z = denoise_loop(model.denoise, scheduler, cond, uncond, latents, timesteps, scale, eta, generator, on_step)
    return model.first_stage_model.decode(z)
