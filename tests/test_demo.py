"""The digits demo (configs/demo/digits.yaml): its data, its scorer, and the run through main.py.

The scorer is proven on real digits (it must recognise them) and on noise (it must not find the prompted digit
in it), so the demo's prompt-following figure means what it says; its copying figures are proven on stand-in
models that draw one image per prompt or copy training digits. A 400-step run of the demo must reach 50%
prompt-following (measured 86%); the full 800-step demo is marked slow.
"""
from __future__ import annotations

import csv
import re

import numpy as np
import pytest
import torch

from ldm.callbacks.digit_eval import DigitClassifier, DigitScore
from ldm.data.digits import DigitsDataset, DigitsSplit, digit_caption, split_digits, to_model_range
from tests.conftest import REPO, main_py
from tests.digits_demo_run import STEPS, digits_demo_run

DEMO = REPO / "configs" / "demo" / "digits.yaml"
FIGURE = re.compile(r"step (\d+): prompt-following accuracy: ([\d.]+)% \(chance 10%, classifier on real held-out "
                    r"digits ([\d.]+)%\)")
COPYING = re.compile(r"two samples of a prompt differ by ([\d.]+) \(two real digits of one class: ([\d.]+)\); "
                     r"samples are ([\d.]+) from the nearest training digit \(real held-out digits: ([\d.]+)\)")


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


class OnePerPrompt(torch.nn.Module):
    """Draws the same real digit for every sample of a prompt: perfect prompt-following, no diversity at all."""

    def generate(self, captions, seeds, **kwargs):
        images, y = split_digits("val")
        return to_model_range(images[[np.flatnonzero(y == int(c[-1]))[0] for c in captions]])


class TrainingCopier(torch.nn.Module):
    """Returns training digits of the prompted class, a different one per seed: a memoriser."""

    def generate(self, captions, seeds, **kwargs):
        images, y = split_digits("train")
        return to_model_range(images[[np.flatnonzero(y == int(c[-1]))[s] for c, s in zip(captions, seeds)]])


def test_copying_figures_tell_one_image_per_prompt_and_copies_from_learning(classifier, tmp_path):
    """Both stand-ins score ~100% prompt-following; the copying figures give each away against real digits."""
    score = DigitScore(n_per_class=6)
    score._classifier = classifier
    one = score.evaluate_once(OnePerPrompt(), tmp_path / "one.png")
    copies = score.evaluate_once(TrainingCopier(), tmp_path / "copies.png")
    for result in (one, copies):
        assert result["val/prompt_accuracy"] >= 0.9
        assert result["val/real_diversity"] > 0.3 and result["val/real_nearest_train_distance"] > 0.2
    assert one["val/sample_diversity"] < 1e-6  # one image per prompt
    assert one["val/nearest_train_distance"] > 0.5 * one["val/real_nearest_train_distance"]  # held-out: no copies
    assert copies["val/nearest_train_distance"] < 1e-6  # every sample is a training digit
    assert copies["val/sample_diversity"] > 0.7 * copies["val/real_diversity"]  # varied copies are still copies
    line = score.figure(copies, tmp_path / "copies.png")
    found = COPYING.search(line)
    assert found and float(found.group(3)) == 0.0 and float(found.group(4)) > 0.2, line


def test_scorer_holds_out_exactly_the_datamodules_validation_digits():
    """DigitScore and VariationScore read the split from the DataModule: no training digit is among their
    held-out digits, the classifier fits on the training digits, and a scorer left on the default split
    would have held out digits this DataModule trains on."""
    from types import SimpleNamespace

    from ldm.callbacks.variation_eval import VariationScore
    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.util import ConfigError

    def datamodule(train_split="train", train_seed=7):
        block = lambda split, seed: {"target": "ldm.data.digits.DigitsDataset",  # noqa: E731
                                     "params": {"split": split, "val_fraction": 0.25, "seed": seed}}
        return DataModuleFromConfig(batch_size=4, num_workers=0, train={**block(train_split, train_seed), "repeats": 2},
                                    validation=block("val", 7))

    dm = datamodule()
    train_images = dm.datasets["train"].dataset.images.flatten(1)
    val_images = dm.datasets["validation"].images.flatten(1)
    in_train = lambda x: (torch.cdist(x.flatten(1), train_images).min(dim=1).values == 0)  # noqa: E731
    in_val = lambda x: (torch.cdist(x.flatten(1), val_images).min(dim=1).values == 0)  # noqa: E731

    default = VariationScore(n_per_class=5)
    assert in_train(default.inputs()[0]).any()  # the default split's held-out digits overlap this training set
    for score in (DigitScore(), VariationScore(n_per_class=5)):
        score.setup(SimpleNamespace(datamodule=dm), None, "fit")
        assert score.split == DigitsSplit(0.25, 7)
        heldout = to_model_range(score.split.heldout()[0])
        assert len(heldout) == len(val_images) and not in_train(heldout).any() and in_val(heldout).all()
        assert score.classifier.svm.shape_fit_[0] == len(train_images)
    inputs = score.inputs()[0]
    assert len(inputs) == 50 and not in_train(inputs).any() and in_val(inputs).all()
    with pytest.raises(ConfigError, match="split the digits differently"):
        DigitScore().setup(SimpleNamespace(datamodule=datamodule(train_seed=8)), None, "fit")
    with pytest.raises(ConfigError, match="trains on the held-out digits"):
        DigitScore().setup(SimpleNamespace(datamodule=datamodule(train_split="all")), None, "fit")


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return digits_demo_run(tmp_path_factory)


