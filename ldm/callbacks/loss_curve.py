"""Draw the run's loss curve into the run directory when training ends, crashes or is interrupted.

A PNG next to the checkpoints answers "did it converge / when did it diverge" without starting TensorBoard,
which is what one wants after a crash or when only the run directory was copied off a cluster.
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import pandas as pd
import pytorch_lightning as pl
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.utilities.rank_zero import rank_zero_only

log = logging.getLogger(__name__)


def _loss_columns(frame: pd.DataFrame, prefix: str) -> list[str]:
    """Logged loss columns of one phase, e.g. ``train/loss_simple_step``; epoch aggregates are skipped."""
    return [
        col
        for col in frame.columns
        if col.startswith(prefix) and "loss" in col and not col.endswith("_epoch") and frame[col].notna().any()
    ]


def plot_loss_curve(metrics_csv: str, out_path: str) -> bool:
    """Plot train (raw + smoothed) and validation losses against global step; return whether a PNG was written."""
    frame = pd.read_csv(metrics_csv)
    if "step" not in frame.columns:
        return False
    train_cols = _loss_columns(frame, "train") or [c for c in ("loss",) if c in frame.columns]
    val_cols = _loss_columns(frame, "val")
    if not train_cols and not val_cols:
        return False

    # The object-oriented API with an explicit Agg canvas: no pyplot global state, no display needed,
    # and safe to call from whatever thread Lightning is in.
    fig = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, col in enumerate(train_cols):
        series = frame[["step", col]].dropna()
        color = f"C{i}"
        ax.plot(series["step"], series[col], color=color, alpha=0.25, linewidth=0.8)
        # EMA over ~5% of the points: fine noise averaged out, a divergence still shows up within a few steps.
        span = max(2, len(series) // 20)
        smooth = series[col].ewm(span=span).mean()
        ax.plot(series["step"], smooth, color=color, linewidth=1.8, label=f"{col} (smoothed)")
    for i, col in enumerate(val_cols, start=len(train_cols)):
        series = frame[["step", col]].dropna()
        ax.plot(series["step"], series[col], color=f"C{i}", marker="o", markersize=3, linewidth=1.2, label=col)
    ax.set_xlabel("global step")
    ax.set_ylabel("loss")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="upper right", fontsize="small")
    fig.tight_layout()
    fig.savefig(out_path)
    return True


class LossCurve(pl.Callback):
    """Write ``<logdir>/<filename>`` from the run's CSV metrics at the end of fit and on exceptions.

    Args:
        logdir: the run directory the PNG goes into.
        filename: name of the PNG.
        metrics_csv: explicit metrics file; by default the first ``CSVLogger`` of the trainer is used.
    """

    def __init__(self, logdir: str, filename: str = "loss_curve.png", metrics_csv: Optional[str] = None) -> None:
        super().__init__()
        self.logdir = logdir
        self.filename = filename
        self.metrics_csv = metrics_csv

    def _csv_path(self, trainer: "pl.Trainer") -> Optional[str]:
        if self.metrics_csv:
            return self.metrics_csv
        for logger in trainer.loggers:
            if isinstance(logger, CSVLogger):
                # Rows are buffered in memory until flush_logs_every_n_steps; at fit end and on exceptions
                # this hook runs before Lightning finalizes the loggers, so flush now.
                logger.save()
                return logger.experiment.metrics_file_path
        return None

    @rank_zero_only
    def _draw(self, trainer: "pl.Trainer") -> None:
        csv_path = self._csv_path(trainer)
        if not csv_path or not os.path.isfile(csv_path):
            return
        out_path = os.path.join(self.logdir, self.filename)
        os.makedirs(self.logdir, exist_ok=True)
        try:
            if plot_loss_curve(csv_path, out_path):
                log.info("loss curve written to %s", out_path)
        except Exception:
            # A plotting problem must never turn a finished run (or the original crash) into a new failure.
            log.exception("could not draw the loss curve from %s", csv_path)

    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._draw(trainer)

    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._draw(trainer)
