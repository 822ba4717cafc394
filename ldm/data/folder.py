"""A folder of images with captions: the simplest way to fine-tune on your own pictures.

Captions come, in order of preference, from a caption file (jsonl or csv with ``file_name``/``text``,
the Hugging Face imagefolder layout; ``metadata.jsonl`` in the root is picked up automatically),
from a sidecar text file next to the image (``cat.png`` + ``cat.txt``), or from ``default_caption``.
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any, Sequence

from ldm.data.images import ImageCaptionDataset, ImageSource
from ldm.data.transforms import build_transforms
from ldm.util import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tiff", ".tif")


def find_images(root: Path) -> list[Path]:
    """Images under ``root`` recursively, sorted for a stable order; hidden folders are ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


def read_caption_file(path: Path, file_key: str, caption_key: str) -> dict[str, str]:
    """``{relative file name: caption}`` from a jsonl or csv caption file."""
    rows: list[dict[str, Any]] = []
    with open(path, newline="", encoding="utf-8") as f:
        if path.suffix.lower() == ".csv":
            rows = list(csv.DictReader(f))
        else:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as err:
                        raise ConfigError(f"caption file '{path}' line {lineno} is not valid JSON: {err}") from err
    for n, row in enumerate(rows, 1):
        if file_key not in row or caption_key not in row:
            raise ConfigError(
                f"caption file '{path}' row {n} needs keys {file_key!r} and {caption_key!r}, has {sorted(row)}"
            )
    return {os.path.normpath(str(r[file_key])): str(r[caption_key]).strip() for r in rows}


class FolderDataset(ImageCaptionDataset):
    """Images under ``root`` with captions; see the module docstring for where captions come from."""

    def __init__(
        self,
        root: str,
        caption_file: str | None = None,
        image_transforms: Sequence[Any] = (),
        caption_ext: str = ".txt",
        default_caption: str = "",
        file_column: str = "file_name",
        caption_column: str = "text",
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"FolderDataset: image folder '{root}' does not exist (resolved to '{self.root.resolve()}')")
        super().__init__(build_transforms(image_transforms), f"folder '{root}'")
        self.files = find_images(self.root)
        if not self.files:
            raise ConfigError(
                f"FolderDataset: no images in folder '{root}' (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.caption_ext = caption_ext
        self.default_caption = default_caption
        self.captions = {}
        if caption_file is None and (self.root / "metadata.jsonl").is_file():
            caption_file = str(self.root / "metadata.jsonl")
        if caption_file is not None:
            path = Path(caption_file).expanduser()
            if not path.is_file() and (self.root / path).is_file():
                path = self.root / path
            if not path.is_file():
                raise ConfigError(f"FolderDataset: caption_file '{caption_file}' does not exist")
            # Names in a caption file are relative to the folder holding it, as in HF imagefolder.
            base = path.parent.resolve()
            self.captions = {
                os.path.normpath(os.path.join(base, name)): text
                for name, text in read_caption_file(path, file_column, caption_column).items()
            }

    def __len__(self) -> int:
        return len(self.files)

    def caption_for(self, path: Path) -> str:
        from_file = self.captions.get(os.path.normpath(path.resolve()))
        if from_file is not None:
            return from_file
        sidecar = path.with_suffix(self.caption_ext)
        if sidecar.is_file():
            return sidecar.read_text(encoding="utf-8").strip()
        return self.default_caption

    def _record(self, i: int) -> tuple[ImageSource, str, str]:
        path = self.files[i]
        return path, str(path), self.caption_for(path)
