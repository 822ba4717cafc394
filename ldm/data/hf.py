"""Hugging Face ``datasets`` as an image-caption source: hub names, local imagefolders, save_to_disk folders.

Images are read with ``decode=False`` and decoded by :func:`ldm.data.images.load_rgb`, because the
library's own decoder raises inside ``__getitem__`` and a single broken image would end the run.
"""
from __future__ import annotations

import io
import os
import random
from typing import Any, Sequence

import datasets

from ldm.data.images import ImageCaptionDataset, ImageSource
from ldm.data.transforms import build_transforms
from ldm.util import ConfigError


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def _load(name: str, split: str, data_dir: str | None, load_kwargs: dict[str, Any]) -> datasets.Dataset:
    """Pick the loader from what ``name`` is: a save_to_disk folder, a plain local folder, or a hub/script name."""
    local = os.path.isdir(os.path.expanduser(name))
    try:
        if local and _is_saved_dataset(os.path.expanduser(name)):
            ds = datasets.load_from_disk(os.path.expanduser(name))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"hf_dataset: saved dataset '{name}' has no split {split!r}; splits: {sorted(ds)}")
                ds = ds[split]
            return ds
        if local:
            return datasets.load_dataset("imagefolder", data_dir=os.path.expanduser(name), split=split, **load_kwargs)
        return datasets.load_dataset(name, data_dir=data_dir, split=split, **load_kwargs)
    except ConfigError:
        raise
    except Exception as err:  # the library raises many types (hub, offline, split, format); all mean "cannot load"
        reason = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
        hint = "" if local else (
            "; if offline (HF_HUB_OFFLINE=1) or the name is a typo, use a local imagefolder path "
            "(images + metadata.jsonl) or a datasets.save_to_disk folder"
        )
        raise ConfigError(f"hf_dataset: cannot load {name!r} split {split!r}: {reason}{hint}") from err


class HFImageCaption(ImageCaptionDataset):
    """Rows of a ``datasets.Dataset`` as ``{"image", "caption"}`` items, with bad images skipped."""

    def __init__(self, ds: datasets.Dataset, name: str, image_column: str, text_column: str, transform) -> None:
        super().__init__(transform, f"dataset {name!r}")
        self.name = name
        self.image_column = image_column
        self.text_column = text_column
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds = ds.select_columns([image_column, text_column])

    def __len__(self) -> int:
        return len(self.ds)

    def _record(self, i: int) -> tuple[ImageSource, str, str]:
        row = self.ds[i]
        image, caption = row[self.image_column], row[self.text_column]
        if isinstance(image, dict):  # undecoded Image feature: bytes, or a path for datasets that reference files
            path = image.get("path")
            src = io.BytesIO(image["bytes"]) if image.get("bytes") is not None else path
        else:
            path = src = image
        if isinstance(caption, (list, tuple)):  # several captions per image: one at random each time
            caption = random.choice(caption) if caption else ""
        return src, f"{self.name}[{i}] {path or ''}".strip(), "" if caption is None else str(caption)


def hf_dataset(
    name: str,
    split: str = "train",
    image_transforms: Sequence[Any] = (),
    image_column: str = "image",
    text_column: str = "text",
    data_dir: str | None = None,
    **load_kwargs: Any,
) -> HFImageCaption:
    """Load ``name`` (hub name or local folder) and check the columns now, so a typo fails before training."""
    ds = _load(name, split, data_dir, load_kwargs)
    if not isinstance(ds, datasets.Dataset):
        raise ConfigError(f"hf_dataset: {name!r} split {split!r} gave a {type(ds).__name__}, expected a map-style Dataset")
    for role, column in (("image_column", image_column), ("text_column", text_column)):
        if column not in ds.column_names:
            raise ConfigError(
                f"hf_dataset: {role} {column!r} not found in {name!r} split {split!r}; columns are {ds.column_names}"
            )
    if len(ds) == 0:
        raise ConfigError(f"hf_dataset: {name!r} split {split!r} has no rows")
    return HFImageCaption(ds, name, image_column, text_column, build_transforms(image_transforms))
