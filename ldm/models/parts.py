"""The declared interfaces of a LatentDiffusion's parts: what a conditioner and a first stage offer the rest of
the project. Weights, LoRA, sampling, exports and callbacks use only these; they never reach into the library
object a part wraps (a ``CLIPTextModel``, an ``AutoencoderKL``), so a new part touches one file.

A part names its weights as :class:`WeightComponent` rows, one per library network it holds:

- ``prefix``: where the network's tensors sit inside the part (``"transformer."`` in ``CLIPTextConditioner``);
  the model adds its own attribute name (``"cond_stage_model."``) in front.
- ``diffusers``: the pipeline folder's component (``text_encoder``, ``image_encoder``, ``vae``).
- ``original``: which original single-file layout the tensors take there, a name ``ldm.weights.original`` maps
  (``clip_text``, ``open_clip_text``, ``clip_visual``, ``vae``, ``unet``; SDXL's ``sdxl_clip_text`` and
  ``sdxl_open_clip_text``).
- ``module``: the network itself, for the key-mapping code that needs its config (diffusers' converters do).

What a conditioner returns (its *conditioning*) is either the cross-attention context tensor (SD v1/2.x, image
variations) or a dict of tensors whose ``"context"`` entry is that context and whose other entries are the UNet's
added conditions, diffusers' ``added_cond_kwargs`` (SDXL: ``text_embeds``, the pooled text vector, and
``time_ids``, the size micro-conditioning that :meth:`Conditioner.with_sizes` adds from the batch or the sample
size). The helpers below (:func:`cat_conditioning`, :func:`where_dropped`, ...) treat both forms alike, so the
training step, the caches and the sampling loop never look inside; ``LatentDiffusion.denoise`` is the one place
that unpacks them for the UNet.

``ldm.models.sdxl.SDXLTextConditioner`` holds SDXL's two text encoders (CLIP ViT-L under ``transformer.``, OpenCLIP
bigG with its projection under ``transformer_2.``): two ``weight_components`` rows and two ``lora_modules``
(diffusers' ``text_encoder`` / ``text_encoder_2``). Weights, LoRA and sampling code loop over the rows and
modules. An OpenCLIP text encoder in open_clip's own classes would be a conditioner whose row says
``open_clip_text``; the tokenizer and ``prompt_warnings`` come with it.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Sequence, Union

import torch
from torch import nn

from ldm.util import ConfigError


Conditioning = Union[torch.Tensor, dict]  # the context, or {"context": ..., added UNet conditions}


def context_of(cond: Conditioning) -> torch.Tensor:
    """The cross-attention context of a conditioning (its device and dtype are the conditioning's)."""
    return cond["context"] if isinstance(cond, dict) else cond


def map_conditioning(fn, *conds: Conditioning) -> Conditioning:
    """``fn`` applied to the matching tensors of one or more conditionings of the same form."""
    if isinstance(conds[0], dict):
        return {key: fn(*(c[key] for c in conds)) for key in conds[0]}
    return fn(*conds)


def cat_conditioning(conds: Sequence[Conditioning]) -> Conditioning:
    return map_conditioning(lambda *xs: torch.cat(xs), *conds)


def where_dropped(drop: torch.Tensor, uncond: Conditioning, cond: Conditioning) -> Conditioning:
    """Rows of ``cond`` where ``drop`` is true replaced by ``uncond`` (one row, broadcast) for caption dropout."""
    def pick(u, c):
        mask = drop.to(c.device).view(-1, *([1] * (c.ndim - 1)))
        return torch.where(mask, u.to(c), c)
    return map_conditioning(pick, uncond, cond)


def conditioning_rows(cond: Conditioning) -> list[Conditioning]:
    """One conditioning per batch row (what a text cache stores per caption)."""
    n = len(context_of(cond))
    return [map_conditioning(lambda x: x[i], cond) for i in range(n)]


@dataclass(frozen=True)
class WeightComponent:
    prefix: str
    diffusers: str
    original: str
    module: nn.Module | None = None

    def under(self, owner: str) -> "WeightComponent":
        """The same row with the owner's attribute name in front of the prefix (``cond_stage_model.`` + ...)."""
        return WeightComponent(owner + self.prefix, self.diffusers, self.original, self.module)


class Conditioner(nn.Module):
    """A batch's conditions (captions, images) → the denoiser's cross-attention context.

    Subclasses set ``kind`` and implement ``forward``, ``unconditional``, ``weight_components`` and
    ``write_diffusers``; the rest has working defaults. Input preprocessing (an image conditioner's resize filter,
    size, mean/std; a text conditioner's token limit and layer) is the conditioner's own constructor params, so the
    model section stored in every checkpoint and export carries it and sampling rebuilds it exactly. The encoder trains with the UNet only when ``trainable``;
    otherwise it stays in eval mode without gradients, whatever Lightning's ``.train()`` calls say.
    """

    kind: ClassVar[str] = ""  # "text" or "image": what ``forward`` takes
    trainable = False
    ucg_rate = 0.0  # probability of dropping a row's condition in training (classifier-free guidance)

    def set_trainable(self, trainable: bool) -> None:
        self.trainable = bool(trainable)
        self.requires_grad_(self.trainable)
        if not self.trainable:
            self.eval()

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, conds: Any, drop: torch.Tensor | None = None) -> torch.Tensor:
        """The context for ``conds``; rows where ``drop`` is true get the unconditional context."""
        raise NotImplementedError

    def unconditional(self, batch_size: int) -> torch.Tensor:
        """The guidance baseline diffusers' pipelines use for this kind of model."""
        raise NotImplementedError

    def negative(self, prompt: str, batch_size: int) -> torch.Tensor:
        """The guidance baseline for a negative prompt (text conditioners only)."""
        raise ConfigError(f"negative prompt {prompt!r}: this model is conditioned on {self.kind}s, not text; its "
                          "guidance baseline is the unconditional embedding")

    def prompt_warnings(self, prompts: Sequence[str]) -> list[str]:
        """One line per prompt the encoder cannot read whole (text conditioners); none by default."""
        return []

    def with_sizes(self, cond: Conditioning, target_size: torch.Tensor, original_size: torch.Tensor | None = None,
                   crop_top_left: torch.Tensor | None = None) -> Conditioning:
        """``cond`` with the images' size conditioning ((B, 2) tensors of ``(h, w)`` / ``(top, left)``): nothing
        for models without micro-conditioning; SDXL adds its ``time_ids``."""
        return cond

    def sample_sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        """``(original_size, crop_top_left)`` to sample an ``height`` x ``width`` image with (micro-conditioned
        models only; diffusers' pipeline default: the sample's own size, crop (0, 0))."""
        return (height, width), (0, 0)

    def input_channels(self) -> int | None:
        """Channels of the images an image conditioner reads (None for text)."""
        return None

    def lora_modules(self) -> dict[str, nn.Module]:
        """The networks LoRA may adapt, keyed by diffusers' LoRA file prefix (``text_encoder``)."""
        return {}

    def weight_components(self) -> list[WeightComponent]:
        raise NotImplementedError

    def description(self) -> str:
        """A short name for error messages and summaries ("CLIP text encoder")."""
        return type(self).__name__

    def write_diffusers(self, out: Path) -> dict[str, list]:
        """Write this part's configs (not weights) into a pipeline folder; return its ``model_index.json`` rows."""
        raise NotImplementedError


