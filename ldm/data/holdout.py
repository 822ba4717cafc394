"""Validation data for a loss that means something: indexed items, and a held-out share of the training set.

``Indexed`` adds each item's dataset index, which seeds its fixed validation noise
(``LatentDiffusion.validation_losses``). ``hold_out`` sets aside a seeded fraction of a training folder or
Hugging Face dataset when the config gives no validation images: those images are never trained on, and the run
prints how many were taken (``data.params.holdout: 0`` trains on all of them).
"""
from __future__ import annotations

import random
from typing import Any

from torch.utils.data import Dataset
from torchvision import transforms as T

from ldm.util import ConfigError

MIN_IMAGES = 20  # below this, every image is worth more in training than in a validation figure


class Indexed(Dataset):
    """``dataset``'s items with ``index``: their position, a stable per-item seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {**self.dataset[i], "index": i}


def deterministic(transform: T.Compose) -> T.Compose:
    """The training transforms without their randomness: flips dropped, random crops made centre crops."""
    steps = []
    for step in getattr(transform, "transforms", [transform]):
        if isinstance(step, (T.RandomHorizontalFlip, T.RandomVerticalFlip)):
            continue
        if isinstance(step, T.RandomCrop):
            step = T.CenterCrop(step.size)
        elif isinstance(step, T.RandomResizedCrop):
            step = T.Compose([T.Resize(step.size, step.interpolation, antialias=True), T.CenterCrop(step.size)])
        steps.append(step)
    return T.Compose(steps)


def hold_out(train, fraction: float, seed: int) -> tuple[Any, Any, list[int]] | None:
    """``(training part, held-out part, held-out indices)`` of a dataset with ``select``, or None when it has
    none or too few images (fewer than :data:`MIN_IMAGES`)."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise ConfigError(f"data.params.holdout must be a fraction in [0, 1) of the training images, got {fraction!r}")
    if not fraction or not getattr(train, "splittable", False) or len(train) < MIN_IMAGES:
        return None
    k = max(1, round(len(train) * fraction))
    held = sorted(random.Random(seed).sample(range(len(train)), k))
    chosen = set(held)
    kept = [i for i in range(len(train)) if i not in chosen]
    validation = train.select(held)
    validation.transform = deterministic(train.transform)
    validation.caption_transform = None
    return train.select(kept), validation, held
