"""A folder of images with captions: the simplest way to fine-tune on your own pictures.

Captions are read by :class:`FolderCaptions`, the one rule that training and the data tools
(``scripts/prepare_dataset.py``, ``caption.py``, ``contact_sheet.py``) share. For each image, the first non-empty of:

1. its row in the caption file: ``metadata.jsonl`` in the root (the Hugging Face imagefolder layout), or
   ``caption_file:`` (jsonl or csv with ``file_name``/``text``);
2. its same-name sidecar, ``cat.png`` + ``cat.txt`` (``caption_ext``);
3. ``default_caption`` (``""`` in the tools).

An empty, blank or null row therefore falls back to the sidecar: a freshly prepared folder lists every image with
``""``, and a caption written by hand next to the image must still count. Text files may be UTF-8 (with or without
a BOM), UTF-16 with a BOM, or an 8-bit Windows/Latin-1 encoding (read as cp1252, then latin-1, with one warning per
file), so an old caption file never stops a run.
"""
from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from ldm.data.caption_tags import build_caption_transform
from ldm.data.images import ImageCaptionDataset, ImageSource
from ldm.data.transforms import build_transforms
from ldm.util import ConfigError

log = logging.getLogger(__name__)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".tiff", ".tif")
_warned: set[str] = set()  # per process: a caption file is reported once, not once per epoch


def find_images(root: Path) -> list[Path]:
    """Images under ``root`` recursively, sorted for a stable order; hidden folders are ignored."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath, f) for f in filenames if f.lower().endswith(IMAGE_EXTENSIONS)]
    return sorted(found)


# ---- text files in whatever encoding they were saved -----------------------------------------------------------
def decode_text(data: bytes, name: str) -> str:
    """UTF-8 (BOM stripped), UTF-16 with a BOM, else cp1252, else latin-1; a non-UTF-8 guess warns once per name."""
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        try:
            text, encoding = data.decode("cp1252"), "cp1252"
        except UnicodeDecodeError:  # cp1252 leaves five bytes undefined; latin-1 maps every byte
            text, encoding = data.decode("latin-1"), "latin-1"
        if name not in _warned:
            _warned.add(name)
            log.warning("%s is not UTF-8 (byte 0x%02x on line %d); read it as %s. Save it as UTF-8 to be sure of "
                        "the accents", name, data[err.start], line, encoding)
        return text


def read_text(path: str | os.PathLike) -> str:
    """A text file's contents by :func:`decode_text`'s rules."""
    return decode_text(Path(path).read_bytes(), os.fspath(path))


def jsonl_rows(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(1-based line number, row)`` for every non-blank line of a jsonl file; one-line ConfigError otherwise."""
    example = '{"file_name": "cat.png", "text": "a cat"}'
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines(): JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            row = json.loads(line.strip())
        except json.JSONDecodeError as err:
            raise ConfigError(f"caption file '{path}' line {lineno}: not valid JSON ({err.msg} at column {err.colno}); "
                              f"expected one JSON object per line like {example}") from err
        if not isinstance(row, dict):
            raise ConfigError(f"caption file '{path}' line {lineno}: expected a JSON object like {example}, "
                              f"got a {type(row).__name__}")
        yield lineno, row


