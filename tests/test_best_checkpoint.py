"""The checkpoint callback keeps scores.json and best.ckpt, and says once when validation loss stopped improving;
EarlyStopping (off by default) ends such a run. A scripted validation loss makes the turn exact."""
from __future__ import annotations

import json
import os

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from ldm.callbacks.checkpoints import RunCheckpoint

VAL_LOSSES = [1.0, 0.8, 0.7, 0.75, 0.8, 0.9, 0.95, 1.0]  # best at the third validation, then rising


class Scripted(pl.LightningModule):
    """Trains a real (tiny) layer; its val/loss is the script's next value."""

    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(2, 1)
        self.validations = 0

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", VAL_LOSSES[min(self.validations, len(VAL_LOSSES) - 1)])

    def on_validation_epoch_end(self):
        self.validations += 1

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def run(tmp_path, callbacks, epochs=len(VAL_LOSSES)):
    data = DataLoader(TensorDataset(torch.randn(4, 2)), batch_size=2)
    checkpoint = RunCheckpoint(dirpath=str(tmp_path / "checkpoints"), filename="{epoch:06}", save_last=True,
                               save_top_k=-1, every_n_epochs=1, overfit_patience=3)
    trainer = pl.Trainer(accelerator="cpu", max_epochs=epochs, logger=False, enable_progress_bar=False,
                         enable_model_summary=False, num_sanity_val_steps=0, callbacks=[checkpoint, *callbacks])
    trainer.fit(Scripted(), data, data)
    return trainer, json.loads((tmp_path / "checkpoints" / "scores.json").read_text())


def test_scores_best_link_and_one_overfitting_line(tmp_path, capsys):
    _, scores = run(tmp_path, [])
    assert [v["val_loss"] for v in scores["validations"]] == pytest.approx(VAL_LOSSES)
    files = {c["file"]: c["val_loss"] for c in scores["checkpoints"]}
    assert files["epoch=000002.ckpt"] == pytest.approx(0.7) and files["epoch=000007.ckpt"] == pytest.approx(1.0)
    assert scores["best"] == "epoch=000002.ckpt"
    best = tmp_path / "checkpoints" / "best.ckpt"
    assert best.is_symlink() and os.readlink(best) == "epoch=000002.ckpt"
    assert torch.load(best, weights_only=False)["epoch"] == 2
    lines = [ln for ln in capsys.readouterr().out.splitlines() if "has not improved" in ln]
    assert len(lines) == 1  # said once, when the third worse validation came in
    assert "since step 6 (0.7000 then, 0.9000 now)" in lines[0] and "checkpoints/epoch=000002.ckpt" in lines[0]
    assert scores["overfitting"]["since_step"] == 6 and scores["overfitting"]["best"] == "epoch=000002.ckpt"


def test_early_stopping_ends_the_run_at_the_turn(tmp_path):
    stop = pl.callbacks.EarlyStopping(monitor="val/loss", patience=2, mode="min")
    trainer, scores = run(tmp_path, [stop])
    assert len(scores["validations"]) == 5 and trainer.current_epoch == 5  # 0.7, then two worse: stop
    assert scores["best"] == "epoch=000002.ckpt"


def test_a_resumed_run_keeps_its_score_history(tmp_path):
    run(tmp_path, [], epochs=3)
    _, scores = run(tmp_path, [], epochs=2)  # a new callback in the same run dir (as -r does)
    assert len(scores["validations"]) == 3 + 2 - 2  # steps 2 and 4 were validated again and replaced
