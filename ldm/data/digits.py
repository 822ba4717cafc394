"""scikit-learn's handwritten digits (1,797 8x8 scans, bundled with sklearn) as a captioned image set.

The data ships inside scikit-learn, so a demo config built on it trains with no download at all. Captions are
made from the labels, so "does the model follow the prompt" has a ground truth (see
``ldm.callbacks.digit_eval``). Train and validation splits are a fixed, class-stratified partition, so the
classifier that scores samples and the diffusion model never see the validation digits.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.data.datamodule import inner_dataset
from ldm.util import ConfigError

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
MAX_VALUE = 16.0  # load_digits pixel values are integers 0..16


def digit_caption(label: int, template: str = "a handwritten digit {digit}") -> str:
    """``template`` with ``{digit}`` (the numeral) and/or ``{word}`` ("three") filled in."""
    return template.format(digit=label, word=DIGIT_WORDS[label])


def split_digits(split: str, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(images (N,8,8) float in 0..16, labels (N,)) of one split of a seeded, per-class split of load_digits."""
    from sklearn.datasets import load_digits

    if split not in ("train", "val", "all"):
        raise ConfigError(f"DigitsDataset: split must be 'train', 'val' or 'all', got {split!r}")
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"DigitsDataset: val_fraction must be in (0, 1), got {val_fraction}")
    digits = load_digits()
    images, labels = digits.images.astype(np.float32), digits.target.astype(np.int64)
    if split == "all":
        return images, labels
    rng = np.random.default_rng(seed)
    val = np.zeros(len(labels), dtype=bool)
    for k in range(10):
        idx = rng.permutation(np.flatnonzero(labels == k))
        val[idx[: max(1, round(len(idx) * val_fraction))]] = True
    keep = val if split == "val" else ~val
    return images[keep], labels[keep]