def _caption_text(value: Any, path: Path, where: str, key: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ConfigError(f"caption file '{path}' {where}: {key!r} must be a string or null, got a "
                          f"{type(value).__name__} ({json.dumps(value)[:60]})")
    return value.strip()


def read_caption_file(path: Path, file_key: str = "file_name", caption_key: str = "text") -> dict[str, str]:
    """``{file name as written: caption}`` from a jsonl or csv caption file (blank and null captions are ``""``)."""
    path = Path(path)
    text = read_text(path)
    rows: list[tuple[str, dict[str, Any]]] = []
    if path.suffix.lower() == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        if not {file_key, caption_key} <= set(reader.fieldnames or []):
            raise ConfigError(f"caption file '{path}' needs columns {file_key!r} and {caption_key!r}, "
                              f"has {reader.fieldnames or []}")
        rows = [(f"line {reader.line_num}", row) for row in reader]
    else:
        rows = [(f"line {n}", row) for n, row in jsonl_rows(path, text)]
    captions, first_seen = {}, {}
    for where, row in rows:
        if file_key not in row or caption_key not in row:
            raise ConfigError(f"caption file '{path}' {where}: needs keys {file_key!r} and {caption_key!r}, "
                              f"has {sorted(row)}")
        if not isinstance(row[file_key], str) or not row[file_key].strip():
            raise ConfigError(f"caption file '{path}' {where}: {file_key!r} must be an image path, got "
                              f"{json.dumps(row[file_key])[:60]}")
        text = _caption_text(row[caption_key], path, where, caption_key)
        name = row[file_key]
        if name in first_seen:
            # The first row wins, as for a file listed twice in a hand-made list; a later row is most often a paste.
            _warn_once(f"{path}:{where}", "caption file '%s' %s: %r is listed again (first on %s); the later row "
                       "is ignored", path, where, name, first_seen[name])
            continue
        first_seen[name] = where
        captions[name] = text
    return captions


def _warn_once(key: str, message: str, *args: Any) -> None:
    if key not in _warned:
        _warned.add(key)
        log.warning(message, *args)


def _key(path: str | os.PathLike) -> str:
    """The same string for a caption file's name and the image it means: folders resolved, the file itself not."""
    path = os.path.normpath(os.path.abspath(path))
    return os.path.join(os.path.realpath(os.path.dirname(path)), os.path.basename(path))


def sidecar_caption(image: str | os.PathLike, ext: str = ".txt") -> str:
    """The stripped text of the image's same-name sidecar, ``""`` when there is none or it cannot be read."""
    sidecar = Path(image).with_suffix(ext)
    try:
        return read_text(sidecar).strip() if sidecar.is_file() else ""
    except OSError as err:  # e.g. no permission: one unreadable caption must not stop a run
        if str(sidecar) not in _warned:
            _warned.add(str(sidecar))
            log.warning("cannot read caption %s (%s); using the next caption source", sidecar, err)
        return ""


class FolderCaptions:
    """The caption of any image under ``root`` by the rule in the module docstring (``""`` where none).

    ``caption_file`` defaults to ``root/metadata.jsonl`` when that exists; a relative path is tried as given, then
    inside ``root``. Names in it are relative to the folder holding it, as in the Hugging Face imagefolder.
    """

    def __init__(self, root: str | os.PathLike, caption_file: str | os.PathLike | None = None,
                 caption_ext: str = ".txt", file_column: str = "file_name", caption_column: str = "text") -> None:
        root = Path(root).expanduser()
        self.caption_ext = caption_ext
        self.caption_file: Path | None = None
        self.rows: dict[str, str] = {}
        if caption_file is None and (root / "metadata.jsonl").is_file():
            caption_file = root / "metadata.jsonl"
        if caption_file is not None:
            path = Path(caption_file).expanduser()
            if not path.is_file() and (root / path).is_file():
                path = root / path
            if not path.is_file():
                raise ConfigError(f"caption_file '{caption_file}' does not exist (also looked in '{root}')")
            self.caption_file = path
            listed = read_caption_file(path, file_column, caption_column)
            self.rows = {_key(path.parent / name): text for name, text in listed.items()}
            for name in listed:
                if not os.path.lexists(path.parent / name):  # lexists: a broken link is an image to skip, not a gap
                    _warn_once(f"{path}:{name}", "caption file '%s' lists %r, which is not in '%s'; its row is "
                               "ignored", path, name, path.parent)

    def __call__(self, image: str | os.PathLike) -> str:
        return self.rows.get(_key(image)) or sidecar_caption(image, self.caption_ext)


class FolderDataset(ImageCaptionDataset):
    """Images under ``root`` with captions; see the module docstring for where captions come from.
    ``caption_tags`` (``{keep_first: 1, shuffle: true, dropout: 0.1}``) reshuffles comma-separated tags each time an
    item is read (``ldm.data.caption_tags``).

    Captions are read once here, so encoding warnings and caption-file errors come before training starts.
    """

    splittable = True

    def __init__(
        self,
        root: str,
        caption_file: str | None = None,
        image_transforms: Sequence[Any] = (),
        caption_ext: str = ".txt",
        default_caption: str = "",
        file_column: str = "file_name",
        caption_column: str = "text",
        caption_tags: dict | None = None,
    ) -> None:
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise ConfigError(f"FolderDataset: image folder '{root}' does not exist (resolved to '{self.root.resolve()}')")
        super().__init__(build_transforms(image_transforms), f"folder '{root}'", build_caption_transform(caption_tags))
        self.files = find_images(self.root)
        if not self.files:
            raise ConfigError(
                f"FolderDataset: no images in folder '{root}' (looked recursively for {', '.join(IMAGE_EXTENSIONS)})"
            )
        self.default_caption = default_caption
        try:
            read = FolderCaptions(self.root, caption_file, caption_ext, file_column, caption_column)
        except ConfigError as err:
            raise ConfigError(f"FolderDataset: {err}") from err
        self.captions = [read(path) or default_caption for path in self.files]

    def __len__(self) -> int:
        return len(self.files)

    def _select(self, indices: list[int]) -> None:
        self.files = [self.files[i] for i in indices]
        self.captions = [self.captions[i] for i in indices]

    def _record(self, i: int) -> tuple[ImageSource, str, str]:
        path = self.files[i]
        return path, str(path), self.captions[i]
