"""A CSV logger that keeps a resumed run's metrics history.

Lightning's CSV writer deletes an existing ``metrics.csv`` when it starts, assuming a new experiment that reuses
a directory. A run continued with ``main.py -r`` logs into its own run dir, so every step before the resume,
and the loss curve drawn from them, would be lost. Here the old rows stay and the new ones are appended. Rows
logged again by the resumed run (after ``-r`` to an older epoch checkpoint) appear twice with the same step.
"""
from __future__ import annotations

import csv

from pytorch_lightning.loggers import CSVLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter
from pytorch_lightning.loggers.logger import rank_zero_experiment


class _AppendingWriter(ExperimentWriter):
    def _check_log_dir_exists(self) -> None:
        # Called by the writer's __init__ in place of deleting the file: start from its header, so
        # ``save`` appends (or rewrites the header when new columns appear) instead of starting over.
        if self._fs.isfile(self.metrics_file_path):
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = list(csv.DictReader(f).fieldnames or [])


class HistoryCSVLogger(CSVLogger):
    """``CSVLogger`` that appends to an existing ``metrics.csv`` instead of deleting it."""

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _AppendingWriter(log_dir=self.log_dir)
        return self._experiment
