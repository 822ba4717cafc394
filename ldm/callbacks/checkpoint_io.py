"""Crash-safe checkpoint files.

A Stable Diffusion checkpoint is several GB; writing it takes long enough that a SIGKILL, an OOM kill or a
full disk can land mid-write. Writing in place would then leave a truncated ``last.ckpt`` and destroy the only
resumable state. Here the bytes go to a temporary file in the target's directory (same filesystem, so the
rename is atomic), are fsynced, and only then renamed over the target: readers see either the complete old
file or the complete new one.

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
import uuid
from typing import Any, Callable, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH


def _fsync_dir(directory: str) -> None:
    """Persist the rename itself; without this a power loss can roll the directory entry back."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. platforms that cannot open directories
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` that either fully replaces ``path`` or leaves it untouched."""
    path = os.path.abspath(os.fspath(path))
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    # A dot-prefixed unique name: globbing for "*.ckpt" never picks up a half-written file, and two
    # processes saving at once (e.g. a stray duplicate job) cannot clobber each other's temp files.
    tmp = os.path.join(directory, f".{os.path.basename(path)}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    # os.open with 0o666 honours the umask, so the final file gets normal permissions (mkstemp would use 0600).
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # includes KeyboardInterrupt/SystemExit arriving mid-write
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(directory)


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
