"""DreamBooth data: a few photos of one subject under a rare identifier, paired with class images for prior
preservation (Ruiz et al. 2022).

Every item holds one instance example (``image``, ``caption`` = the instance prompt) and, with prior
preservation, one class example (``class_image``, ``class_caption`` = the class prompt). LatentDiffusion sees
``class_image`` in the batch and adds ``prior_loss_weight`` x the class loss to the instance loss.

Class images are the base model's own samples for the class prompt; when ``class_data_dir`` holds fewer than
``num_class_images`` the ``ldm.callbacks.dreambooth.ClassImages`` callback generates the rest before training
starts and calls :meth:`DreamBoothDataset.scan_class_images` to pick them up.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from ldm.data.caption_tags import build_caption_transform
from ldm.data.folder import find_images
from ldm.data.images import ImageCaptionDataset
from ldm.data.transforms import build_transforms
from ldm.util import ConfigError

log = logging.getLogger(__name__)

# Below this id a CLIP word token is among the ~20k most frequent BPE words: it already means something
# (a name, a word), and DreamBooth would have to overwrite that meaning instead of filling an empty slot.
COMMON_TOKEN_ID = 20000
RARE_SUGGESTIONS = ("sks", "ohwx")


class _Images(ImageCaptionDataset):
    """Image files with one fixed caption, decoded and transformed like every other dataset here."""

    def __init__(self, files: list[Path], caption: str, transform, what: str, caption_transform=None) -> None:
        super().__init__(transform, what, caption_transform)
        self.files, self.caption = files, caption

    def __len__(self) -> int:
        return len(self.files)

    def _record(self, i: int):
        return self.files[i], str(self.files[i]), self.caption


def identifier_words(instance_prompt: str, class_prompt: str | None) -> list[str]:
    """The words of the instance prompt that the class prompt lacks ("sks" in "a photo of sks dog")."""
    words = re.findall(r"[\w'-]+", instance_prompt.lower())
    known = set(re.findall(r"[\w'-]+", (class_prompt or "").lower())) | {"a", "an", "the", "of", "photo", "picture"}
    return [w for w in words if w not in known]


def rare_tokens(tokenizer, n: int = 8, length: int = 3) -> list[str]:
    """Short all-letter single-token words from the rare end of CLIP's vocabulary (highest ids = rarest merges)."""
    vocab = tokenizer.get_vocab()
    pattern = re.compile(rf"[a-z]{{{length}}}</w>")
    found = sorted(((i, t[:-4]) for t, i in vocab.items() if pattern.fullmatch(t)), reverse=True)
    return [word for _, word in found[:n]]


def identifier_problems(instance_prompt: str, class_prompt: str | None = None, tokenizer=None) -> list[str]:
    """Warnings for an identifier that is a common word or splits into several CLIP tokens (empty when fine).

    A common word ("bob", "max") carries a strong prior that fine-tuning fights; a word that splits ("zwx" ->
    "z", "wx") spreads the subject over tokens that also appear elsewhere. A rare single token is best.
    """
    if tokenizer is None:
        from ldm.models.tokenizer import clip_tokenizer

        tokenizer = clip_tokenizer()
    problems = []
    words = identifier_words(instance_prompt, class_prompt)
    if not words:
        problems.append(f"instance_prompt {instance_prompt!r} has no identifier word that class_prompt {class_prompt!r} lacks")
    for word in words:
        tokens = tokenizer.tokenize(word)
        if len(tokens) > 1:
            problems.append(f"identifier {word!r} splits into {len(tokens)} CLIP tokens {tokens}")
        elif tokenizer.convert_tokens_to_ids(tokens)[0] < COMMON_TOKEN_ID:
            problems.append(f"identifier {word!r} is a common word for CLIP (token id "
                            f"{tokenizer.convert_tokens_to_ids(tokens)[0]} < {COMMON_TOKEN_ID})")
    if problems:
        suggestions = list(RARE_SUGGESTIONS) + rare_tokens(tokenizer, 4)
        problems.append(f"use a rare single-token identifier instead, e.g. {', '.join(suggestions)}")
    return problems


