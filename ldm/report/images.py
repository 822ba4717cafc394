"""Where the report's ``<img>`` tags point: a path relative to the run dir (default), or the image itself.

Relative paths keep ``report.html`` small and its rewrite cheap, and work wherever the run dir is copied or
opened, as long as the report stays in it. ``embed=True`` makes one self-sufficient file to send around: each
image becomes a ``data:`` URI, grids larger than ``max_px`` are downscaled first, and every encoding is cached by
file, size and mtime, so a validation re-encodes only the new images.
"""
from __future__ import annotations

import base64
import io
from pathlib import Path
from urllib.parse import quote

from PIL import Image

SMALL_FILE = 256 * 1024  # a PNG grid under this size and within max_px is embedded as it is


class ImageSource:
    def __init__(self, run: Path, embed: bool = False, max_px: int = 768) -> None:
        self.run, self.embed, self.max_px = Path(run), embed, max_px
        self._uris: dict[tuple, str] = {}

    def __call__(self, relpath: str) -> str:
        if not self.embed:
            return quote(relpath)
        path = self.run / relpath
        stat = path.stat()
        key = (relpath, stat.st_size, stat.st_mtime_ns)
        if key not in self._uris:
            self._uris[key] = self._encode(path, stat.st_size)
        return self._uris[key]

    def _encode(self, path: Path, size: int) -> str:
        if path.suffix.lower() == ".gif":  # animated: embedded as written, downscaling would need every frame
            return _uri("image/gif", path.read_bytes())
        with Image.open(path) as image:
            if size <= SMALL_FILE and max(image.size) <= self.max_px:
                return _uri("image/png", path.read_bytes())
            image = image.convert("RGB")
            image.thumbnail((self.max_px, self.max_px), Image.Resampling.LANCZOS)
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=88)
        return _uri("image/jpeg", buffer.getvalue())


def _uri(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"
