"""Files the sampling scripts read and write: prompts, init images, PNGs that carry their own settings, numbered
outputs, labelled grids and GIFs."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin, UnidentifiedImageError

from ldm.util import ConfigError, atomic_path

META_KEY = "sd-finetune"  # PNG text chunk holding every setting as JSON; the other chunks are for people
MULTIPLE = 8


# ---- inputs -------------------------------------------------------------------------------------------
def read_prompts(prompt: str | None, from_file: str | None) -> list[str]:
    """``--prompt`` (may be "", an unconditional sample) or ``--from-file`` (one prompt a line, blank lines skipped)."""
    if from_file is None:
        if prompt is None:
            raise ConfigError("give a prompt (--prompt TEXT, or --prompt '' for an unconditional sample) "
                              "or --from-file")
        return [prompt]
    path = Path(from_file)
    if not path.is_file():
        raise ConfigError(f"prompt file {from_file!r} does not exist")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"prompt file {from_file!r} holds no prompt (one a line)")
    return prompts


def check_size(height: int | None, width: int | None) -> None:
    for flag, v in (("--H", height), ("--W", width)):
        if v is not None and (v <= 0 or v % MULTIPLE):
            hint = max(MULTIPLE, v - v % MULTIPLE)
            raise ConfigError(f"{flag} {v} is not a positive multiple of {MULTIPLE}; try {hint}")


def file_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def load_init_image(path: str | Path, height: int | None = None, width: int | None = None) -> Image.Image:
    """Any image PIL reads, as RGB at a size the VAE takes.

    EXIF rotation is applied; transparency is composited onto white; other modes (L, CMYK, 16-bit...) convert to
    RGB. Size: ``height``x``width`` if both are given; one of them keeps the aspect ratio (the other side rounded
    to a multiple of 8); neither rounds each side down to a multiple of 8. Always a Lanczos resize, never a crop,
    as diffusers' image processor does.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"init image {str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            im.load()
            image = ImageOps.exif_transpose(im)
    except (UnidentifiedImageError, OSError, SyntaxError) as err:
        raise ConfigError(f"init image {str(path)!r} is not an image PIL can read ({err})") from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image.alpha_composite(rgba)
    image = image.convert("RGB")
    w, h = image.size
    if height is None and width is None:
        width, height = w - w % MULTIPLE, h - h % MULTIPLE
    elif height is None:
        height = max(MULTIPLE, round(h * width / w / MULTIPLE) * MULTIPLE)
    elif width is None:
        width = max(MULTIPLE, round(w * height / h / MULTIPLE) * MULTIPLE)
    if width < MULTIPLE or height < MULTIPLE:
        raise ConfigError(f"init image {str(path)!r} is {w}x{h}, smaller than {MULTIPLE}x{MULTIPLE} pixels")
    return image if (width, height) == image.size else image.resize((width, height), Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image, channels: int = 3):
    """PIL image → (1, C, H, W) float32 in [-1, 1]; one channel (pixel-space gray models) is PIL's luma."""
    import torch

    x = np.asarray(image.convert("L" if channels == 1 else "RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(x.reshape(*x.shape[:2], -1)).permute(2, 0, 1)[None]
    return x * 2 - 1


def to_pil(image) -> Image.Image:
    """HxWxC uint8 (C = 1 or 3) or PIL → PIL (gray or RGB)."""
    if isinstance(image, Image.Image):
        return image
    array = np.asarray(image)
    return Image.fromarray(array[..., 0] if array.ndim == 3 and array.shape[-1] == 1 else array)


# ---- PNGs with their settings --------------------------------------------------------------------------
def write_png(path: str | Path, image, meta: dict) -> Path:
    """Save ``image`` (HxWx3 uint8 or PIL) with ``meta`` as PNG text chunks: one per key, and all as JSON. The
    file appears complete or not at all, so an interrupted run never leaves a numbered PNG that cannot be read."""
    info = PngImagePlugin.PngInfo()
    for key, value in meta.items():
        info.add_text(key, value if isinstance(value, str) else json.dumps(value))
    info.add_text(META_KEY, json.dumps(meta))
    path = Path(path)
    with atomic_path(path) as tmp:
        to_pil(image).save(tmp, format="PNG", pnginfo=info)
    return path


def read_png_meta(path: str | Path) -> dict:
    """The settings a PNG of these scripts carries (``write_png``'s JSON chunk)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{str(path)!r} does not exist")
    try:
        with Image.open(path) as im:
            text = dict(getattr(im, "text", {}) or {})
    except (UnidentifiedImageError, OSError) as err:
        raise ConfigError(f"{str(path)!r} is not an image PIL can read ({err})") from None
    if META_KEY not in text:
        raise ConfigError(f"{str(path)!r} carries no sampling settings (no {META_KEY!r} PNG text chunk)")
    return json.loads(text[META_KEY])


def next_number(folder: Path, pattern: str) -> int:
    """One past the highest number of the files in ``folder`` matching ``pattern`` (a regex with one group)."""
    regex = re.compile(pattern)
    numbers = [int(m.group(1)) for p in folder.iterdir() if (m := regex.fullmatch(p.name))] if folder.is_dir() else []
    return max(numbers, default=-1) + 1


# ---- grids, labels, GIFs -------------------------------------------------------------------------------
def font(size: int = 14) -> ImageFont.ImageFont:
    return ImageFont.load_default(size=size)


def enlarge(image: Image.Image, min_side: int = 128) -> Image.Image:
    """Tiny samples (16 px from test models) scaled up by a whole factor, nearest neighbour, so labels fit."""
    factor = -(-min_side // min(image.size))
    if factor <= 1:
        return image
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def image_grid(images, nrow: int, padding: int = 2, min_tile: int = 0, zoom: int | None = None) -> Image.Image:
    """CompVis's grid as an RGB picture: ``nrow`` images per row, ``padding`` px of white around each.

    ``images``: a (B, C, H, W) tensor in [-1, 1] (a model's samples) or a sequence of HxWxC / HxW uint8 arrays or
    PIL images; one channel is shown as gray. Tiles are enlarged by a whole factor, nearest neighbour (no
    smoothing): ``zoom`` times, or as many times as ``min_tile`` px fit in the smaller side, so 8-pixel samples
    can be seen. Padding is in output pixels.
    """
    import torch
    import torchvision

    if torch.is_tensor(images):
        x = ((images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    else:
        arrays = [np.asarray(i) for i in images]
        x = torch.from_numpy(np.stack([a[..., None] if a.ndim == 2 else a for a in arrays])).permute(0, 3, 1, 2)
    if zoom is None:
        zoom = max(1, min_tile // min(x.shape[-2:]))
    if zoom > 1:
        x = x.repeat_interleave(zoom, dim=-2).repeat_interleave(zoom, dim=-1)
    g = torchvision.utils.make_grid(x, nrow=nrow, padding=padding, pad_value=255)  # gray -> 3 channels
    g = g.expand(3, -1, -1) if g.shape[0] == 1 else g  # (make_grid returns a lone image as it is)
    return Image.fromarray(g.permute(1, 2, 0).contiguous().numpy())


def labelled_grid(rows: Sequence[Sequence], row_labels: Sequence[str], col_labels: Sequence[str],
                  title: str | None = None) -> Image.Image:
    """Cells in rows and columns with a label left of each row, above each column and an optional title."""
    cells = [[enlarge(to_pil(c).convert("RGB")) for c in row] for row in rows]
    cw, ch = cells[0][0].size
    f, pad = font(14), 4
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = max(int(measure.textlength(label, font=f)) for label in row_labels) + 2 * pad
    top = 20 + (20 if title else 0)
    out = Image.new("RGB", (left + len(col_labels) * (cw + pad), top + len(cells) * (ch + pad)), "white")
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((pad, pad), title, fill="black", font=f)
    for j, label in enumerate(col_labels):
        draw.text((left + j * (cw + pad), top - 18), label, fill="black", font=f)
    for i, (label, row) in enumerate(zip(row_labels, cells)):
        y = top + i * (ch + pad)
        draw.text((pad, y + ch // 2 - 8), label, fill="black", font=f)
        for j, cell in enumerate(row):
            out.paste(cell, (left + j * (cw + pad), y))
    return out


def captioned(image, text: str) -> Image.Image:
    """An image (enlarged if tiny) with ``text`` in a strip below it: a GIF frame."""
    image = enlarge(to_pil(image).convert("RGB"), 256)
    f = font(14)
    out = Image.new("RGB", (image.width, image.height + 22), "white")
    out.paste(image, (0, 0))
    ImageDraw.Draw(out).text((4, image.height + 3), text, fill="black", font=f)
    return out


def save_gif(frames: Sequence[Image.Image], path: str | Path, duration_ms: int = 120, hold_last_ms: int = 1500) -> Path:
    """An endlessly looping GIF; the last frame stays up longer. (PIL merges identical consecutive frames, so
    callers label frames with what differs between them.)"""
    path = Path(path)
    durations = [duration_ms] * (len(frames) - 1) + [hold_last_ms]
    frames[0].save(path, format="GIF", save_all=True, append_images=list(frames[1:]), duration=durations, loop=0)
    return path


def slug(text: str, length: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:length] or "empty"