def test_demo_learns_to_follow_prompts(demo):
    """The demo config through main.py for 400 steps (one torch thread): it must follow its prompts, draw
    varied digits and not copy its training digits, and leave every artefact of a run."""
    figures = FIGURE.findall(demo.stdout)
    copying = COPYING.findall(demo.stdout)
    print(f"digits demo, {STEPS} steps in {demo.seconds:.0f} s:", figures, copying)
    assert [int(step) for step, _, _ in figures] == [STEPS], demo.stdout[-2000:]  # at the end of training
    ((_, accuracy, ref),) = figures
    assert float(accuracy) >= 50.0, figures  # chance is 10%; measured 86%
    assert float(ref) > 95
    ((diversity, real_diversity, nearest, real_nearest),) = [tuple(map(float, c)) for c in copying]
    assert diversity > 0.5 * real_diversity, copying  # not one image per prompt (measured 0.53 vs 0.56)
    assert nearest > 0.5 * real_nearest, copying  # not copies of training digits (measured 0.40 vs 0.26)
    run = demo.run
    for path in ("checkpoints/last.ckpt", "metrics.csv", "loss_curve.png", "digits_by_prompt.png"):
        assert (run / path).is_file(), path
    assert list((run / "images" / "train").glob(f"samples_cfg3_gs-{STEPS:06}_*.png"))  # the demo logs every 400
    rows = [r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("val/prompt_accuracy")]
    assert [int(r["step"]) for r in rows] == [STEPS]
    assert float(rows[-1]["val/prompt_accuracy"]) == pytest.approx(float(accuracy) / 100, abs=1e-3)
    assert float(rows[-1]["val/sample_diversity"]) == pytest.approx(diversity, abs=1e-3)
    assert float(rows[-1]["val/real_nearest_train_distance"]) == pytest.approx(real_nearest, abs=1e-3)
    from PIL import Image

    assert Image.open(run / "digits_by_prompt.png").size == (4 * (10 * 9 + 1), 4 * (10 * 9 + 1))  # 10 rows x 10


def test_score_runs_after_each_validation_and_at_the_end_once_per_step(classifier, tmp_path, capsys):
    """DigitScore's schedule with a stand-in trainer: a figure after a validation (not during the sanity check),
    logged at that step; at the end of training right after it, the same figure again without sampling again."""
    from contextlib import nullcontext
    from types import SimpleNamespace

    logged, calls = [], []

    class Counting(OnePerPrompt):
        def generate(self, captions, seeds, **kwargs):
            calls.append(len(captions))
            return super().generate(captions, seeds, **kwargs)

    logger = SimpleNamespace(log_metrics=lambda metrics, step: logged.append((step, metrics)))
    trainer = SimpleNamespace(global_step=26, sanity_checking=True, default_root_dir=str(tmp_path), loggers=[logger],
                              precision_plugin=SimpleNamespace(forward_context=nullcontext), datamodule=None)
    score = DigitScore(n_per_class=2)
    score._classifier = classifier
    score.setup(trainer, None, "fit")
    score.on_validation_end(trainer, Counting())
    assert not calls and not logged  # the sanity check is not scored
    trainer.sanity_checking = False
    score.on_validation_end(trainer, Counting())
    score.on_train_end(trainer, Counting())  # same step: same weights
    trainer.global_step = 30
    score.on_train_end(trainer, Counting())
    assert calls == [20, 20] and [step for step, _ in logged] == [26, 30]
    assert logged[0][1]["val/prompt_accuracy"] == 1.0 and logged[0][1]["val/sample_diversity"] == 0.0
    printed = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step ")]
    assert [int(FIGURE.match(line).group(1)) for line in printed] == [26, 26, 30]
    assert (tmp_path / "digits_by_prompt.png").is_file()


@pytest.mark.slow
def test_demo_full_follows_prompts(tmp_path):
    """The exact demo (800 steps): measured 100% (87% already at step 408); 85% leaves room for seeds/BLAS."""
    result = main_py("-t", "--base", DEMO, "-l", tmp_path, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    step, accuracy, _ = FIGURE.findall(result.stdout)[-1]
    assert float(accuracy) >= 85.0, result.stdout[-2000:]
