"""Set PyTorch's CPU thread count from the config, for runs whose speed depends on it.

PyTorch's OpenMP workers busy-wait at every parallel region. For small models on a CPU that another program
is also using, a descheduled worker stalls every operator: on a busy 2-core machine the digits demo ran
6-10x slower with 2 threads than with 1. ``OMP_NUM_THREADS`` does the same from the shell.
"""
from __future__ import annotations

import pytorch_lightning as pl
import torch


class TorchThreads(pl.Callback):
    """``torch.set_num_threads(threads)`` when the trainer sets up, before the first step."""

    def __init__(self, threads: int = 1):
        super().__init__()
        if int(threads) < 1:
            raise ValueError(f"TorchThreads: threads must be >= 1, got {threads}")
        self.threads = int(threads)

    def setup(self, trainer, pl_module, stage: str) -> None:
        torch.set_num_threads(self.threads)
