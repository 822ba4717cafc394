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

import errno
import os
import pickle
import shutil
import zipfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from lightning_fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_fabric.utilities.types import _PATH

from ldm.util import PARTIAL_GLOB, ConfigError, atomic_path


class DiskFullError(ConfigError):
    """A checkpoint did not fit on the disk: one line (like a config error, the user has to act), and the file it
    would have replaced is intact."""


def disk_full_message(path: str, err: OSError) -> str:
    folder = os.path.dirname(path)
    free = shutil.disk_usage(folder).free if os.path.isdir(folder) else 0
    kept = f"the previous {os.path.basename(path)} is intact" if os.path.exists(path) else "no file was replaced"
    return (f"no space left on the device writing {path} ({free / 2**20:.1f} MiB free in {folder}; "
            f"{os.strerror(err.errno)}): {kept} and the partial file was removed; free some space (or move the "
            "run dir) and resume with -r")


def unreadable_reason(path: str | os.PathLike) -> str | None:
    """Why a checkpoint cannot be resumed from (empty, truncated, corrupt), or None when it reads whole.

    Torch checkpoints are zip archives: a truncated copy has lost the directory at its end, and a byte that
    changed on the disk fails its entry's CRC. Both are found by reading the file once, without unpickling it."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            return "it is empty"
        with zipfile.ZipFile(path) as archive:
            if not any(name.endswith("data.pkl") for name in archive.namelist()):
                return "it is not a torch checkpoint (no data.pkl inside)"
            bad = archive.testzip()
    except zipfile.BadZipFile:
        return "it is truncated or not a torch checkpoint (no complete zip directory)"
    except OSError as err:
        return f"it cannot be read ({err.strerror or err})"
    return f"its entry {bad} is corrupt (checksum mismatch)" if bad else None


def not_resumable_reason(path: str | os.PathLike) -> str | None:
    """:func:`unreadable_reason`, or why a whole file is still no training checkpoint to resume from: it holds
    Python objects the safe unpickler refuses, or not Lightning's ``state_dict`` / ``loops`` / ``global_step``.
    Its tensors are memory-mapped, not read, so this costs little even for a 14 GB checkpoint."""
    problem = unreadable_reason(path)
    if problem:
        return problem
    try:
        content = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as err:
        return f"it holds Python objects the safe loader refuses ({str(err).splitlines()[0][:160]})"
    except Exception as err:  # a zip that is whole but no torch file of this torch
        return f"torch cannot load it ({type(err).__name__}: {str(err).splitlines()[0][:160] if str(err) else ''})"
    missing = [k for k in ("state_dict", "loops", "global_step") if not isinstance(content, dict) or k not in content]
    if missing:
        return (f"it is not a training checkpoint ({type(content).__name__} without {', '.join(missing)}); "
                "to start a new run from its weights use --finetune_from")
    return None


def newest_readable(ckpt_dir: str | os.PathLike, exclude: tuple[Path, ...] = ()) -> Path | None:
    """The most recently written checkpoint in ``ckpt_dir`` that a run can resume from (links such as best.ckpt
    skipped)."""
    candidates = [p for p in Path(ckpt_dir).glob("*.ckpt") if not p.is_symlink() and p not in exclude]
    for path in sorted(candidates, key=lambda p: p.stat().st_mtime, reverse=True):
        if not_resumable_reason(path) is None:
            return path
    return None


def remove_partial_writes(ckpt_dir: str | os.PathLike) -> list[tuple[str, int]]:
    """Delete what checkpoint writes killed mid-way (kill -9, a power cut) left behind: (name, bytes) of each."""
    removed = []
    for leftover in Path(ckpt_dir).glob(PARTIAL_GLOB):
        size = leftover.stat().st_size
        leftover.unlink(missing_ok=True)
        removed.append((leftover.name, size))
    return removed


class _WriteErrors:
    """A file for ``torch.save`` that keeps the first ``OSError`` of its writes: torch's zip writer turns a failed
    write into a bare ``RuntimeError`` ("unexpected pos ..."), losing the reason (a full disk)."""

    def __init__(self, f) -> None:
        self.f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self.f.write(data)
        except OSError as err:
            self.error = self.error or err
            raise

    def __getattr__(self, name: str) -> Any:  # tell, seek, ...: the file's own
        return getattr(self.f, name)


def atomic_torch_save(obj: Any, path: _PATH) -> None:
    """``torch.save`` that either fully replaces ``path`` or leaves it untouched, and survives a power cut."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    # The temporary name is hidden and unique: globbing for "*.ckpt" never picks up a half-written file, and
    # two processes saving at once (e.g. a stray duplicate job) cannot clobber each other's.
    with atomic_path(path, durable=True) as tmp, open(tmp, "wb") as f:
        out = _WriteErrors(f)
        try:
            torch.save(obj, out)
        except RuntimeError as err:
            if out.error is not None:
                raise out.error from err
            raise


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
        try:
            atomic_torch_save(checkpoint, path)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise DiskFullError(disk_full_message(os.path.abspath(os.fspath(path)), err)) from err
            raise

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
