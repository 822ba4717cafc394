"""Test-only callbacks, given to main.py through ``lightning.callbacks.<name>: {target: tests.ddp_probe.Probe}``.

``Probe`` records, per process, what a DDP test needs to see from the outside: the rank, the run dir the
process uses, a hash of the gradients (after DDP's all-reduce) and of the trainable weights at every step, the
captions each rank trained on, and every file the process created or wrote inside the run dir (through a
Python audit hook, which sees ``open``/``os.open`` for writing, ``mkdir`` and renames). ``SignalAt`` sends
a signal to its own process after a given global step, so interrupt handling is tested without timing races.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
from pathlib import Path

import pytorch_lightning as pl

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def tensor_hash(tensors) -> str:
    """sha256 over the exact bytes, so "equal" means bit-identical."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Probe(pl.Callback):
    """Writes ``<out_dir>/rank<global rank>.json`` when fit ends."""

    def __init__(self, out_dir: str):
        super().__init__()
        self.out_dir = Path(out_dir)
        self.record = {"steps": [], "grad_hashes": [], "weight_hashes": [], "captions": [], "shapes": [],
                       "written": []}
        # main.py sets the run dir before building callbacks, in every process; hooking here (not in setup)
        # also sees what SetupCallback writes. An audit hook cannot be removed; it only appends to a list.
        self._run_dir = os.path.abspath(os.environ["SD_FINETUNE_RUN_DIR"])
        sys.addaudithook(self._audit)

    def _audit(self, event: str, args: tuple) -> None:
        if event not in ("open", "os.mkdir", "os.rename"):
            return
        if event == "open" and (not isinstance(args[0], (str, os.PathLike)) or not (args[2] or 0) & _WRITE_FLAGS):
            return
        path = os.path.abspath(os.fspath(args[0]) if not isinstance(args[0], bytes) else args[0].decode())
        if path.startswith(self._run_dir + os.sep) or path == self._run_dir:
            self.record["written"].append(f"{event} {os.path.relpath(path, self._run_dir)}")

    def setup(self, trainer, pl_module, stage: str) -> None:
        cb_dirs = {type(cb).__name__: str(getattr(cb, "logdir", getattr(cb, "dirpath", "")))
                   for cb in trainer.callbacks}
        self.record.update(rank=trainer.global_rank, world_size=trainer.world_size, pid=os.getpid(),
                           run_dir=self._run_dir, callback_dirs=cb_dirs)

    def _trainable(self, pl_module):
        return [p for p in pl_module.parameters() if p.requires_grad]

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.record["grad_hashes"].append(tensor_hash(p.grad for p in self._trainable(pl_module) if p.grad is not None))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.record["steps"].append(trainer.global_step)
        self.record["weight_hashes"].append(tensor_hash(self._trainable(pl_module)))
        self.record["captions"].append(list(batch["caption"]))
        pixels = batch.get("image", batch.get("image_moments"))
        self.record["shapes"].append(list(pixels.shape))

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        out = self.out_dir / f"rank{trainer.global_rank}.json"
        out.write_text(json.dumps(self.record, indent=1))


class SignalAt(pl.Callback):
    """Send the signal named ``signame`` (e.g. ``SIGTERM``) to this process once, after global step ``step``."""

    def __init__(self, step: int, signame: str = "SIGTERM"):
        super().__init__()
        self.step, self.signum, self.sent = step, getattr(signal, signame), False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if not self.sent and trainer.global_step >= self.step:
            self.sent = True
            os.kill(os.getpid(), self.signum)


class BatchLog(pl.Callback):
    """Appends one JSON line per training step to ``<path>``: global step, epoch, batch index, the captions and a
    hash of the images the step trained on and of the loss, so runs that were stopped and resumed can be compared
    step by step with one that was not (a resumed run appends to the same file)."""

    def __init__(self, path: str):
        super().__init__()
        self.path = Path(path)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        pixels = batch.get("image", batch.get("image_moments"))
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        line = {"step": trainer.global_step, "epoch": trainer.current_epoch, "batch_idx": batch_idx,
                "captions": list(batch["caption"]), "images": tensor_hash([pixels]), "loss": float(loss)}
        if trainer.is_global_zero:
            with open(self.path, "a") as f:
                f.write(json.dumps(line) + "\n")


class SlowCheckpointWrites(pl.Callback):
    """With ``SLOW_CHECKPOINT_WRITES=<seconds>`` in the environment, every write of a checkpoint's bytes sleeps that
    long, so a test can kill the process while a checkpoint is half written (the partial file is on disk)."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        delay = float(os.environ.get("SLOW_CHECKPOINT_WRITES") or 0)
        if not delay:
            return
        import time

        from ldm.callbacks import checkpoint_io

        write = checkpoint_io._WriteErrors.write

        def slow_write(self, data):
            time.sleep(delay)
            return write(self, data)

        checkpoint_io._WriteErrors.write = slow_write
