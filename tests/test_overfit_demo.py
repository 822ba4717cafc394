"""The knowing-when-to-stop demo (configs/demo/digits-overfit.yaml): the digits model on 200 digits until it
memorises them. Validation loss falls, then rises; the run says so once, keeps best.ckpt earlier than the last
checkpoint, and the best checkpoint's samples follow prompts as well as the last one's while copying the training
digits less. Measured (1200 steps): val/loss lowest at step 500 (98% prompt-following, samples 0.290 from the
nearest training digit vs 0.257 for real unseen digits), the line printed at step 800; at 1100, 100% but 0.230
from the nearest training digit: copying. Slow (several minutes on 2 cores): `make test-all`."""
from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, main_py, run_dirs

DEMO = REPO / "configs" / "demo" / "digits.yaml"
OVERFIT = REPO / "configs" / "demo" / "digits-overfit.yaml"


@pytest.mark.slow
def test_small_subset_run_detects_the_turn_and_keeps_an_earlier_better_checkpoint(tmp_path):
    from ldm.callbacks.digit_eval import DigitScore
    from ldm.data.digits import DigitsSplit
    from ldm.inference import load

    proc = main_py("-t", "--base", DEMO, OVERFIT, "-l", tmp_path, "lightning.trainer.max_steps=1000",
                   "lightning.callbacks.digit_score.params.on_validation=false", timeout=1800)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if "validation loss has not improved" in ln]
    assert len(lines) == 1, proc.stdout[-3000:]
    (run,) = run_dirs(tmp_path)
    scores = json.loads((run / "checkpoints" / "scores.json").read_text())
    best = next(c for c in scores["checkpoints"] if c["file"] == scores["best"])
    assert scores["overfitting"] is not None and best["step"] < scores["validations"][-1]["step"]
    assert (run / "checkpoints" / "best.ckpt").resolve().name == scores["best"]
    score = DigitScore(n_per_class=10)
    score.split = DigitsSplit(per_class=20)  # copying is measured against the 200 digits it trained on
    figures = {}
    for name in ("best.ckpt", "last.ckpt"):
        model = load(run / "checkpoints" / name, device=torch.device("cpu"))
        figures[name] = score.evaluate_once(model, tmp_path / f"{name}.png")
    best_fig, last_fig = figures["best.ckpt"], figures["last.ckpt"]
    assert best_fig["val/prompt_accuracy"] >= last_fig["val/prompt_accuracy"] - 0.05  # 100 samples: a few of noise
    assert best_fig["val/nearest_train_distance"] > last_fig["val/nearest_train_distance"]  # it copies less
