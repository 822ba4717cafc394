"""Every checkpoint holds the random states of every process; a resumed run puts them back before its first step.

The training step draws its timesteps, noise and caption dropout from torch's global generators (CPU and CUDA), so
without this a resumed run would draw other numbers than the run that was never stopped. Saved at the moment the
checkpoint is written (after the step that precedes it) and restored right before the next training step, so
whatever a resumed run does first (the sanity check, filling caches, making class images) cannot shift them. The
data's randomness does not come from these states at all (``ldm.data.resume``).
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch


def capture() -> dict[str, Any]:
    # Plain types and tensors only: checkpoints are read with torch's weights_only unpickler, which refuses arrays.
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"python": random.getstate(), "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos),
                                                     int(has_gauss), float(gauss)],
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this process's device
    return state


def restore(state: dict[str, Any]) -> None:
    random.setstate(_as_python_state(state["python"]))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_python_state(state: Any) -> tuple:
    # A checkpoint's lists come back as lists; random.setstate wants tuples.
    version, internal, gauss = state
    return int(version), tuple(int(x) for x in internal), gauss


class RandomState(pl.Callback):
    """Saves each rank's random states under ``random_state`` in the checkpoint's callback states; restores this
    rank's before the first training step after a resume."""

    def __init__(self) -> None:
        super().__init__()
        self._pending: dict[str, Any] | None = None

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        # Every rank runs this (a checkpoint is saved collectively); rank 0 writes what all of them sent.
        mine = capture()
        if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            states: list = [None] * trainer.world_size
            torch.distributed.all_gather_object(states, mine)
        else:
            states = [mine]
        checkpoint["random_state"] = {"ranks": states}

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        ranks = (checkpoint.get("random_state") or {}).get("ranks") or []
        if len(ranks) == trainer.world_size:  # another number of processes cannot continue the same draws
            self._pending = ranks[trainer.global_rank]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending is not None:
            restore(self._pending)
            self._pending = None
