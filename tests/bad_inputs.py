"""A corpus of awkward real-world inputs, generated at test time with PIL and numpy (nothing binary is committed).

:func:`write_corpus` fills a folder with images in every mode and container a scraped set holds, with files that
are not images at all, with symlinks that loop, and with captions in the encodings people save them in.
:data:`IMAGES` says what each file is and whether training must use it (``"trains"``) or skip it with one
warning (``"skipped"``); :data:`CAPTIONS` does the same for the caption files. The datasets' tests train through
it (tests/test_bad_inputs.py).
"""
from __future__ import annotations

import io
import json
import os
import tarfile
import zlib
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

DEFAULT_CAPTION = "an awkward picture"
LONG_CAPTION = " ".join(["painting"] * 500)  # 500 words: far beyond CLIP's 77 tokens


def _encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def _picture(w: int, h: int, seed: int) -> Image.Image:
    """A smooth colour gradient with a little noise, so every format has something to encode."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // max(w - 1, 1), y * 255 // max(h - 1, 1), np.full_like(x, 128)], -1)
    rgb = np.clip(rgb + rng.integers(-10, 10, rgb.shape), 0, 255).astype(np.uint8)
    return Image.fromarray(rgb, "RGB")


def _cmyk() -> bytes:
    return _encoded(_picture(24, 24, 1).convert("CMYK"), "JPEG", quality=90)


def _gray16() -> bytes:
    return _encoded(Image.fromarray(np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16)), "PNG")


def _palette_transparent() -> bytes:
    img = _picture(24, 24, 2).quantize(16)
    return _encoded(img, "PNG", transparency=0)


def _la() -> bytes:
    gray = np.tile(np.arange(24, dtype=np.uint8) * 10, (24, 1))
    alpha = np.where(np.arange(24)[:, None] < 12, 255, 0).astype(np.uint8).repeat(24, 1)
    return _encoded(Image.fromarray(np.stack([gray, alpha], -1), "LA"), "PNG")


def _exif_rotated() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90° clockwise: the stored landscape is a portrait
    return _encoded(_picture(40, 20, 3), "JPEG", exif=exif, quality=90)


def _animated_gif() -> bytes:
    frames = [_picture(20, 20, s).convert("P") for s in range(3)]
    return _encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50, loop=0)


def _float_tiff() -> bytes:
    return _encoded(Image.fromarray(np.linspace(0, 1, 24 * 24, dtype=np.float32).reshape(24, 24), "F"), "TIFF")


def _truncated_jpeg() -> bytes:
    data = _encoded(_picture(64, 64, 4), "JPEG", quality=95)
    return data[: len(data) // 2]


def _bomb_png(side: int = 30000) -> bytes:
    """A valid PNG signature and IHDR declaring ``side`` × ``side`` pixels (900 megapixels), then one tiny IDAT: PIL
    refuses it as a decompression bomb from the header alone."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return len(body).to_bytes(4, "big") + kind + body + zlib.crc32(kind + body).to_bytes(4, "big")

    ihdr = side.to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


# name: (what it is, "trains" or "skipped", bytes maker; None for the self-pointing symlink)
IMAGES: dict[str, tuple[str, str, Callable[[], bytes] | None]] = {
    "cmyk.jpg": ("CMYK JPEG", "trains", _cmyk),
    "gray16.png": ("16-bit grayscale PNG (I;16)", "trains", _gray16),
    "palette_transparent.png": ("palette PNG with a transparent colour", "trains", _palette_transparent),
    "gray_alpha.png": ("grayscale + alpha PNG (LA)", "trains", _la),
    "one_pixel.png": ("1x1 pixel PNG", "trains", lambda: _encoded(_picture(1, 1, 5), "PNG")),
    "wide.png": ("2:1 PNG", "trains", lambda: _encoded(_picture(64, 32, 6), "PNG")),
    "tall.png": ("1:15 PNG", "trains", lambda: _encoded(_picture(8, 120, 7), "PNG")),
    "exif_rotated.jpg": ("JPEG with EXIF orientation 6", "trains", _exif_rotated),
    "animated.gif": ("animated GIF, 3 frames", "trains", _animated_gif),
    "float32.tif": ("32-bit float TIFF (mode F)", "trains", _float_tiff),
    "webp.webp": ("WebP", "trains", lambda: _encoded(_picture(24, 24, 8), "WEBP", quality=80)),
    "bitmap.bmp": ("BMP", "trains", lambda: _encoded(_picture(24, 24, 9), "BMP")),
    "truncated.jpg": ("JPEG cut off half way", "skipped", _truncated_jpeg),
    "empty.png": ("zero-byte file", "skipped", lambda: b""),
    "page.jpg": ("an HTML page saved as .jpg", "skipped",
                 lambda: b"<!DOCTYPE html><html><head><title>404</title></head><body>Not found</body></html>\n"),
    "noise.png": ("random bytes named .png", "skipped",
                  lambda: np.random.default_rng(10).integers(0, 256, 4096, dtype=np.uint8).tobytes()),
    "bomb.png": ("PNG whose header declares 30000x30000 (a decompression bomb)", "skipped", _bomb_png),
    "self_link.png": ("a symlink pointing at itself", "skipped", None),
}
LOOP_DIR = "loop"  # a directory symlink to its own parent: a walk that follows it never ends

