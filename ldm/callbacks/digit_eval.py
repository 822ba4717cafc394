"""Prompt-following score for the digits demo: does "a handwritten digit 3" give a 3?

A classifier fitted on real 8x8 digits (``ldm.data.digits``' train split) labels images sampled for each
class prompt with fixed seeds; the fraction labelled as the prompted digit is the figure. Its accuracy on the
held-out real digits is printed next to it, as the ceiling the samples are judged against.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from ldm.data.digits import digit_caption, split_digits, to_digit_range
from ldm.outputs import image_grid


class DigitClassifier:
    """An RBF SVM on the 64 pixel values (0..16) of real digits; ``heldout_accuracy`` is measured on the
    validation split, which neither it nor the diffusion model trains on."""

    def __init__(self, val_fraction: float = 0.1, seed: int = 0):
        from sklearn.svm import SVC

        x_train, y_train = split_digits("train", val_fraction, seed)
        x_val, y_val = split_digits("val", val_fraction, seed)
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
    ``val/prompt_accuracy``, print the figure line and save the grid (row k = prompt k) as
    ``<logdir>/<filename>``. ``logdir`` defaults to the trainer's ``default_root_dir`` (the run dir).
    """

    def __init__(self, n_per_class: int = 10, caption_template: str = "a handwritten digit {digit}", seed: int = 0,
                 sampler: str = "ddim", steps: int = 25, guidance_scale: float = 3.0, val_fraction: float = 0.1,
                 split_seed: int = 0, logdir: str | None = None, filename: str = "digits_by_prompt.png",
                 zoom: int = 4, on_validation: bool = True):
        super().__init__()
        self.n_per_class, self.caption_template, self.seed = n_per_class, caption_template, seed
        self.sample_kwargs = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale}
        self.val_fraction, self.split_seed = val_fraction, split_seed
        self.logdir, self.filename, self.zoom, self.on_validation = logdir, filename, zoom, on_validation
        self._classifier: DigitClassifier | None = None
        self._scored_step = -1
        self.last_score: float | None = None

    @property
    def classifier(self) -> DigitClassifier:
        if self._classifier is None:  # fitted on first use: building the callback stays instant
            self._classifier = DigitClassifier(self.val_fraction, self.split_seed)
        return self._classifier

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

    # The two pieces a sibling score (e.g. ldm.callbacks.variation_eval.VariationScore) replaces.
    metric = "val/prompt_accuracy"

    def evaluate_once(self, pl_module, path: Path) -> float:
        """Sample, score and save the grid at ``path``; return the score."""
        accuracy, images = self.score(pl_module)
        self.save_grid(images, path)
        return accuracy

    def figure(self, score: float, path: Path) -> str:
        return (f"prompt-following accuracy: {100 * score:.1f}% (chance 10%, classifier on real held-out digits "
                f"{100 * self.classifier.heldout_accuracy:.1f}%); grid (row k = prompt k): {path}")

    @rank_zero_only
    def _evaluate(self, trainer, pl_module) -> None:
        step = trainer.global_step
        folder = Path(self.logdir or trainer.default_root_dir)
        if step != self._scored_step:  # training may end right after a validation: same weights, same samples
            folder.mkdir(parents=True, exist_ok=True)
            with trainer.precision_plugin.forward_context():
                self.last_score = self.evaluate_once(pl_module, folder / self.filename)
            self._scored_step = step
            for logger in trainer.loggers:
                logger.log_metrics({self.metric: self.last_score}, step=step)
        print(f"step {step}: {self.figure(self.last_score, folder / self.filename)}", flush=True)

    def on_validation_end(self, trainer, pl_module):
        if self.on_validation and not trainer.sanity_checking:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module)
