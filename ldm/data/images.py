"""Image decoding and the corrupt-file policy shared by every image dataset.

Scraped fine-tuning sets contain every PIL mode there is (CMYK JPEGs, 16-bit PNGs, palettes with
transparency, rotated phone photos) and a few broken files. Decoding is centralised here so all
datasets hand the model the same thing: an upright 8-bit RGB picture, or a :class:`BadImage` that the
dataset turns into "skip this file, warn once, serve another item".
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import tempfile
import weakref
from typing import Any, BinaryIO, Callable, Iterator, Union

import numpy as np
import torch
from PIL import Image, ImageOps
from torch.utils.data import Dataset

log = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, BinaryIO, bytes, Image.Image]


class BadImage(OSError):
    """An image file that cannot be decoded; the message names the file and the reason."""


def _name_of(src: ImageSource) -> str:
    if isinstance(src, (str, os.PathLike)):
        return os.fspath(src)
    return getattr(src, "filename", None) or getattr(src, "name", None) or f"<{type(src).__name__}>"


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale integer/float grayscale to 0..255 instead of letting PIL clip it (a 16-bit PNG would turn white)."""
    arr = np.asarray(img).astype(np.float64)
    if img.mode.startswith("I;16"):
        arr = arr / 257.0
    elif img.mode == "F" and arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
        arr = arr * 255.0
    elif arr.size and (arr.min() < 0 or arr.max() > 255):
        # Mode "I"/"F" does not record the bit depth: 0..65535 is the usual 16-bit case, anything else is stretched.
        lo, hi = (0.0, 65535.0) if arr.min() >= 0 and arr.max() <= 65535 else (arr.min(), arr.max())
        arr = (arr - lo) * (255.0 / max(hi - lo, 1e-12))
    return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        img = _to_8bit(img)
    if (img.mode == "P" and "transparency" in img.info) or img.mode in ("PA", "LA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        # Transparent pixels carry arbitrary colour; white is what a viewer shows and what captions describe.
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img if img.mode == "RGB" else img.convert("RGB")


def load_rgb(src: ImageSource, name: str | None = None) -> Image.Image:
    """Decode ``src`` (path, file object, bytes or PIL image) into an upright 8-bit RGB image.

    The pixels are fully decoded here so a truncated file fails now, inside the dataset's try/except,
    rather than later in a transform. Animated images give their first frame. ``name`` is what errors call
    the image (default: its path), e.g. ``shard.tar:000123.jpg`` for bytes read from an archive.
    """
    name = name or _name_of(src)
    opened = None
    try:
        if isinstance(src, Image.Image):
            img = src
        else:
            img = opened = Image.open(io.BytesIO(src) if isinstance(src, bytes) else src)
        img.seek(0)
        img.load()
        try:
            upright = ImageOps.exif_transpose(img)  # always a new image, independent of the file
        except Exception:  # a malformed EXIF block should cost the orientation, not the picture
            upright = img.copy()
        return _to_rgb(upright)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as err:
        raise BadImage(f"cannot decode image {name}: {type(err).__name__}: {err}") from err
    finally:
        if opened is not None:
            opened.close()


_TURNED = {5, 6, 7, 8}  # EXIF orientations that swap width and height


def peek_size(src: ImageSource) -> tuple[int, int] | None:
    """``(width, height)`` of the upright image from its header alone (no decoding), or None when unreadable."""
    try:
        if isinstance(src, Image.Image):
            return src.size
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as img:
            w, h = img.size
            try:
                turned = img.getexif().get(0x0112) in _TURNED
            except Exception:  # a malformed EXIF block: load_rgb keeps the picture as stored too
                turned = False
        return (h, w) if turned else (w, h)
    except Exception:
        return None


def source_identity(src: ImageSource, name: str) -> str:
    """What changes when the image does: path + size + mtime for files, a content hash for bytes."""
    if isinstance(src, (str, os.PathLike)):
        st = os.stat(src)
        return f"{os.path.realpath(src)}|{st.st_size}|{st.st_mtime_ns}"
    if isinstance(src, io.BytesIO):
        src = src.getvalue()
    if isinstance(src, bytes):
        return f"{name}|sha1:{hashlib.sha1(src).hexdigest()}"
    if isinstance(src, Image.Image):
        return f"{name}|sha1:{hashlib.sha1(src.tobytes()).hexdigest()}"
    raise TypeError(f"no identity for image source {type(src).__name__} ({name})")


def _remove_dir(path: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:
        shutil.rmtree(path, ignore_errors=True)


class SkipLog:
    """Records skipped files in a directory so every DataLoader worker reports into the same place.

    Worker processes lose their Python state, so each bad file becomes a marker file created with
    O_EXCL: exactly one process wins the creation and emits the single warning, and the main process
    lists the directory to report. The directory is removed when the main-process object goes away.
    """

    def __init__(self) -> None:
        self.path = tempfile.mkdtemp(prefix="ldm-skipped-")
        self._known: set[str] = set()
        # Forked workers inherit this finalizer; only the creating process may delete the directory.
        weakref.finalize(self, _remove_dir, self.path, os.getpid())

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "_known": set()}

    def __contains__(self, name: str) -> bool:
        return name in self._known

    def add(self, name: str, reason: str) -> None:
        self._known.add(name)
        marker = os.path.join(self.path, hashlib.sha1(name.encode()).hexdigest())
        try:
            fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            return
        with os.fdopen(fd, "w") as f:
            f.write(name)
        log.warning("skipping unreadable image (the batch gets another item instead): %s", reason)

    @property
    def files(self) -> list[str]:
        names = []
        for entry in sorted(os.listdir(self.path)):
            with open(os.path.join(self.path, entry)) as f:
                names.append(f.read())
        return sorted(names)


class ImageCaptionDataset(Dataset):
    """Base for image datasets: yields ``{"image": (3,H,W) in [-1,1], "caption": str}`` and skips bad files.

    Subclasses implement ``__len__`` and ``_record(i) -> (image source, display name, caption)``.
    A bad item is replaced by the next readable index so batches keep their size.

    With aspect-ratio buckets (``use_buckets``, called by the DataModule) item ``i`` is first resized and cropped
    to its bucket ``targets[i]`` (the replacement of a bad item too, so a batch keeps one size) and also carries
    ``original_size`` and ``crop_top_left`` (``(h, w)`` and ``(top, left)``).
    """

    def __init__(self, transform: Callable[[Image.Image], Any], description: str,
                 caption_transform: Callable[[str], str] | None = None) -> None:
        self.transform = transform
        self.caption_transform = caption_transform
        self.description = description
        self.skip_log = SkipLog()
        self.targets: list[tuple[int, int]] | None = None
        self.bucket_crop = None

    def _record(self, i: int) -> tuple[ImageSource, str, str]:
        raise NotImplementedError

    @property
    def skipped_files(self) -> list[str]:
        """Every file skipped so far, by this process or any DataLoader worker."""
        return self.skip_log.files

    def load_image(self, src: ImageSource, name: str) -> Image.Image | None:
        """The image, or None after recording it as skipped (one warning over all processes); known bad ones
        are not decoded again."""
        if name in self.skip_log:
            return None
        try:
            return load_rgb(src, name)
        except BadImage as err:
            self.skip_log.add(name, str(err))
            return None

    # ---- buckets and caches (ldm.data.buckets, ldm.data.cache) ----------------------------------------------
    def image_sizes(self) -> list[tuple[int, int] | None]:
        """``(width, height)`` of every item's upright image from the file headers (None where unreadable)."""
        from tqdm import tqdm

        return [peek_size(self._record(i)[0]) for i in tqdm(range(len(self)), desc=f"image sizes of {self.description}",
                                                           disable=len(self) < 1000, leave=False)]

    def use_buckets(self, targets: list[tuple[int, int]] | None, crop) -> None:
        """Serve item ``i`` at ``targets[i]`` (h, w), resized and cropped by ``crop`` (a ``BucketCrop``)."""
        self.targets, self.bucket_crop = (list(targets), crop) if targets is not None else (None, None)

    def identity(self, i: int) -> str:
        """A string that changes when item ``i``'s image file does (for cache keys)."""
        src, name, _ = self._record(i)
        return source_identity(src, name)

    def named_captions(self) -> Iterator[tuple[str, str]]:
        """``(display name, caption as stored)`` of every item, for checks made once before training."""
        for i in range(len(self)):
            _, name, caption = self._record(i)
            yield name, caption

    def caption_of(self, i: int) -> str:
        caption = self._record(i)[2]
        return self.caption_transform(caption) if self.caption_transform else caption

    def picture(self, i: int, target: tuple[int, int] | None, transform: Callable | None = None) -> dict | None:
        """Item ``i``'s image through the bucket crop and ``transform`` (default: the dataset's), or None if bad."""
        src, name, _ = self._record(i)
        image = self.load_image(src, name)
        if image is None:
            return None
        out = {}
        if target is not None:
            cropped = self.bucket_crop(image, target)
            image = cropped.image
            out["original_size"] = torch.tensor(cropped.original_size)
            out["crop_top_left"] = torch.tensor(cropped.crop_top_left)
        out["image"] = (transform or self.transform)(image)
        return out

    splittable = False  # True where _select is implemented (a held-out validation share can be taken)

    def select(self, indices: list[int]) -> "ImageCaptionDataset":
        """A dataset of the items at ``indices`` only (sharing this one's skip log); subclasses with per-item
        storage implement :meth:`_select`."""
        import copy

        part = copy.copy(self)
        part._select(list(indices))
        return part

    def _select(self, indices: list[int]) -> None:
        raise NotImplementedError(f"{type(self).__name__} cannot be split")

    def slots(self, i: int) -> dict[str, tuple["ImageCaptionDataset", int]]:
        """Which image fills each image key of item ``i`` (one here; DreamBooth has two)."""
        return {"image": (self, i)}

    def captions_of(self, i: int) -> dict[str, str]:
        return {"caption": self.caption_of(i)}

    def item(self, i: int, target: tuple[int, int] | None = None) -> dict[str, Any]:
        n = len(self)
        for offset in range(n):
            picture = self.picture((i + offset) % n, target)
            if picture is not None:
                return {**picture, "caption": self.caption_of((i + offset) % n)}
        raise BadImage(f"all {n} images of {self.description} failed to decode; see the warnings above")

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.item(i, self.targets[i] if self.targets is not None else None)
