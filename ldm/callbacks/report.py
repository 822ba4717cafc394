"""Rewrite the run's ``report.html`` after every validation, at the end of fit, and when the run stops on an error or
Ctrl-C, so the run dir always holds a current page that opens from disk (see ``ldm.report``)."""
from __future__ import annotations

import logging
import time
from pathlib import Path

import pytorch_lightning as pl
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

from ldm.report import ReportBuilder
from ldm.util import atomic_path

log = logging.getLogger(__name__)


class RunReport(pl.Callback):
    """Write ``<logdir>/<filename>`` (rank 0 only).

    Args:
        logdir: the run directory; the report reads ``metrics.csv``, ``images/``, ``progress/``, ``checkpoints/``,
            ``configs/`` and ``command.txt`` there.
        embed_images: put the images into the file as ``data:`` URIs (downscaled to ``max_px``) instead of linking
            them by relative path: one file that can be sent on its own, larger and slower to rewrite.
        max_frames: slider positions per split; longer histories are thinned evenly.
        disabled: write nothing.
    """

    def __init__(self, logdir: str, filename: str = "report.html", embed_images: bool = False, max_px: int = 768,
                 max_frames: int = 100, disabled: bool = False) -> None:
        super().__init__()
        self.path = Path(logdir) / filename
        self.builder = ReportBuilder(logdir, embed_images=embed_images, max_px=max_px, max_frames=max_frames)
        self.disabled = disabled
        self.checkpoints = Path(logdir) / "checkpoints"
        self._checkpoints_seen: int | None = None  # the folder's mtime at the last write
        self.seconds = 0.0  # time spent in the last write, for tests and for anyone wondering what it costs

    @rank_zero_only
    def write(self, trainer: pl.Trainer, status: str) -> None:
        if self.disabled:
            return
        start = time.perf_counter()
        self._checkpoints_seen = self._checkpoints_stamp()
        try:
            for logger in trainer.loggers:
                if isinstance(logger, CSVLogger):
                    # Rows are buffered until flush_logs_every_n_steps; the validation just logged must be shown.
                    logger.save()
            skipped = getattr(trainer.datamodule, "skipped_files", None)  # {split: [file]} from our DataModule
            html = self.builder.build(status=status, skipped=skipped)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(self.path) as tmp:
                tmp.write_text(html, encoding="utf-8")
        except Exception as err:  # a report must never stop (or replace the error of) a training run
            log.warning("run report not written to %s: %s: %s", self.path, type(err).__name__, err)
        self.seconds = time.perf_counter() - start

    def _checkpoints_stamp(self) -> int:
        # Checkpoints and scores.json are written by rename, so a new or replaced one changes the folder's mtime.
        try:
            return self.checkpoints.stat().st_mtime_ns
        except OSError:
            return 0

    @rank_zero_only
    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        # Lightning runs checkpoint callbacks after all others, so the checkpoint saved at a validation or an epoch
        # end is missing from that write; one stat per step notices it and the page follows at the next step.
        if self._checkpoints_seen is None:
            self._checkpoints_seen = self._checkpoints_stamp()
        elif not self.disabled and self._checkpoints_stamp() != self._checkpoints_seen:
            self.write(trainer, f"after the checkpoint before step {trainer.global_step}")

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.write(trainer, f"after the validation at step {trainer.global_step}")

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.write(trainer, f"training ended at step {trainer.global_step}")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        reason = type(exception).__name__
        self.write(trainer, f"stopped at step {trainer.global_step} by {reason}")
