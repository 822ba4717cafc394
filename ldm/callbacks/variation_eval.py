"""Class-kept score for the digits image-variations demo: is a variation of a handwritten 3 still a 3?

Held-out digits (the DataModule's validation split, never trained on: ``ldm.data.digits.scoring_split``) are
each the condition of one variation sampled with a fixed seed; ``ldm.callbacks.digit_eval.DigitClassifier``
labels the variations, and the fraction labelled as their input's class is the figure (chance is 10%). An
unconditional model would score about chance, so the figure measures how much of the input the image embedding
carries through.

A model that returns its input unchanged scores the classifier's ceiling, so the copying figures go beside it:
the distance from a variation to its input (a copier: 0) against the distance from each input to the nearest
other real digit of its class (a different drawing of the same digit), plus DigitScore's diversity among the
variations of one class and distance to the nearest training digit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ldm.callbacks.digit_eval import DigitScore, _num, rms_distances, thumbnails
from ldm.data.digits import DigitsSplit, to_model_range


def heldout_inputs(n_per_class: int, size: int, channels: int,
                   split: DigitsSplit = DigitsSplit()) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n_per_class`` held-out digits of each class of ``split``, class-major, in the model's range."""
    images, labels = split.heldout()
    idx = np.concatenate([np.flatnonzero(labels == k)[:n_per_class] for k in range(10)])
    return to_model_range(images[idx], size, channels), labels[idx]


class VariationScore(DigitScore):
    """After each validation and at the end of training: one variation per held-out input (seeds ``seed + i``),
    log ``val/class_kept`` and the copying figures (``val/input_distance``, ``val/sample_diversity``,
    ``val/nearest_train_distance`` and their real-digit references ``val/real_*``), print the figure lines and
    save ``<logdir>/<filename>`` (for each class a row of inputs above a row of their variations). Scheduling,
    logging, printing and the split are :class:`DigitScore`'s.

    ``size``/``channels`` must match the dataset the model trains on (``DigitsDataset``'s).
    """

    metric = "val/class_kept"

    def __init__(self, n_per_class: int = 10, size: int = 8, channels: int = 1, seed: int = 0, sampler: str = "ddim",
                 steps: int = 25, guidance_scale: float = 3.0, logdir: str | None = None,
                 filename: str = "digit_variations.png", zoom: int = 4, on_validation: bool = True):
        super().__init__(n_per_class=n_per_class, seed=seed, sampler=sampler, steps=steps,
                         guidance_scale=guidance_scale, logdir=logdir, filename=filename, zoom=zoom,
                         on_validation=on_validation)
        self.size, self.channels = size, channels

    def inputs(self) -> tuple[torch.Tensor, np.ndarray]:
        return heldout_inputs(self.n_per_class, self.size, self.channels, self.split)

    @torch.no_grad()
    def score(self, pl_module) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(fraction of variations classified as their input's digit, inputs, variations)."""
        inputs, labels = self.inputs()
        seeds = [self.seed + i for i in range(len(labels))]
        outputs = pl_module.generate(inputs.to(pl_module.device), seeds, size=self.size, **self.sample_kwargs)
        return self.classifier.accuracy(outputs, labels), inputs, outputs.cpu()

    def input_figures(self, inputs: torch.Tensor, labels: np.ndarray, outputs: torch.Tensor) -> dict:
        """Mean distance from each variation to its input, and from each input to the nearest training digit of
        its class (what a different drawing of the same digit looks like)."""
        a, b = thumbnails(inputs), thumbnails(outputs)
        own = float(((a.double() - b.double()).pow(2).mean(dim=1).sqrt()).mean())
        train_images, train_labels = self.split.train()
        train = thumbnails(to_model_range(train_images))
        d = rms_distances(a, train)
        d[torch.as_tensor(labels[:, None] != train_labels[None, :])] = float("inf")
        return {"val/input_distance": own, "val/real_input_distance": float(d.min(dim=1).values.mean())}

    def save_grid(self, inputs: torch.Tensor, outputs: torch.Tensor, path: Path) -> None:
        k = self.n_per_class
        rows = [part for c in range(10) for part in (inputs[c * k:(c + 1) * k], outputs[c * k:(c + 1) * k])]
        super().save_grid(torch.cat(rows), path)

    def evaluate_once(self, pl_module, path: Path) -> dict:
        score, inputs, outputs = self.score(pl_module)
        self.save_grid(inputs, outputs, path)
        labels = self.inputs()[1]
        return {self.metric: score, **self.input_figures(inputs, labels, outputs),
                **self.copying_figures(outputs, labels)}

    def figure(self, result: dict, path: Path) -> str:
        return (f"variations keep their input's class: {100 * result[self.metric]:.1f}% (chance 10%, classifier on "
                f"real held-out digits {100 * self.classifier.heldout_accuracy:.1f}%); grid (inputs above their "
                f"variations): {path}\n"
                f"  a variation is {_num(result['val/input_distance'])} from its input (the nearest other real digit "
                f"of its class: {_num(result['val/real_input_distance'])}; a copy of the input: 0)\n"
                f"  {self.copying_line(result, 'one class', 'one class')}")
