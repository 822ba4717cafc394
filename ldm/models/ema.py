"""Exponential moving average of trainable weights, saved in the checkpoint and swappable in for sampling."""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ldm.util import ConfigError


class EMA(nn.Module):
    """Shadow copies of a module's trainable parameters, in ``state_dict`` as ``<prefix><buffer_name(name)>``.

    With ``warmup`` the effective decay is ``min(decay, (1 + n) / (10 + n))`` after ``n`` optimizer steps, so early
    averages are not dominated by the random or pretrained start.

    ``device="cpu"`` keeps the shadows on the CPU whatever device or dtype the model is moved to: they are plain
    tensors, not buffers, so ``.to()``/``.cuda()``/``.half()`` and DDP's buffer broadcast leave them alone, and
    this module writes and reads them in ``state_dict`` under the same keys as buffers would have.
    ``update_every=N`` averages every N optimizer steps with decay ``d**N`` per update, which weighs each past
    step as every-step averaging with ``d`` does (exactly so while the weights change little within N steps).
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, device: str | None = None,
                 update_every: int = 1):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        if device not in (None, "cpu"):
            raise ConfigError(f"model.params.ema_device: {device!r} is not a place for the EMA weights; expected "
                              f"cpu or null (beside the model)")
        if isinstance(update_every, bool) or not isinstance(update_every, int) or update_every < 1:
            raise ConfigError(f"model.params.ema_update_every: expected a whole number of optimizer steps >= 1, "
                              f"got {update_every!r}")
        self.decay, self.warmup, self.update_every = decay, warmup, update_every
        self.names = {name: self.buffer_name(name) for name, p in model.named_parameters() if p.requires_grad}
        self.register_buffer("num_updates", torch.tensor(0, dtype=torch.long))
        params = dict(model.named_parameters())
        self._pinned: dict[str, torch.Tensor] | None = {} if device else None
        for name, buf in self.names.items():
            source = params[name].detach()
            # A model built on the meta device (shapes only) gets shapes-only shadows wherever they are kept.
            shadow = source.to(source.device if device is None or source.is_meta else device, torch.float32, copy=True)
            if self._pinned is None:
                self.register_buffer(buf, shadow)
            else:
                self._pinned[buf] = shadow

    @staticmethod
    def buffer_name(param_name: str) -> str:
        """The one rule for an EMA tensor's name: buffers cannot hold dots (``down_blocks.0.x`` → ``down_blocks__0__x``).
        In a LatentDiffusion state dict the UNet parameter ``unet.<name>`` has its average at
        ``model_ema.<buffer_name(name)>``."""
        return param_name.replace(".", "__")

    def shadow(self, buf: str) -> torch.Tensor:
        return getattr(self, buf) if self._pinned is None else self._pinned[buf]

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (counted from 1) is one to average at."""
        return step % self.update_every == 0

    def current_decay(self) -> float:
        """The decay of one update: the per-step decay (after warmup over the steps so far) to the power N."""
        n = int(self.num_updates) * self.update_every
        decay = min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay
        return decay ** self.update_every

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        self.num_updates += 1
        params = dict(model.named_parameters())
        shadows = [self.shadow(buf) for buf in self.names.values()]
        current = [params[name].detach().to(shadow.device, torch.float32) for name, shadow in zip(self.names, shadows)]
        torch._foreach_lerp_(shadows, current, 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        params = dict(model.named_parameters())
        for name, buf in self.names.items():
            params[name].copy_(self.shadow(buf))

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
            self.shadow(buf).copy_(params[name].detach().float())
        self.num_updates.zero_()

    # CPU-kept shadows are not buffers: write and read them where buffers would be.
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for buf, tensor in (self._pinned or {}).items():
            destination[prefix + buf] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        for buf, tensor in (self._pinned or {}).items():
            key = prefix + buf
            if key not in state_dict:
                if strict:
                    missing_keys.append(key)
                continue
            if key in unexpected_keys:
                unexpected_keys.remove(key)
            value = state_dict[key]
            if value.shape != tensor.shape:
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                  f"the shape here is {tuple(tensor.shape)}")
                continue
            with torch.no_grad():
                tensor.copy_(value)
