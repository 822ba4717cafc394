"""Class-kept score for the digits image-variations demo: is a variation of a handwritten 3 still a 3?

Held-out digits (``ldm.data.digits``' validation split, never trained on) are each the condition of one
variation sampled with a fixed seed; ``ldm.callbacks.digit_eval.DigitClassifier`` labels the variations, and
the fraction labelled as their input's class is the figure (chance is 10%). An unconditional model would
score about chance, so the figure measures how much of the input the image embedding carries through.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image
from pytorch_lightning.utilities import rank_zero_only

from ldm.callbacks.digit_eval import DigitClassifier
from ldm.data.digits import split_digits, to_model_range


def heldout_inputs(n_per_class: int, size: int, channels: int, val_fraction: float = 0.1,
                   split_seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """The first ``n_per_class`` validation digits of each class, class-major, in the model's range."""
    images, labels = split_digits("val", val_fraction, split_seed)
    idx = np.concatenate([np.flatnonzero(labels == k)[:n_per_class] for k in range(10)])
    return to_model_range(images[idx], size, channels), labels[idx]


class VariationScore(pl.Callback):
    """After each validation and at the end of training: one variation per held-out input (seeds ``seed + i``),
    log ``val/class_kept``, print the figure line and save ``<logdir>/<filename>`` (for each class a row of
    inputs above a row of their variations).

    ``size``/``channels`` must match the dataset the model trains on (``DigitsDataset``'s).
    """

    def __init__(self, n_per_class: int = 10, size: int = 8, channels: int = 1, seed: int = 0, sampler: str = "ddim",
                 steps: int = 25, guidance_scale: float = 3.0, val_fraction: float = 0.1, split_seed: int = 0,
                 logdir: str | None = None, filename: str = "digit_variations.png", zoom: int = 4,
                 on_validation: bool = True):
        super().__init__()
        self.n_per_class, self.size, self.channels, self.seed = n_per_class, size, channels, seed
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

    @torch.no_grad()
    def score(self, pl_module) -> tuple[float, torch.Tensor, torch.Tensor]:
        """(fraction of variations classified as their input's digit, inputs, variations)."""
        inputs, labels = heldout_inputs(self.n_per_class, self.size, self.channels, self.val_fraction, self.split_seed)
        seeds = [self.seed + i for i in range(len(labels))]
        was_training = pl_module.training
        pl_module.eval()
        try:
            outputs = pl_module.generate(inputs.to(pl_module.device), seeds, size=self.size, **self.sample_kwargs)
        finally:
            pl_module.train(was_training)
        return self.classifier.accuracy(outputs, labels), inputs, outputs.cpu()

    def save_grid(self, inputs: torch.Tensor, outputs: torch.Tensor, path: Path) -> None:
        k = self.n_per_class
        rows = [part for c in range(10) for part in (inputs[c * k:(c + 1) * k], outputs[c * k:(c + 1) * k])]
        grid = torchvision.utils.make_grid(torch.cat(rows).float(), nrow=k, padding=1, pad_value=1.0)
        pixels = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
        img = Image.fromarray(pixels)
        img.resize((img.width * self.zoom, img.height * self.zoom), Image.Resampling.NEAREST).save(path)

    @rank_zero_only
    def _evaluate(self, trainer, pl_module) -> None:
        step = trainer.global_step
        if step == self._scored_step:
            return  # training ended right after a validation: same weights, same samples
        with trainer.precision_plugin.forward_context():
            score, inputs, outputs = self.score(pl_module)
        self._scored_step, self.last_score = step, score
        folder = Path(self.logdir or trainer.default_root_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.save_grid(inputs, outputs, folder / self.filename)
        for logger in trainer.loggers:
            logger.log_metrics({"val/class_kept": score}, step=step)
        print(f"step {step}: variations keep their input's class: {100 * score:.1f}% (chance 10%, classifier on "
              f"real held-out digits {100 * self.classifier.heldout_accuracy:.1f}%); grid (inputs above their "
              f"variations): {folder / self.filename}", flush=True)

    def on_validation_end(self, trainer, pl_module):
        if self.on_validation and not trainer.sanity_checking:
            self._evaluate(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._evaluate(trainer, pl_module)
