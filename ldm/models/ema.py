"""Exponential moving average of trainable weights, saved in the checkpoint and swappable in for sampling."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn


class EMA(nn.Module):
    """Shadow copies of a module's trainable parameters, kept as buffers so they live in ``state_dict``.

    With ``warmup`` the effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` updates, so early
    averages are not dominated by the random or pretrained start.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.names = {name: self.buffer_name(name) for name, p in model.named_parameters() if p.requires_grad}
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        params = dict(model.named_parameters())
        for name, buf in self.names.items():
            self.register_buffer(buf, params[name].detach().clone().float())

    @staticmethod
    def buffer_name(param_name: str) -> str:
        """The one rule for an EMA tensor's name: buffers cannot hold dots (``down_blocks.0.x`` → ``down_blocks__0__x``).
        In a LatentDiffusion state dict the UNet parameter ``unet.<name>`` has its average at
        ``model_ema.<buffer_name(name)>``."""
        return param_name.replace(".", "__")

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        params = dict(model.named_parameters())
        shadows = [getattr(self, buf) for buf in self.names.values()]
        current = [params[name].detach().float() for name in self.names]
        torch._foreach_lerp_(shadows, current, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, buf in self.names.items():
            params[name].copy_(getattr(self, buf))

    @contextmanager
    def swapped_in(self, model: nn.Module):
        """Use the EMA weights inside the block, then restore the training weights exactly."""
        params = dict(model.named_parameters())
        backup = {name: params[name].detach().clone() for name in self.names}
        self.copy_to(model)
        try:
            yield
        finally:
            with torch.no_grad():
                for name, value in backup.items():
                    params[name].copy_(value)

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Restart the average at ``model``'s current weights (after loading pretrained weights)."""
        params = dict(model.named_parameters())
        for name, buf in self.names.items():
            getattr(self, buf).copy_(params[name].detach().float())
        self.num_updates.zero_()
