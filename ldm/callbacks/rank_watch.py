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
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.callbacks.faults import last_good_checkpoint

LAUNCHED_BY = "SD_FINETUNE_LAUNCHER_PID"  # set by rank 0 for the ranks it starts (ldm.launch)

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
    """Rank 0 names the first of the processes it launched that dies; a launched rank whose rank 0 is gone stops
    at once; rank 0 failing on its own (a full disk) takes the ranks it launched with it (see the module docstring)."""

    def __init__(self, interval: float = 0.5) -> None:
        super().__init__()
        self.interval = float(interval)
        self.report: Optional[str] = None  # the line, once a rank died
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.world_size < 2:
            return
        procs = getattr(getattr(trainer.strategy, "launcher", None), "procs", None) or []
        if trainer.is_global_zero and procs:
            threading.Thread(target=self._watch, args=(trainer, list(procs)), daemon=True, name="rank-watch").start()
        elif os.environ.get(LAUNCHED_BY) == str(os.getppid()):
            # Launched by rank 0 (ldm.launch marks it): on NCCL a collective would wait for a dead rank 0 until
            # its timeout, so watch the parent instead.
            threading.Thread(target=self._watch_parent, args=(trainer, os.getppid()), daemon=True,
                             name="rank-watch").start()

    def say(self, line: str) -> bool:
        """Print ``line`` unless a line was printed already; whether this one was."""
        with self._lock:
            if self.report is not None:
                return False
            self.report = line
        print(line, file=sys.stderr, flush=True)
        return True

    def _watch(self, trainer: pl.Trainer, procs: list) -> None:
        while not self._stop.wait(self.interval):
            if self._dead_rank(trainer, procs) or all(p.returncode == 0 for p in procs):
                return

    def _dead_rank(self, trainer: pl.Trainer, procs: list) -> bool:
        """Name the first launched rank that has ended with an error or a signal, if any."""
        for local, proc in enumerate(procs, start=1):
            code = proc.poll()
            if code:  # None: running; 0: finished normally
                rank = trainer.node_rank * trainer.num_devices + local
                self.say(lost_rank_line(trainer, f"rank {rank} (pid {proc.pid}) {describe_exit(code)}"))
                return True
        return False

    def _watch_parent(self, trainer: pl.Trainer, parent: int) -> None:
        while not self._stop.wait(self.interval):
            if os.getppid() != parent:
                if self.say(lost_rank_line(trainer, f"rank {trainer.global_rank} lost the other processes "
                                                    f"(rank 0, pid {parent}, is gone)")):
                    os._exit(1)
                return

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # After SaveOnInterrupt (listed before this): an interrupt stops every rank by itself, and saving needs them.
        launcher = getattr(trainer.strategy, "launcher", None)
        if trainer.is_global_zero and getattr(launcher, "procs", None) and \
                not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            self._stop.set()
            if is_lost_peer(exception):
                self._dead_rank(trainer, launcher.procs)  # name it now, before the others are killed too
            launcher.kill(signal.SIGKILL)  # they would wait for this rank in their next collective

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


def say_once(trainer: pl.Trainer, line: str) -> None:
    """Print ``line`` unless this process's :class:`RankWatch` has printed its own already."""
    watch = next((cb for cb in trainer.callbacks if isinstance(cb, RankWatch)), None)
    if watch is None:
        print(line, file=sys.stderr, flush=True)
    else:
        watch.say(line)
