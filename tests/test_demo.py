"""The digits demo (configs/demo/digits.yaml): its data, its scorer, and the run through main.py.

The scorer is proven on real digits (it must recognise them) and on noise (it must not find the prompted digit
in it), so the demo's prompt-following figure means what it says. The full 800-step demo is marked slow.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from ldm.callbacks.digit_eval import DigitClassifier, DigitScore
from ldm.data.digits import DigitsDataset, digit_caption, split_digits, to_model_range
from tests.conftest import REPO, main_py, run_dirs

DEMO = REPO / "configs" / "demo" / "digits.yaml"
FIGURE = re.compile(r"step (\d+): prompt-following accuracy: ([\d.]+)% \(chance 10%, classifier on real held-out "
                    r"digits ([\d.]+)%\)")


@pytest.fixture(scope="module")
def classifier() -> DigitClassifier:
    return DigitClassifier()


def test_dataset_items_and_split():
    train, val = DigitsDataset("train"), DigitsDataset("val", size=16, channels=3, caption_template="the number {word}")
    assert len(train) + len(val) == 1797 and 150 < len(val) < 200
    item = train[0]
    assert item["image"].shape == (1, 8, 8) and item["caption"] == f"a handwritten digit {item['label']}"
    assert item["image"].min() >= -1 and item["image"].max() <= 1 and item["image"].min() == -1  # background is black
    assert val[0]["image"].shape == (3, 16, 16)
    assert val[0]["caption"] == f"the number {('zero one two three four five six seven eight nine').split()[val[0]['label']]}"
    assert sorted(set(val.labels.tolist())) == list(range(10))  # stratified: every class held out


def test_classifier_recognises_real_digits_at_any_size(classifier):
    images, labels = split_digits("val")
    assert classifier.heldout_accuracy > 0.95
    for size, channels in ((8, 1), (16, 3)):  # samples at 16x16 RGB are pooled back to the 8x8 features
        assert classifier.accuracy(to_model_range(images, size, channels), labels) > 0.9


def test_classifier_does_not_find_digits_in_noise(classifier):
    noise = torch.rand(500, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    labels = np.arange(500) % 10
    assert classifier.accuracy(noise, labels) < 0.25
    assert classifier.accuracy(-torch.ones(100, 1, 8, 8), labels[:100]) <= 0.1 + 1e-9  # blank images: one class


def test_score_uses_class_major_prompts_and_fixed_seeds(classifier):
    score = DigitScore(n_per_class=3, seed=5)
    captions, labels, seeds = score.prompts()
    assert captions[:4] == [digit_caption(0)] * 3 + [digit_caption(1)] and labels[-1] == 9
    assert seeds == list(range(5, 35))

    class Perfect(torch.nn.Module):
        """A stand-in model whose "samples" are real digits of the prompted class."""

        def generate(self, captions, seeds, **kwargs):
            images, y = split_digits("val")
            picks = [np.flatnonzero(y == int(c[-1]))[s % 5] for c, s in zip(captions, seeds)]
            return to_model_range(images[picks])

    score._classifier = classifier
    accuracy, images = score.score(Perfect())
    assert accuracy > 0.9 and images.shape == (30, 1, 8, 8)


def test_demo_run_short(tmp_path):
    """The demo config through main.py, shortened: every artefact of a run and the figure line."""
    result = main_py("-t", "--base", DEMO, "-l", tmp_path,
                     "lightning.trainer.max_steps=30", "lightning.trainer.check_val_every_n_epoch=1",
                     "lightning.trainer.enable_progress_bar=false", "data.params.train.repeats=1",
                     "lightning.callbacks.image_logger.params.batch_frequency=10",
                     "lightning.callbacks.image_logger.params.steps=2",
                     "lightning.callbacks.digit_score.params.n_per_class=2",
                     "lightning.callbacks.digit_score.params.steps=3", timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    [run] = run_dirs(tmp_path)
    figures = FIGURE.findall(result.stdout)
    assert [int(step) for step, _, _ in figures] == [26, 30]  # after the epoch-0 validation and at the end
    assert all(0 <= float(acc) <= 100 and float(ref) > 95 for _, acc, ref in figures)
    for path in ("checkpoints/last.ckpt", "metrics.csv", "loss_curve.png", "digits_by_prompt.png"):
        assert (run / path).is_file(), path
    assert list((run / "images" / "train").glob("samples_cfg3_gs-000010_*.png"))
    assert list((run / "images" / "val").glob("samples_cfg3_gs-000026_*.png"))
    assert "val/prompt_accuracy" in (run / "metrics.csv").read_text().splitlines()[0]
    from PIL import Image

    assert Image.open(run / "digits_by_prompt.png").size == (4 * (2 * 9 + 1), 4 * (10 * 9 + 1))  # 10 rows x 2


@pytest.mark.slow
def test_demo_full_follows_prompts(tmp_path):
    """The exact demo (800 steps): measured 100% (87% already at step 408); 85% leaves room for seeds/BLAS."""
    result = main_py("-t", "--base", DEMO, "-l", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    step, accuracy, _ = FIGURE.findall(result.stdout)[-1]
    assert float(accuracy) >= 85.0, result.stdout[-2000:]
