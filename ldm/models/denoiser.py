"""The denoiser: diffusers' ``UNet2DConditionModel``, from YAML params or a pretrained folder."""
from __future__ import annotations

from diffusers import UNet2DConditionModel

from ldm.models.pretrained import build_or_load


def unet(config: dict | None = None, pretrained: str | None = None, subfolder: str = "unet",
         gradient_checkpointing: bool = False) -> UNet2DConditionModel:
    """Build the UNet. ``config`` holds ``UNet2DConditionModel`` keyword arguments (its ``config.json``).

    Attention uses PyTorch's scaled-dot-product kernels (diffusers' default processor).
    """
    model = build_or_load(UNet2DConditionModel, config, pretrained, subfolder)
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model
