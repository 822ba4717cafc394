"""Prompt-following score for the digits demo: does "a handwritten digit 3" give a 3?

A classifier fitted on real 8x8 digits (the DataModule's train split, see ``ldm.data.digits.scoring_split``)
labels images sampled for each class prompt with fixed seeds; the fraction labelled as the prompted digit is the
figure. Its accuracy on the held-out real digits is printed next to it, as the ceiling the samples are judged
against.

That figure cannot tell learning from copying: a model that draws one training 3 for every "digit 3" scores
100%. So two more figures go beside it, each against the same figure computed on real digits the model never
trained on (RMS pixel distance at 8x8, images in [-1, 1]):

* diversity: the mean distance between two samples of one prompt (one image per prompt: 0), against the mean
  distance between two real held-out digits of one class;
* nearest training digit: the mean distance from a sample to the closest training digit (a copier: 0), against
  the same distance for the real held-out digits.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.utilities import rank_zero_only

from ldm.data.digits import DigitsSplit, digit_caption, scoring_split, to_digit_range, to_model_range
from ldm.outputs import image_grid


def thumbnails(images: torch.Tensor, size: int = 8) -> torch.Tensor:
    """(N,C,H,W) in [-1, 1] → (N, size*size) gray, area-averaged (never enlarged)."""
    x = images.detach().float().cpu().mean(dim=1, keepdim=True)
    side = min(size, x.shape[-1])
    return F.adaptive_avg_pool2d(x, side).flatten(1)


def rms_distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(len(a), len(b)) RMS distances between rows of flattened thumbnails (computed directly, not through a
    matrix product, so an exact copy is at exactly 0)."""
    return torch.cdist(a.double(), b.double(), compute_mode="donot_use_mm_for_euclid_dist") / a.shape[1] ** 0.5


def nearest_distance(samples: torch.Tensor, references: torch.Tensor) -> float:
    """Mean over samples of the RMS distance to the nearest reference (both flattened thumbnails)."""
    return float(rms_distances(samples, references).min(dim=1).values.mean())


def leave_one_out_distance(references: torch.Tensor) -> float | None:
    """Mean over references of the RMS distance to the nearest *other* reference: how far a new real image sits
    from the rest. None for fewer than two."""
    if len(references) < 2:
        return None
    d = rms_distances(references, references)
    d.fill_diagonal_(float("inf"))
    return float(d.min(dim=1).values.mean())


def diversity(thumbs: torch.Tensor, groups=None) -> float | None:
    """Mean RMS distance between two different members of a group, averaged over the groups (all rows are one
    group when ``groups`` is None). 0 when every group is one image repeated; None with no group of two."""
    groups = np.zeros(len(thumbs), dtype=np.int64) if groups is None else np.asarray(groups)
    means = []
    for g in np.unique(groups):
        members = thumbs[torch.as_tensor(np.flatnonzero(groups == g))]
        if len(members) >= 2:
            d = rms_distances(members, members)
            means.append(float(d.sum() / (len(members) * (len(members) - 1))))  # the diagonal is 0
    return float(np.mean(means)) if means else None


