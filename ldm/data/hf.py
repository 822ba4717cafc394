"""Hugging Face ``datasets`` as an image-caption source: hub names, local imagefolders, save_to_disk folders.

Images are read with ``decode=False`` and decoded by :func:`ldm.data.images.load_rgb`, because the
library's own decoder raises inside ``__getitem__`` and a single broken image would end the run.

A local imagefolder follows the folder caption rule (:class:`ldm.data.folder.FolderCaptions`) as far as datasets
allows: a row whose caption is empty takes the image's ``.txt`` sidecar. Its metadata files are checked first,
because datasets reports a bad line as ``ArrowInvalid ... in row N`` without the file, and N counts from 0 over
non-blank lines.
"""
from __future__ import annotations

import csv
import io
import logging
import os
import random
from pathlib import Path
from typing import Any, Sequence

import datasets

from ldm.data.caption_tags import build_caption_transform
from ldm.data.folder import jsonl_rows, sidecar_caption
from ldm.data.images import ImageCaptionDataset, ImageSource
from ldm.data.transforms import build_transforms
from ldm.util import ConfigError

log = logging.getLogger(__name__)


def _is_saved_dataset(path: str) -> bool:
    return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))


def check_imagefolder_metadata(folder: str) -> None:
    """One-line ConfigError for a metadata.jsonl/csv under ``folder`` that datasets' imagefolder would choke on."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for meta in (Path(dirpath, f) for f in filenames if f in ("metadata.jsonl", "metadata.csv")):
            data = meta.read_bytes()
            try:
                text = data.decode("utf-8-sig")  # what datasets accepts; FolderDataset is more tolerant
            except UnicodeDecodeError as err:
                line = data[:err.start].count(b"\n") + 1
                raise ConfigError(f"hf_dataset: '{meta}' line {line} is not UTF-8 (byte 0x{data[err.start]:02x}); "
                                  "datasets reads metadata files as UTF-8 only: save it as UTF-8") from err
            if meta.suffix == ".csv":
                header = next(csv.reader(io.StringIO(text)), [])
                rows = [("line 1", dict.fromkeys(header))]
            else:
                rows = [(f"line {n}", row) for n, row in jsonl_rows(meta, text)]
            for where, row in rows:
                if not any(k == "file_name" or k.endswith("_file_name") for k in row):
                    raise ConfigError(f"hf_dataset: '{meta}' {where}: needs a 'file_name' key (column) naming the image, "
                                      f"has {sorted(row)}")


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
            check_imagefolder_metadata(os.path.expanduser(name))
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

    splittable = True

    def __init__(self, ds: datasets.Dataset, name: str, image_column: str, text_column: str, transform,
                 sidecars: bool = False, caption_transform=None) -> None:
        super().__init__(transform, f"dataset {name!r}", caption_transform)
        self.name = name
        self.image_column = image_column
        self.text_column = text_column
        if isinstance(ds.features[image_column], datasets.Image):
            ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.ds = ds.select_columns([image_column, text_column])
        if sidecars:
            self.ds = self._without_missing_or_repeated_files()
        self.from_sidecar = self._sidecar_captions() if sidecars else {}

    def _without_missing_or_repeated_files(self) -> datasets.Dataset:
        """A local imagefolder's rows minus those whose file is not there and repeats of a file already listed
        (the first row wins), one warning each: the same rule as FolderDataset's caption file."""
        keep, first = [], {}
        for i, image in enumerate(self.ds[self.image_column]):
            path = image.get("path") if isinstance(image, dict) else image
            if not isinstance(path, str):
                keep.append(i)
            elif path in first:
                log.warning("hf_dataset %r: row %d lists %s again (first in row %d); the later row is ignored",
                            self.name, i, path, first[path])
            elif not os.path.lexists(path):
                log.warning("hf_dataset %r: row %d lists %s, which does not exist; the row is ignored",
                            self.name, i, path)
            else:
                first[path] = i
                keep.append(i)
        if not keep:
            raise ConfigError(f"hf_dataset: none of the {len(self.ds)} rows of {self.name!r} names an existing file")
        return self.ds if len(keep) == len(self.ds) else self.ds.select(keep)

    def _sidecar_captions(self) -> dict[int, str]:
        """``{row: sidecar caption}`` for rows of a local imagefolder whose caption is empty, read once up front."""
        empty = [i for i, text in enumerate(self.ds[self.text_column]) if text is None
                 or (isinstance(text, str) and not text.strip())]
        found = {}
        for i, image in zip(empty, self.ds.select(empty)[self.image_column] if empty else []):
            path = image.get("path") if isinstance(image, dict) else image
            text = sidecar_caption(path) if isinstance(path, str) and os.path.isfile(path) else ""
            if text:
                found[i] = text
        return found

    def __len__(self) -> int:
        return len(self.ds)

    def named_captions(self):
        """From the text column alone (``_record`` would read every image's bytes); every caption of a row that has
        several."""
        for i, caption in enumerate(self.ds[self.text_column]):
            for text in caption if isinstance(caption, (list, tuple)) else [caption]:
                text = "" if text is None else str(text).strip()
                yield f"{self.name}[{i}]", text or self.from_sidecar.get(i, "")

    @property
    def fixed_captions(self) -> bool:
        """False when rows hold several captions (one is picked at random per read), which a text cache can't hold."""
        return isinstance(self.ds.features[self.text_column], datasets.Value)

    def _select(self, indices: list[int]) -> None:
        self.from_sidecar = {new: self.from_sidecar[old] for new, old in enumerate(indices) if old in self.from_sidecar}
        self.ds = self.ds.select(indices)

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
        caption = "" if caption is None else str(caption).strip()
        return src, f"{self.name}[{i}] {path or ''}".strip(), caption or self.from_sidecar.get(i, "")


def hf_dataset(
    name: str,
    split: str = "train",
    image_transforms: Sequence[Any] = (),
    image_column: str = "image",
    text_column: str = "text",
    data_dir: str | None = None,
    caption_tags: dict | None = None,
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
    local = os.path.expanduser(name)
    imagefolder = os.path.isdir(local) and not _is_saved_dataset(local)
    return HFImageCaption(ds, name, image_column, text_column, build_transforms(image_transforms), sidecars=imagefolder,
                          caption_transform=build_caption_transform(caption_tags))