@dataclass(frozen=True)
class DigitsSplit:
    """The partition of load_digits into training and held-out digits (:func:`split_digits` with these
    settings). :class:`DigitsDataset` takes its digits from one, and the demo scorers
    (``ldm.callbacks.digit_eval``) take theirs from the DataModule's (:func:`scoring_split`), so the digits a
    scorer holds out are exactly the ones the model never trained on."""

    val_fraction: float = 0.1
    seed: int = 0
    per_class: int | None = None  # a small training set: the first per_class training digits of each class

    def digits(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        images, labels = split_digits(split, self.val_fraction, self.seed)
        if split == "train" and self.per_class is not None:
            if int(self.per_class) < 1:
                raise ConfigError(f"DigitsDataset: per_class must be >= 1, got {self.per_class}")
            keep = np.sort(np.concatenate([np.flatnonzero(labels == k)[:int(self.per_class)] for k in range(10)]))
            images, labels = images[keep], labels[keep]
        return images, labels

    def train(self) -> tuple[np.ndarray, np.ndarray]:
        return self.digits("train")

    def heldout(self) -> tuple[np.ndarray, np.ndarray]:
        return self.digits("val")


def datamodule_digits(datamodule) -> dict[str, "DigitsDataset"]:
    """``{split name: DigitsDataset}`` for the DataModule's splits that are digits (``repeats`` unwrapped)."""
    found = {name: inner_dataset(d, DigitsDataset) for name, d in (getattr(datamodule, "datasets", None) or {}).items()}
    return {name: d for name, d in found.items() if d is not None}


def scoring_split(datamodule) -> DigitsSplit | None:
    """The split a scorer must hold out to judge a model trained on ``datamodule``: that of its DigitsDatasets,
    or None when it has none (e.g. DreamBooth on the digits model, whose base trained on some split the scorer
    cannot see). Refuses a DataModule whose digits datasets split differently or whose training split includes
    the held-out digits, since then no digit is held out from the model."""
    found = datamodule_digits(datamodule)
    if not found:
        return None
    splits = {name: ds.digits_split for name, ds in found.items()}
    if len({(s.val_fraction, s.seed) for s in splits.values()}) > 1:
        raise ConfigError("the DigitsDatasets in data.params split the digits differently "
                          f"({', '.join(f'{n}: {s}' for n, s in splits.items())}): give them the same "
                          "val_fraction and seed, or a validation digit may be a training digit")
    train = found.get("train")
    if train is not None and train.split != "train":
        raise ConfigError(f"data.params.train: DigitsDataset split {train.split!r} trains on the held-out digits, "
                          "so the digit scores would judge the model on digits it learned; use split: train")
    return train.digits_split if train is not None else next(iter(splits.values()))  # with its per_class


def to_model_range(images: np.ndarray, size: int = 8, channels: int = 1) -> torch.Tensor:
    """(N,8,8) in 0..16 → (N,channels,size,size) in [-1,1]; upsampling is bilinear (antialiased strokes, not
    blocky pixels), and ``channels=3`` repeats the gray plane for first stages that expect RGB."""
    x = torch.as_tensor(images, dtype=torch.float32).unsqueeze(1) / MAX_VALUE * 2 - 1
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(-1, 1).repeat(1, channels, 1, 1)


def to_digit_range(images: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`to_model_range`: (N,C,H,W) in [-1,1] → (N,64) in 0..16 at 8x8, channels averaged,
    downsampled by area averaging — the feature space the digit classifier is fitted in."""
    x = images.detach().float().cpu().mean(dim=1, keepdim=True)
    if x.shape[-1] != 8:
        x = F.adaptive_avg_pool2d(x, 8)
    return ((x.clamp(-1, 1) + 1) / 2 * MAX_VALUE).reshape(len(x), 64).numpy()


class DigitsDataset(Dataset):
    """Items ``{"image": (channels,size,size) in [-1,1], "caption": str, "label": int}``, held in memory.

    Args:
        split: ``train``, ``val`` or ``all``.
        size: side length; 8 is the native resolution, larger sizes are bilinear upsamples.
        channels: 1 for a pixel-space model on gray images, 3 for an RGB first stage.
        caption_template: see :func:`digit_caption`.
        val_fraction, seed: the stratified split (same values → same split everywhere).
        per_class: keep only the first ``per_class`` digits of each class (a small training set, to see overfitting).
    """

    def __init__(self, split: str = "train", size: int = 8, channels: int = 1,
                 caption_template: str = "a handwritten digit {digit}", val_fraction: float = 0.1, seed: int = 0,
                 per_class: int | None = None):
        if size < 8:
            raise ConfigError(f"DigitsDataset: size must be >= 8 (the native resolution), got {size}")
        if channels not in (1, 3):
            raise ConfigError(f"DigitsDataset: channels must be 1 or 3, got {channels}")
        self.split = split
        self.digits_split = DigitsSplit(val_fraction, seed, per_class if split == "train" else None)
        images, self.labels = self.digits_split.digits(split)
        self.images = to_model_range(images, size, channels)
        self.captions = [digit_caption(int(k), caption_template) for k in self.labels]

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"image": self.images[i], "caption": self.captions[i], "label": int(self.labels[i])}


def write_digit_subject(folder, digit: int = 3, n: int = 5, seed: int = 0) -> list:
    """A DreamBooth subject for the digits model: ``n`` training scans of ``digit`` drawn as dark ink on white
    paper (every digit the base model saw is light on dark), saved as 8x8 gray PNGs ``subject-<i>.png``."""
    from pathlib import Path

    from PIL import Image

    if not 0 <= digit <= 9 or n < 1:
        raise ConfigError(f"write_digit_subject: digit must be 0..9 and n >= 1, got digit={digit}, n={n}")
    images, labels = split_digits("train")
    pick = np.random.default_rng(seed).choice(np.flatnonzero(labels == digit), size=n, replace=False)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, idx in enumerate(sorted(pick)):
        ink_on_paper = 255 - np.rint(images[idx] / MAX_VALUE * 255).astype(np.uint8)
        paths.append(folder / f"subject-{i}.png")
        Image.fromarray(ink_on_paper, mode="L").save(paths[-1])
    return paths
