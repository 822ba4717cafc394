"""The digits image-variations demo: the class-kept score itself, and the config training end to end briefly."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ldm.callbacks.variation_eval import VariationScore, heldout_inputs
from tests.conftest import main_py, run_dirs

REPO = Path(__file__).resolve().parents[1]


class Echo(torch.nn.Module):
    """A stand-in model whose 'variations' are its inputs (a perfect variation model) or one fixed digit."""

    def __init__(self, fixed: torch.Tensor | None = None):
        super().__init__()
        self.fixed = fixed

    @property
    def device(self):
        return torch.device("cpu")

    def generate(self, conds, seeds, size, **kwargs):
        assert len(seeds) == len(conds) and size == 8
        return conds.clone() if self.fixed is None else self.fixed.expand_as(conds).clone()


def test_score_is_the_classifier_accuracy_for_copies_and_chance_for_a_constant(tmp_path):
    cb = VariationScore(n_per_class=5)
    copies, inputs, outputs = cb.score(Echo())
    assert copies >= 0.9 and torch.equal(inputs, outputs) and inputs.shape == (50, 1, 8, 8)
    x, labels = heldout_inputs(1, 8, 1)
    constant, _, _ = cb.score(Echo(fixed=x[3:4]))
    assert constant == 0.1  # every output is the same 3: right for the five 3s only
    cb.save_grid(inputs, outputs, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 0


def test_copying_figures_catch_a_copier_and_a_constant(tmp_path):
    """A copier of its input scores the classifier's ceiling: its distance to the input (0) gives it away against
    the distance from a real digit to another of its class; a constant has no diversity within a class."""
    cb = VariationScore(n_per_class=5)
    copier = cb.evaluate_once(Echo(), tmp_path / "copies.png")
    assert copier["val/class_kept"] >= 0.9
    assert copier["val/input_distance"] == 0.0 and copier["val/real_input_distance"] > 0.2
    assert copier["val/sample_diversity"] == pytest.approx(copier["val/real_diversity"], rel=0.3)
    x, _ = heldout_inputs(1, 8, 1)
    constant = cb.evaluate_once(Echo(fixed=x[3:4]), tmp_path / "constant.png")
    assert constant["val/sample_diversity"] < 1e-6 < 0.3 < constant["val/real_diversity"]
    assert constant["val/input_distance"] > 0.3
    line = cb.figure(copier, tmp_path / "copies.png")
    assert "a variation is 0.000 from its input" in line and "two samples of one class differ by" in line, line


def test_demo_config_trains_and_prints_the_figure(tmp_path):
    r = main_py("-t", "--base", REPO / "configs" / "demo" / "digits-variations.yaml", "-l", tmp_path, "-n", "dv",
                "lightning.trainer.max_steps=6", "lightning.trainer.enable_progress_bar=false",
                "lightning.callbacks.variation_score.params.n_per_class=2",
                "lightning.callbacks.variation_score.params.steps=3", timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "variations keep their input's class:" in r.stdout and "from its input (the nearest other" in r.stdout
    run = run_dirs(tmp_path)[0]
    assert (run / "digit_variations.png").exists() and (run / "checkpoints" / "last.ckpt").exists()
    header = (run / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"val/class_kept", "val/input_distance", "val/real_input_distance", "val/sample_diversity",
            "val/nearest_train_distance"} <= set(header), header
