"""Class-kept score for the digits image-variations demo: is a variation of a handwritten 3 still a 3?

Held-out digits (``ldm.data.digits``' validation split, never trained on) are each the condition of one
variation sampled with a fixed seed; ``ldm.callbacks.digit_eval.DigitClassifier`` labels the variations, and
the fraction labelled as their input's class is the figure (chance is 10%). An unconditional model would
score about chance, so the figure measures how much of the input the image embedding carries through.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldm.callbacks.digit_eval import DigitScore
from ldm.data.digits import split_digits, to_model_range


def heldout_inputs(n_per_class: int, size: int, channels: int, val_fraction: float = 0.1,
                   split_seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n_per_class`` validation digits of each class, class-major, in the model's range."""
    images, labels = split_digits("val", val_fraction, split_seed)
    idx = np.concatenate([np.flatnonzero(labels == k)[:n_per_class] for k in range(10)])
    return to_model_range(images[idx], size, channels), labels[idx]


class VariationScore(DigitScore):
    """After each validation and at the end of training: one variation per held-out input (seeds ``seed + i``),
    log ``val/class_kept``, print the figure line and save ``<logdir>/<filename>`` (for each class a row of
    inputs above a row of their variations). Scheduling, logging and printing are :class:`DigitScore`'s.

    ``size``/``channels`` must match the dataset the model trains on (``DigitsDataset``'s).
    """

    metric = "val/class_kept"

    def __init__(self, n_per_class: int = 10, size: int = 8, channels: int = 1, seed: int = 0, sampler: str = "ddim",
                 steps: int = 25, guidance_scale: float = 3.0, val_fraction: float = 0.1, split_seed: int = 0,
                 logdir: str | None = None, filename: str = "digit_variations.png", zoom: int = 4,
                 on_validation: bool = True):
        super().__init__(n_per_class=n_per_class, seed=seed, sampler=sampler, steps=steps,
                         guidance_scale=guidance_scale, val_fraction=val_fraction, split_seed=split_seed,
                         logdir=logdir, filename=filename, zoom=zoom, on_validation=on_validation)
        self.size, self.channels = size, channels

    @torch.no_grad()
    def score(self, pl_module) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(fraction of variations classified as their input's digit, inputs, variations)."""
        inputs, labels = heldout_inputs(self.n_per_class, self.size, self.channels, self.val_fraction, self.split_seed)
        seeds = [self.seed + i for i in range(len(labels))]
        outputs = pl_module.generate(inputs.to(pl_module.device), seeds, size=self.size, **self.sample_kwargs)
        return self.classifier.accuracy(outputs, labels), inputs, outputs.cpu()

    def save_grid(self, inputs: torch.Tensor, outputs: torch.Tensor, path: Path) -> None:
        k = self.n_per_class
        rows = [part for c in range(10) for part in (inputs[c * k:(c + 1) * k], outputs[c * k:(c + 1) * k])]
        super().save_grid(torch.cat(rows), path)

    def evaluate_once(self, pl_module, path: Path) -> float:
        score, inputs, outputs = self.score(pl_module)
        self.save_grid(inputs, outputs, path)
        return score

    def figure(self, score: float, path: Path) -> str:
        return (f"variations keep their input's class: {100 * score:.1f}% (chance 10%, classifier on real held-out "
                f"digits {100 * self.classifier.heldout_accuracy:.1f}%); grid (inputs above their variations): {path}")
