"""Checkpoints that say which one is best, and a run that says when it started to overfit.

``RunCheckpoint`` is Lightning's ``ModelCheckpoint`` (every parameter as documented there: ``every_n_epochs``,
``save_top_k``, ``monitor``, ...; configured under ``lightning.modelcheckpoint.params``) that also keeps

- ``checkpoints/scores.json``: every validation's loss, every checkpoint with its step, epoch and the validation
  loss of the weights it holds, the best checkpoint and, once detected, the overfitting point;
- ``checkpoints/best.ckpt``: a link to the kept checkpoint with the lowest validation loss;

and prints one line when the validation loss has not improved for ``overfit_patience`` validations in a row:
since which step, and which checkpoint holds the best weights. Stopping there is Lightning's ``EarlyStopping``
(``lightning.callbacks.early_stopping``), off by default.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from pytorch_lightning.callbacks import ModelCheckpoint

from ldm.util import atomic_path

SCORES = "scores.json"
BEST = "best.ckpt"


class RunCheckpoint(ModelCheckpoint):
    def __init__(self, *args, score: str = "val/loss", overfit_patience: int = 3, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.score, self.overfit_patience = score, int(overfit_patience)
        self.scores: dict = {"validations": [], "checkpoints": [], "best": None, "overfitting": None}

    # ---- bookkeeping ------------------------------------------------------------------------------------------
    def setup(self, trainer, pl_module, stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        path = self._scores_path()
        if path is not None and path.is_file():  # a resumed run continues its history
            self.scores = json.loads(path.read_text())

    def _scores_path(self) -> Path | None:
        return Path(self.dirpath) / SCORES if self.dirpath else None

    def _latest_score(self) -> tuple[int, float] | None:
        return (self.scores["validations"][-1]["step"], self.scores["validations"][-1]["val_loss"]) \
            if self.scores["validations"] else None

    def on_validation_end(self, trainer, pl_module) -> None:
        value = trainer.callback_metrics.get(self.score)
        if value is not None and not trainer.sanity_checking:
            step = int(trainer.global_step)
            self.scores["validations"] = [v for v in self.scores["validations"] if v["step"] != step]
            self.scores["validations"].append({"step": step, "epoch": int(trainer.current_epoch),
                                               "val_loss": float(value)})
        super().on_validation_end(trainer, pl_module)  # may save: the checkpoint then carries this validation
        if value is not None and not trainer.sanity_checking and trainer.is_global_zero:
            self._check_overfitting()
            self._write()

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if not trainer.is_global_zero or Path(filepath).name == BEST:
            return
        latest = self._latest_score()
        row = {"file": Path(filepath).name, "step": int(trainer.global_step), "epoch": int(trainer.current_epoch),
               "val_loss": latest[1] if latest else None, "val_step": latest[0] if latest else None}
        self.scores["checkpoints"] = [c for c in self.scores["checkpoints"] if c["file"] != row["file"]] + [row]
        self._write()

    def _remove_checkpoint(self, trainer, filepath: str) -> None:
        super()._remove_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            self.scores["checkpoints"] = [c for c in self.scores["checkpoints"] if c["file"] != Path(filepath).name]
            self._write()

    # ---- best and overfitting ---------------------------------------------------------------------------------
    def best_checkpoint(self) -> dict | None:
        """The kept checkpoint (``last.ckpt`` aside) with the lowest validation loss."""
        scored = [c for c in self.scores["checkpoints"] if c["val_loss"] is not None and c["file"] != "last.ckpt"
                  and (Path(self.dirpath) / c["file"]).is_file()]
        return min(scored, key=lambda c: (c["val_loss"], c["step"])) if scored else None

    def _check_overfitting(self) -> None:
        history = self.scores["validations"]
        if self.scores["overfitting"] is not None or self.overfit_patience < 1 or len(history) <= self.overfit_patience:
            return
        best = min(range(len(history)), key=lambda i: (history[i]["val_loss"], i))
        if len(history) - 1 - best < self.overfit_patience:
            return
        checkpoint = self.best_checkpoint()
        self.scores["overfitting"] = {"since_step": history[best]["step"], "best_val_loss": history[best]["val_loss"],
                                      "best": checkpoint["file"] if checkpoint else None,
                                      "best_step": checkpoint["step"] if checkpoint else None,
                                      "detected_at_step": history[-1]["step"]}
        where = (f"the best checkpoint is checkpoints/{checkpoint['file']} (step {checkpoint['step']}, val/loss "
                 f"{checkpoint['val_loss']:.4f})") if checkpoint else "no checkpoint was kept at its best"
        print(f"validation loss has not improved for {len(history) - 1 - best} validations since step "
              f"{history[best]['step']} ({history[best]['val_loss']:.4f} then, {history[-1]['val_loss']:.4f} now): "
              f"the model is likely overfitting; {where}")

    def _write(self) -> None:
        path = self._scores_path()
        if path is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        best = self.best_checkpoint()
        self.scores["best"] = best["file"] if best else None
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.scores, indent=1))
        link = path.parent / BEST
        if best is None:
            link.unlink(missing_ok=True)
        elif not link.is_symlink() or os.readlink(link) != best["file"]:
            tmp = path.parent / f".{BEST}.{os.getpid()}.part"
            tmp.unlink(missing_ok=True)
            os.symlink(best["file"], tmp)  # relative: the run dir can move
            os.replace(tmp, link)