class DreamBoothDataset(Dataset):
    """Instance photos with ``instance_prompt``, plus class images with ``class_prompt`` for prior preservation.

    Args (diffusers' ``train_dreambooth.py`` names):
        instance_data_dir: folder with the subject's photos (3-5 is the minimum, ~20 is comfortable).
        instance_prompt: e.g. "a photo of sks dog"; the identifier ("sks") is checked by :func:`identifier_problems`.
        class_data_dir: folder for class images; generated into when it holds fewer than ``num_class_images``.
        class_prompt: e.g. "a photo of a dog".
        with_prior_preservation: add class examples to every item (and so the prior loss).
        num_class_images: how many class images to use (and generate when missing).
        image_transforms: torchvision transforms for both sets (``ldm.data.transforms``).
        check_identifier: log warnings about a weak identifier.
        caption_tags: tag shuffle/dropout for a comma-separated instance prompt (``ldm.data.caption_tags``).

    Length is max(instance images, class images), so every class image is seen once per epoch and the
    instance photos cycle; the DataModule's ``repeats`` lengthens epochs further.
    """

    def __init__(self, instance_data_dir: str, instance_prompt: str, class_data_dir: str | None = None,
                 class_prompt: str | None = None, with_prior_preservation: bool = True, num_class_images: int = 200,
                 image_transforms: Sequence[Any] = (), check_identifier: bool = True,
                 caption_tags: dict | None = None) -> None:
        root = Path(instance_data_dir).expanduser()
        if not root.is_dir():
            raise ConfigError(f"DreamBoothDataset: instance_data_dir '{instance_data_dir}' does not exist")
        files = find_images(root)
        if not files:
            raise ConfigError(f"DreamBoothDataset: no images in instance_data_dir '{instance_data_dir}'")
        if with_prior_preservation and (not class_data_dir or not class_prompt):
            raise ConfigError("DreamBoothDataset: with_prior_preservation needs class_data_dir and class_prompt")
        if int(num_class_images) < 1 and with_prior_preservation:
            raise ConfigError(f"DreamBoothDataset: num_class_images must be >= 1, got {num_class_images}")
        transform = build_transforms(image_transforms)
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.instance = _Images(files, instance_prompt, transform, f"instance_data_dir '{instance_data_dir}'",
                                build_caption_transform(caption_tags))
        self.with_prior_preservation = bool(with_prior_preservation)
        self.class_data_dir = Path(class_data_dir).expanduser() if class_data_dir else None
        self.num_class_images = int(num_class_images)
        self.classes = _Images([], class_prompt or "", transform, f"class_data_dir '{class_data_dir}'")
        if self.with_prior_preservation:
            self.scan_class_images()
        if check_identifier:
            for problem in identifier_problems(instance_prompt, class_prompt):
                log.warning("DreamBooth: %s", problem)

    def scan_class_images(self) -> int:
        """(Re)read ``class_data_dir``, keeping the first ``num_class_images`` images; return how many are missing."""
        found = find_images(self.class_data_dir) if self.class_data_dir.is_dir() else []
        self.classes.files = found[: self.num_class_images]
        return self.num_class_images - len(self.classes.files)

    def __len__(self) -> int:
        n = len(self.instance)
        return max(n, len(self.classes)) if self.with_prior_preservation else n

    def _check_classes(self) -> None:
        if not self.classes.files:
            raise RuntimeError(f"DreamBoothDataset: class_data_dir '{self.class_data_dir}' holds no images; add the "
                               "ldm.callbacks.dreambooth.ClassImages callback to generate them")

    # ---- buckets and caches: an item's bucket is its instance photo's; the class example is cropped to it -----
    targets: list | None = None

    def image_sizes(self) -> list:
        sizes = self.instance.image_sizes()
        return [sizes[i % len(self.instance)] for i in range(len(self))]

    def use_buckets(self, targets, crop) -> None:
        self.targets = list(targets) if targets is not None else None
        self.instance.bucket_crop = self.classes.bucket_crop = crop

    def slots(self, i: int) -> dict[str, tuple[ImageCaptionDataset, int]]:
        """Which image of which set fills each image key of item ``i``."""
        slots = {"image": (self.instance, i % len(self.instance))}
        if self.with_prior_preservation:
            self._check_classes()
            slots["class_image"] = (self.classes, i % len(self.classes))
        return slots

    def captions_of(self, i: int) -> dict[str, str]:
        out = {"caption": self.instance_prompt}
        if self.with_prior_preservation:
            out["class_caption"] = self.class_prompt
        return out

    def __getitem__(self, i: int) -> dict[str, Any]:
        target = self.targets[i] if self.targets is not None else None
        slots = self.slots(i)
        ds, j = slots["image"]
        item = ds.item(j, target)
        if "class_image" in slots:
            ds, j = slots["class_image"]
            example = ds.item(j, target)
            item = {**item, "class_image": example["image"], "class_caption": example["caption"]}
        return item
