"""A DDP run whose process dies stops at once, saying which rank died, instead of hanging or ending in tracebacks.

When main.py starts the other ranks itself (Lightning's subprocess launcher: ``--gpus 0,1`` or ``devices: N`` on one
machine), rank 0 holds their processes. :class:`RankWatch` polls them twice a second from a thread of rank 0; the
first that ends with an error or a signal is named in one line on stderr, with the step and the checkpoint to resume
from. Lightning's own observer then stops the others (within 5 s) and the collectives that lost their peer fail;
``ldm.launch`` turns those errors into that one line too (on every rank, naming what it knows), never a traceback.
A rank that hangs without dying (a stuck GPU) is ended by the collectives' timeout (torch's default, 30 minutes;
``lightning.trainer.strategy`` can set a ``DDPStrategy`` with another ``timeout``).
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import Optional

import pytorch_lightning as pl

from ldm.callbacks.faults import last_good_checkpoint

# What gloo and NCCL say when a peer of a collective is gone.
LOST_PEER = ("Connection reset by peer", "Connection closed by peer", "Broken pipe", "NCCL communicator was aborted",
             "Connection refused")


def describe_exit(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exited with status {returncode}"


def is_lost_peer(err: BaseException) -> bool:
    import torch.distributed as dist

    if isinstance(err, getattr(dist, "DistError", ())):
        return True
    return isinstance(err, RuntimeError) and any(mark in str(err) for mark in LOST_PEER)


class RankWatch(pl.Callback):
    """Rank 0 names the first of the processes it launched that dies (see the module docstring)."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__()
        self.interval = float(interval)
        self.report: Optional[str] = None  # the line, once a rank died
        self._stop = threading.Event()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
        if trainer.is_global_zero and procs and stage == "fit":
            threading.Thread(target=self._watch, args=(trainer, list(procs)), daemon=True, name="rank-watch").start()

    def _watch(self, trainer: pl.Trainer, procs: list) -> None:
        while not self._stop.wait(self.interval):
            for local, proc in enumerate(procs, start=1):
                code = proc.poll()
                if code:  # None: running; 0: finished normally
                    rank = trainer.node_rank * trainer.num_devices + local
                    self.report = lost_rank_line(trainer, f"rank {rank} (pid {proc.pid}) {describe_exit(code)}")
                    print(self.report, file=sys.stderr, flush=True)
                    return
            if all(p.returncode == 0 for p in procs):
                return

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._stop.set()


def lost_rank_line(trainer: pl.Trainer, what: str) -> str:
    ckpt = last_good_checkpoint(trainer) or "none written yet"
    run_dir = os.environ.get("SD_FINETUNE_RUN_DIR", "<run dir>")
    return (f"error: DDP: {what} at global step {trainer.global_step}; the other processes stop. The last good "
            f"checkpoint is {ckpt}; continue with: python main.py -r {run_dir}")


def watched_report(trainer: pl.Trainer) -> Optional[str]:
    """The line :class:`RankWatch` printed for this run, if it printed one (waiting a moment for it)."""
    watches = [cb for cb in trainer.callbacks if isinstance(cb, RankWatch)]
    for _ in range(int(2 / 0.1)):
        if not watches or any(w.report for w in watches):
            break
        time.sleep(0.1)
    return next((w.report for w in watches if w.report), None)