# caption file: (what it is, its bytes, the caption training must read; None: the sidecar is absent)
CAPTIONS: dict[str, tuple[str, bytes | None, str]] = {
    "cmyk.txt": ("Latin-1 (not UTF-8)", "café crème, déjà vu".encode("latin-1"), "café crème, déjà vu"),
    "gray16.txt": ("UTF-8 with a BOM", "\ufeffa gray ramp".encode("utf-8"), "a gray ramp"),
    "palette_transparent.txt": ("empty", b"", DEFAULT_CAPTION),
    "wide.txt": ("500 words", LONG_CAPTION.encode(), LONG_CAPTION),
    "tall.txt": ("missing", None, DEFAULT_CAPTION),
}


def good_names() -> list[str]:
    return [n for n, (_, fate, _) in IMAGES.items() if fate == "trains"]


def bad_names() -> list[str]:
    return [n for n, (_, fate, _) in IMAGES.items() if fate == "skipped"]


def write_corpus(root: Path, links: bool = True) -> Path:
    """Every file of :data:`IMAGES` and :data:`CAPTIONS` in ``root`` (plus the looping symlinks unless ``links`` is
    false); the other images get a plain ``<stem>.txt`` caption ``"<what it is>"``."""
    root.mkdir(parents=True, exist_ok=True)
    for name, (what, _, make) in IMAGES.items():
        if make is not None:
            (root / name).write_bytes(make())
        elif links:
            os.symlink(name, root / name)  # relative: it names itself
        stem = Path(name).stem
        if f"{stem}.txt" not in CAPTIONS:
            (root / f"{stem}.txt").write_text(what)
    for name, (_, data, _) in CAPTIONS.items():
        if data is not None:
            (root / name).write_bytes(data)
    if links:
        os.symlink("..", root / LOOP_DIR)
    return root


def expected_caption(name: str) -> str:
    stem = Path(name).stem
    if f"{stem}.txt" in CAPTIONS:
        return CAPTIONS[f"{stem}.txt"][2]
    return IMAGES[name][0]


def write_metadata(root: Path, broken: bool = False) -> Path:
    """``root/metadata.jsonl`` with a row per image (captions as :func:`expected_caption`), a row for a file that
    is not there (line 3), a second row for ``bitmap.bmp`` (``"a duplicate row"``, the last line) and, with
    ``broken``, a line that is not JSON (line 4)."""
    rows = [json.dumps({"file_name": n, "text": expected_caption(n)}) for n in IMAGES]
    rows.insert(2, json.dumps({"file_name": "gone.png", "text": "a file that was deleted"}))
    rows.append(json.dumps({"file_name": "bitmap.bmp", "text": "a duplicate row"}))
    if broken:
        rows.insert(3, '{"file_name": "wide.png", "text": "no closing quote}')
    path = root / "metadata.jsonl"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def write_shard(path: Path) -> Path:
    """The corpus as one WebDataset-style tar: ``NNNNNN.<ext>`` + ``NNNNNN.txt`` per image (symlinks left out, tar
    members are files), in :data:`IMAGES` order."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for k, (name, (what, _, make)) in enumerate(IMAGES.items()):
            if make is None:
                continue
            members = {f"{k:06d}{Path(name).suffix}": make()}
            caption = CAPTIONS.get(f"{Path(name).stem}.txt", (None, what.encode(), None))[1]
            if caption is not None:
                members[f"{k:06d}.txt"] = caption
            for member, data in members.items():
                info = tarfile.TarInfo(member)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def shard_member(name: str) -> str:
    """The tar member :func:`write_shard` stores image ``name`` under."""
    return f"{list(IMAGES).index(name):06d}{Path(name).suffix}"
