"""Crash-safe checkpoint files.

A Stable Diffusion checkpoint is several GB; writing it takes long enough that a SIGKILL, an OOM kill or a
full disk can land mid-write. Writing in place would then leave a truncated ``last.ckpt`` and destroy the only
resumable state. Here the bytes go to a temporary file in the target's directory (same filesystem, so the
rename is atomic), are fsynced, and only then renamed over the target (``ldm.util.atomic_path``): readers see
either the complete old file or the complete new one.

Loading keeps torch's safe ``weights_only=True`` unpickler. Lightning 2.6.6 passes ``weights_only=None``
through to ``torch.load``, which on torch >= 2.6 means ``True`` as well. A checkpoint written by Lightning for a
module whose hyperparameters are a plain dict contains only tensors, containers, numbers and strings, so the
restricted unpickler accepts it without ``add_safe_globals``. Checkpoints that pickle other objects
(OmegaConf hparams, ``argparse.Namespace``, ...) fail with an error naming the offending global; only for
files you trust, pass ``weights_only=False``.
"""
from __future__ import annotations

import os
import pickle
from typing import Any, Callable, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

from ldm.util import atomic_path


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` that either fully replaces ``path`` or leaves it untouched, and survives a power cut."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # The temporary name is hidden and unique: globbing for "*.ckpt" never picks up a half-written file, and
    # two processes saving at once (e.g. a stray duplicate job) cannot clobber each other's.
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin: atomic local saves, ``weights_only`` loads by default.

    Args:
        weights_only: default for loads where Lightning passes ``None`` (``Trainer.fit(ckpt_path=...)``).
            ``True`` refuses to unpickle arbitrary objects; set ``False`` only for trusted checkpoints that
            contain custom Python objects.
    """

    def __init__(self, weights_only: bool = True) -> None:
        super().__init__()
        self.weights_only = weights_only

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Optional[Any] = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not support storage_options")
        if "://" in str(path):
            # Remote URLs cannot be renamed atomically; Lightning's fsspec transaction is the best available.
            super().save_checkpoint(checkpoint, path)
            return
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(
        self,
        path: _PATH,
        map_location: Optional[Callable] = lambda storage, loc: storage,
        weights_only: Optional[bool] = None,
    ) -> dict[str, Any]:
        if weights_only is None:
            weights_only = self.weights_only
        try:
            return super().load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        except pickle.UnpicklingError as err:
            if not weights_only:
                raise
            raise pickle.UnpicklingError(
                f"{path} holds Python objects the safe loader refuses; if you trust the file, load it with "
                f"AtomicCheckpointIO(weights_only=False). Details: {err}"
            ) from err