class FirstStage(nn.Module):
    """Images in [-1, 1] ↔ the space the denoiser works in. Always in eval mode and without gradients."""

    downsample: int = 1
    latent_channels: int = 3
    image_channels: int = 3
    scale_factor: float = 1.0

    def freeze(self):
        self.eval()
        for p in self.parameters():
            p.requires_grad_(False)
        return self

    def train(self, mode: bool = True):
        return super().train(False)

    def encode(self, x: torch.Tensor, generator=None) -> torch.Tensor:
        """The denoiser's input for images ``x``: a draw from the posterior, scaled."""
        return self.sample_moments(self.encode_moments(x), generator)

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior of ``x`` as mean and std stacked on channels, (B, 2C, h, w): what a latent cache stores."""
        raise NotImplementedError

    def sample_moments(self, moments: torch.Tensor, generator=None) -> torch.Tensor:
        """A scaled latent drawn from ``encode_moments``' output, with the same random draws ``encode`` makes."""
        raise NotImplementedError

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def weight_components(self) -> list[WeightComponent]:
        return []

    @property
    def has_vae(self) -> bool:
        return bool(self.weight_components())

    def write_diffusers(self, out: Path) -> dict[str, list]:
        raise ConfigError(f"{type(self).__name__} has no VAE: a pixel-space model has no diffusers pipeline folder")


def diffusers_prefixes() -> dict[str, str]:
    """Pipeline folder component → this project's state-dict prefix, for every part this project has. Reading a
    folder needs it before any model is built; the parts' own declarations are the single source."""
    from ldm.models.conditioners import CLIPImageConditioner, CLIPTextConditioner
    from ldm.models.first_stage import AutoencoderKLFirstStage
    from ldm.models.sdxl import SDXLTextConditioner

    rows = {"unet": "unet."}
    for cls, owner in ((AutoencoderKLFirstStage, "first_stage_model."), (CLIPTextConditioner, "cond_stage_model."),
                       (CLIPImageConditioner, "cond_stage_model."), (SDXLTextConditioner, "cond_stage_model.")):
        for diffusers, prefix in cls.DIFFUSERS.items():
            rows[diffusers] = owner + prefix
    return rows
