"""Stop cleanly on NaN losses and keep a resumable checkpoint when a run is interrupted.

Two failure modes matter for long fine-tuning runs:

* the loss diverges to NaN/inf: every later step (and every later checkpoint) is garbage, so the run must stop
  at once, say at which step, and never overwrite a good checkpoint with NaN weights;
* the job is stopped from outside (Ctrl-C, SLURM/Kubernetes SIGTERM before preemption): the work since the last
  periodic checkpoint should be saved so ``-r`` can continue from the same global step.

SIGTERM in Lightning 2.6.6: right before the fit loop starts, ``Trainer._run`` calls
``_SignalConnector.register_signal_handlers()``, which installs (main thread only, not on Windows) a handler
that merely sets ``trainer.received_sigterm``. The training loop checks the flag at the end of each batch
(after ``on_train_batch_end``, i.e. after ModelCheckpoint), the evaluation loop after each batch and the fit
loop at epoch end, and raises ``SIGTERMException`` (a ``SystemExit`` subclass with code ``None``). Lightning
then calls every callback's ``on_exception`` and re-raises. So no extra signal handler is needed here.
"""
from __future__ import annotations

import logging
import os
from typing import Any, Optional

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import RunningStage, TrainerFn
from pytorch_lightning.utilities.exceptions import SIGTERMException

from ldm.util import ConfigError

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError, ConfigError):
    """The loss became NaN/inf. A subclass so handlers can tell it apart from other float errors; a ConfigError too,
    so main.py prints it as one line (the user acts on it: a lower LR, another config)."""


def last_good_checkpoint(trainer: Optional["pl.Trainer"]) -> Optional[str]:
    """Newest checkpoint the run's ModelCheckpoint callbacks wrote, for the error message."""
    if trainer is None:
        return None
    paths = [
        path
        for cb in trainer.checkpoint_callbacks
        for path in (getattr(cb, "last_model_path", ""), getattr(cb, "best_model_path", ""))
        if path and os.path.exists(path)
    ]
    return max(paths, key=os.path.getmtime) if paths else None


def check_finite(loss: torch.Tensor, step: int, last_checkpoint: Optional[str] = None) -> torch.Tensor:
    """Raise ``NonFiniteLossError`` if ``loss`` has a NaN/inf, else return it unchanged.

    Call it in ``training_step`` before returning the loss: raising there happens before backward, before the
    optimizer step and before any checkpoint callback of that step, so the weights stay finite. It syncs the
    device once per step (``.item()`` on a bool), a negligible cost next to a diffusion forward pass.
    """
    if not bool(torch.isfinite(loss.detach()).all()):
        kind = "nan" if bool(torch.isnan(loss.detach()).any()) else "inf"
        where = last_checkpoint or "none written yet"
        raise NonFiniteLossError(f"loss became {kind} at global step {step}; last good checkpoint is {where}")
    return loss


class NaNGuard(pl.Callback):
    """Stop training on a non-finite loss and refuse to write checkpoints holding non-finite weights.

    For modules that do not call :func:`check_finite` themselves. ``on_train_batch_end`` sees the loss after the
    optimizer step, so the weights may already be NaN; raising there is still in time because Lightning runs
    ModelCheckpoint callbacks after all other callbacks. ``on_save_checkpoint`` additionally checks the weights
    of every full checkpoint (not ``save_weights_only`` ones: Lightning skips callback hooks for those), which
    catches weights that went NaN while the loss printed finite (e.g. an overflowing gradient).
    """

    def __init__(self) -> None:
        super().__init__()
        self._step_of_batch = 0

    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        # global_step is incremented by the optimizer step; remember the value training_step saw.
        self._step_of_batch = trainer.global_step

    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            check_finite(loss, self._step_of_batch, last_good_checkpoint(trainer))

    def on_save_checkpoint(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict) -> None:
        bad = next(
            (
                name
                for name, value in checkpoint.get("state_dict", {}).items()
                if torch.is_tensor(value) and value.is_floating_point() and not bool(torch.isfinite(value).all())
            ),
            None,
        )
        if bad is not None:
            raise NonFiniteLossError(
                f"weight {bad} is not finite at global step {trainer.global_step}; refusing to save a checkpoint; "
                f"last good checkpoint is {last_good_checkpoint(trainer) or 'none written yet'}"
            )


class SaveOnInterrupt(pl.Callback):
    """Write ``<ckpt_dir>/<filename>`` when training is stopped by Ctrl-C or SIGTERM, and when it ends normally
    (``max_steps`` may end a run between the epochs at which ModelCheckpoint saves).

    The checkpoint is a full one (loops, optimizer, callbacks), so ``Trainer.fit(ckpt_path=...)`` resumes at the
    same global step even mid-epoch. Any other exception, in particular :class:`NonFiniteLossError`, saves
    nothing: the weights may be broken and must not replace a good ``last.ckpt``.

    Args:
        ckpt_dir: the run's checkpoint directory (the same one ModelCheckpoint writes ``last.ckpt`` into).
        filename: name of the file written there.
    """

    def __init__(self, ckpt_dir: str, filename: str = "last.ckpt") -> None:
        super().__init__()
        self.ckpt_dir = ckpt_dir
        self.filename = filename

    @property
    def ckpt_path(self) -> str:
        return os.path.join(self.ckpt_dir, self.filename)

    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # Skip when ModelCheckpoint already wrote this step: at SD size a checkpoint is over 10 GB.
        saved_steps = {getattr(cb, "_last_global_step_saved", None) for cb in trainer.checkpoint_callbacks}
        if trainer.global_step not in saved_steps:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        if not isinstance(exception, (KeyboardInterrupt, SIGTERMException)):
            return
        # Only while the fit loop runs: during setup or the sanity check the weights may not be restored from
        # the resume checkpoint yet, and saving them would replace a good last.ckpt with a worse one.
        if trainer.state.fn != TrainerFn.FITTING or trainer.state.stage not in (
            RunningStage.TRAINING,
            RunningStage.VALIDATING,
        ):
            return
        try:
            # Every rank must call this: strategies gather sharded state and barrier inside save_checkpoint.
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)
        except Exception:
            # Raising from on_exception would skip Lightning's teardown and hide the interrupt itself.
            log.exception("could not write %s while stopping", self.ckpt_path)
            return
        if trainer.is_global_zero:
            log.warning(
                "%s at global step %d: saved %s; resume with -r",
                type(exception).__name__,
                trainer.global_step,
                self.ckpt_path,
            )