class DigitClassifier:
    """An RBF SVM on the 64 pixel values (0..16) of real digits; ``heldout_accuracy`` is measured on the
    split's held-out digits, which neither it nor the diffusion model trains on."""

    def __init__(self, split: DigitsSplit = DigitsSplit()):
        from sklearn.svm import SVC

        x_train, y_train = split.train()
        x_val, y_val = split.heldout()
        self.svm = SVC(gamma="scale").fit(x_train.reshape(len(x_train), -1), y_train)
        self.heldout_accuracy = float((self.svm.predict(x_val.reshape(len(x_val), -1)) == y_val).mean())

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Labels for (N,C,H,W) images in [-1,1], any C and any size (area-averaged down to 8x8)."""
        return self.svm.predict(to_digit_range(images))

    def accuracy(self, images: torch.Tensor, labels) -> float:
        return float((self.predict(images) == np.asarray(labels)).mean())


class DigitScore(pl.Callback):
    """After each validation and at the end of training: sample ``n_per_class`` images for each prompt
    ``caption_template.format(digit=k)`` (seeds ``seed + i``, the same every time), log
    ``val/prompt_accuracy`` and the copying figures (``val/sample_diversity``, ``val/nearest_train_distance``
    and their real-digit references ``val/real_*``), print the figure lines and save the grid (row k = prompt k)
    as ``<logdir>/<filename>``. ``logdir`` defaults to the trainer's ``default_root_dir`` (the run dir).

    Training and held-out digits are the trainer's DataModule's (:func:`ldm.data.digits.scoring_split`, read in
    ``setup``); without digits in the DataModule (DreamBooth on the digits model) the default split.
    """

    def __init__(self, n_per_class: int = 10, caption_template: str = "a handwritten digit {digit}", seed: int = 0,
                 sampler: str = "ddim", steps: int = 25, guidance_scale: float = 3.0, logdir: str | None = None,
                 filename: str = "digits_by_prompt.png", zoom: int = 4, on_validation: bool = True):
        super().__init__()
        self.n_per_class, self.caption_template, self.seed = n_per_class, caption_template, seed
        self.sample_kwargs = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale}
        self.logdir, self.filename, self.zoom, self.on_validation = logdir, filename, zoom, on_validation
        self.split = DigitsSplit()
        self._classifier: DigitClassifier | None = None
        self._real: dict | None = None
        self._scored_step = -1
        self.last_result: dict | None = None

    def setup(self, trainer, pl_module, stage: str) -> None:
        split = scoring_split(trainer.datamodule)
        if split is not None and split != self.split:
            self.split, self._classifier, self._real = split, None, None

    @property
    def classifier(self) -> DigitClassifier:
        if self._classifier is None:  # fitted on first use: building the callback stays instant
            self._classifier = DigitClassifier(self.split)
        return self._classifier

    @property
    def last_score(self) -> float | None:
        return None if self.last_result is None else self.last_result[self.metric]

    def train_thumbnails(self) -> torch.Tensor:
        return thumbnails(to_model_range(self.split.train()[0]))

    def real_figures(self) -> dict:
        """The copying figures of real held-out digits: what a model that learned the digits should come near."""
        if self._real is None:
            images, labels = self.split.heldout()
            held = thumbnails(to_model_range(images))
            self._real = {"val/real_diversity": diversity(held, labels),
                          "val/real_nearest_train_distance": nearest_distance(held, self.train_thumbnails())}
        return self._real

    def copying_figures(self, samples: torch.Tensor, groups) -> dict:
        """Diversity within each group of samples and distance to the nearest training digit, with the real
        held-out digits' figures beside them."""
        thumbs = thumbnails(samples)
        return {"val/sample_diversity": diversity(thumbs, groups),
                "val/nearest_train_distance": nearest_distance(thumbs, self.train_thumbnails()), **self.real_figures()}

    def prompts(self) -> tuple[list[str], list[int], list[int]]:
        """(captions, labels, seeds), class-major: all samples of digit 0 first."""
        labels = [k for k in range(10) for _ in range(self.n_per_class)]
        captions = [digit_caption(k, self.caption_template) for k in labels]
        return captions, labels, [self.seed + i for i in range(len(labels))]

    @torch.no_grad()
    def score(self, pl_module) -> tuple[float, torch.Tensor]:
        captions, labels, seeds = self.prompts()
        images = pl_module.generate(captions, seeds, **self.sample_kwargs)
        return self.classifier.accuracy(images, labels), images

    def save_grid(self, images: torch.Tensor, path: Path) -> None:
        image_grid(images, self.n_per_class, padding=self.zoom, zoom=self.zoom).save(path)

    # The pieces a sibling score (e.g. ldm.callbacks.variation_eval.VariationScore) replaces.
    metric = "val/prompt_accuracy"

    def evaluate_once(self, pl_module, path: Path) -> dict:
        """Sample, score and save the grid at ``path``; return ``{metric name: value}``."""
        accuracy, images = self.score(pl_module)
        self.save_grid(images, path)
        return {self.metric: accuracy, **self.copying_figures(images, self.prompts()[1])}

    def figure(self, result: dict, path: Path) -> str:
        return (f"prompt-following accuracy: {100 * result[self.metric]:.1f}% (chance 10%, classifier on real "
                f"held-out digits {100 * self.classifier.heldout_accuracy:.1f}%); grid (row k = prompt k): {path}\n"
                f"  {self.copying_line(result, 'a prompt', 'one class')}")

    @staticmethod
    def copying_line(result: dict, group: str, real_group: str) -> str:
        return (f"learning or copying (RMS pixel distance): two samples of {group} differ by "
                f"{_num(result['val/sample_diversity'])} (two real digits of {real_group}: "
                f"{_num(result['val/real_diversity'])}); samples are {_num(result['val/nearest_train_distance'])} "
                f"from the nearest training digit (real held-out digits: "
                f"{_num(result['val/real_nearest_train_distance'])})")

    @rank_zero_only
    def _evaluate(self, trainer, pl_module) -> None:
        step = trainer.global_step
        folder = Path(self.logdir or trainer.default_root_dir)
        if step != self._scored_step:  # training may end right after a validation: same weights, same samples
            folder.mkdir(parents=True, exist_ok=True)
            with trainer.precision_plugin.forward_context():
                self.last_result = self.evaluate_once(pl_module, folder / self.filename)
            self._scored_step = step
            metrics = {k: v for k, v in self.last_result.items() if v is not None}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=step)
        print(f"step {step}: {self.figure(self.last_result, folder / self.filename)}", flush=True)

    def on_validation_end(self, trainer, pl_module):
        if self.on_validation and not trainer.sanity_checking:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module)


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
