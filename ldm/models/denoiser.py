"""The denoiser: diffusers' ``UNet2DConditionModel``, from YAML params or a pretrained folder."""
from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from ldm.models.pretrained import build_or_load


def unet(config: dict | None = None, pretrained: str | None = None, subfolder: str = "unet",
         gradient_checkpointing: bool = False, channels_last: bool = False,
         compile: bool = False) -> UNet2DConditionModel:
    """Build the UNet. ``config`` holds ``UNet2DConditionModel`` keyword arguments (its ``config.json``).

    Attention uses PyTorch's scaled-dot-product kernels (diffusers' default processor). Three speed settings
    leave the maths unchanged: ``gradient_checkpointing`` recomputes activations in backward (less memory, one
    more forward pass of time), ``channels_last`` stores the weights NHWC (faster convolutions on tensor-core GPUs),
    ``compile`` runs it through ``torch.compile`` (the first steps compile; in place, so checkpoint keys stay).
    """
    model = build_or_load(UNet2DConditionModel, config, pretrained, subfolder)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if compile:
        model.compile()
    return model
