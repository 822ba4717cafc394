"""Folders of scraped images -> a training imagefolder: RGB JPEGs, ``metadata.jsonl``, optional ``.txt`` sidecars.

The output loads with ``datasets.load_dataset("imagefolder", data_dir=out)``, ``ldm.data.hf.hf_dataset`` and
``ldm.data.folder.FolderDataset``. Decoding is :func:`ldm.data.images.load_rgb`, the function training uses, so
what is written is what the model would have seen.

Re-running must do only what is missing and end with the same folder as a fresh run, so:

- output names are ``<source stem>-<hash of the decoded pixels>.jpg``: fixed by the content, not the run;
- a hidden manifest (``.prepare_manifest.json``) remembers, per source file, the hash of its bytes and what
  became of it, so unchanged sources are not decoded again; changed settings redo every conversion;
- JPEGs are written to a temporary name and renamed, so an interrupted run never leaves half a file that a
  later run would trust; the manifest is saved on the way out, even on Ctrl-C.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from PIL import Image, UnidentifiedImageError

from ldm.data.folder import FolderCaptions, find_images, sidecar_caption
from ldm.data.images import BadImage, load_rgb
from ldm.util import PARTIAL_GLOB, ConfigError, atomic_path

METADATA = "metadata.jsonl"
MANIFEST = ".prepare_manifest.json"
RESAMPLING = {m.name.lower(): m for m in Image.Resampling}  # nearest, box, bilinear, hamming, bicubic, lanczos


@dataclass(frozen=True)
class Settings:
    """Everything that changes the written pixels; a change makes the next run convert every source again."""

    size: int | None = None  # short side after resizing; None keeps each image's own size
    crop: bool = False  # centre-crop to size x size after the resize
    resample: str = "lanczos"  # PIL filter used for the resize
    quality: int = 95  # JPEG quality
    min_size: int = 0  # sources whose short side (after EXIF rotation) is smaller are skipped

    def __post_init__(self) -> None:
        if self.resample not in RESAMPLING:
            raise ConfigError(f"resample {self.resample!r} is not one of {sorted(RESAMPLING)}")
        if self.crop and not self.size:
            raise ConfigError("crop needs a size: the centre crop is size x size")
        if self.size is not None and self.size < 1:
            raise ConfigError(f"size must be a positive number of pixels, got {self.size}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"JPEG quality must be 1..100, got {self.quality}")


# ---- captions shared by every script: the rule FolderDataset trains with (ldm.data.folder.FolderCaptions) ----
def read_captions(folder: Path, names: Iterable[str] | None = None) -> dict[str, str]:
    """``{relative image name: caption}`` for the images in ``folder`` ("" where there is none)."""
    folder = Path(folder)
    if names is None:
        names = [p.relative_to(folder).as_posix() for p in find_images(folder)]
    caption_of = FolderCaptions(folder)
    return {name: caption_of(folder / name) for name in names}


def write_captions(folder: Path, captions: dict[str, str], sidecars: bool = False,
                   changed: Iterable[str] | None = None) -> None:
    """Rewrite ``metadata.jsonl`` with one row per image (sorted) and refresh the ``.txt`` sidecars.

    A sidecar is written when ``sidecars`` is set or one already exists, so the two never disagree; only the
    names in ``changed`` (default: all) are touched, which keeps per-batch saves during captioning cheap.
    """
    folder = Path(folder)
    rows = "".join(json.dumps({"file_name": n, "text": captions[n]}, ensure_ascii=False) + "\n" for n in sorted(captions))
    atomic_write(folder / METADATA, rows.encode("utf-8"))
    for name in captions if changed is None else changed:
        sidecar = (folder / name).with_suffix(".txt")
        exists = sidecar.is_file()
        # Compared as captions are read, so a sidecar saying the same thing (other encoding, CRLF) is left alone.
        if (sidecars or exists) and (not exists or sidecar_caption(folder / name) != captions[name]):
            atomic_write(sidecar, (captions[name] + "\n").encode("utf-8"))


def atomic_write(path: Path, data: bytes) -> None:
    """Write through a hidden temporary file and rename (``ldm.util.atomic_path``), so readers and resumed runs
    never see half a file.

    Identical content is left alone: a re-run that changes nothing leaves every file as it was, modification
    times included (datasets' cache, make and rsync go by them)."""
    if path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data:
        return
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


# ---- one source file -> one JPEG (runs in worker processes) ----------------------------------------------------
def resize_and_crop(img: Image.Image, settings: Settings) -> Image.Image:
    """Scale the short side to ``settings.size`` (up or down), then centre-crop a square if asked."""
    if settings.size is None:
        return img
    w, h = img.size
    scale = settings.size / min(w, h)
    target = (max(1, round(w * scale)), max(1, round(h * scale)))
    if target != img.size:
        img = img.resize(target, RESAMPLING[settings.resample])
    if settings.crop:
        left, top = (target[0] - settings.size) // 2, (target[1] - settings.size) // 2
        img = img.crop((left, top, left + settings.size, top + settings.size))
    return img


def convert(path: str, settings: Settings) -> dict[str, Any]:
    """Decode, check and encode one source. Returns its manifest record, plus ``jpeg`` bytes when it is usable."""
    data = Path(path).read_bytes()
    record: dict[str, Any] = {"sha1": hashlib.sha1(data).hexdigest()}
    try:
        img = load_rgb(data)
    except BadImage as err:
        cause = err.__cause__ or err
        if not data:
            reason = "empty file (0 bytes)"
        elif isinstance(cause, UnidentifiedImageError):  # its message names a temporary buffer, not the file
            reason = "not an image format PIL can read"
        else:
            reason = f"{type(cause).__name__}: {cause}"
        return {**record, "status": "unreadable", "reason": reason}
    record["source_size"] = list(img.size)
    if min(img.size) < settings.min_size:
        return {**record, "status": "too small", "reason": f"{img.width}x{img.height}, short side under {settings.min_size}"}
    # Exact duplicates are the same picture, whatever the container: hash the decoded pixels, not the file.
    record["pixels"] = hashlib.sha1(f"{img.width}x{img.height}".encode() + img.tobytes()).hexdigest()
    out = resize_and_crop(img, settings)
    buf = io.BytesIO()
    out.save(buf, "JPEG", quality=settings.quality)
    return {**record, "status": "ok", "size": list(out.size), "jpeg": buf.getvalue()}


def _convert_job(job: tuple[str, Settings]) -> dict[str, Any]:
    return convert(*job)


def output_name(source: str, pixels: str) -> str:
    stem = re.sub(r"[^\w-]+", "_", Path(source).stem).strip("_")[:60] or "image"
    return f"{stem}-{pixels[:12]}.jpg"


# ---- the whole folder -----------------------------------------------------------------------------------------
def find_sources(inputs: Sequence[str | Path], out: Path) -> list[Path]:
    """Image files under ``inputs`` (folders searched recursively, or single files), in the order given, each once;
    anything inside ``out`` is left out so the output can live inside an input folder."""
    out_real, seen, sources = out.resolve(), set(), []
    for item in inputs:
        path = Path(item).expanduser()
        if not path.exists():
            raise ConfigError(f"input '{item}' does not exist")
        if path.resolve() == out_real:
            raise ConfigError(f"input '{item}' is the output folder; write the prepared set to a new folder")
        for file in find_images(path) if path.is_dir() else [path]:
            real = file.resolve()
            if real not in seen and out_real not in real.parents:
                seen.add(real)
                sources.append(Path(os.path.abspath(file)))
    return sources


def source_captions(inputs: Sequence[str | Path], sources: Sequence[Path]) -> dict[str, str]:
    """Captions that came with the sources (an input folder's metadata.jsonl or sidecar .txt), by source path."""
    captions: dict[str, str] = {}
    for item in inputs:
        root = Path(os.path.abspath(Path(item).expanduser()))
        inside = [s for s in sources if root in s.parents] if root.is_dir() else [root]
        base = root if root.is_dir() else root.parent
        names = [os.path.relpath(s, base) for s in inside]
        for src, text in zip(inside, read_captions(base, names).values()):
            captions.setdefault(str(src), text)
    return captions


def load_manifest(out: Path) -> dict[str, Any]:
    path = out / MANIFEST
    if not path.is_file():
        return {"settings": None, "sources": {}, "outputs": []}
    return json.loads(path.read_text())


def prepare(inputs: Sequence[str | Path], out: str | Path, settings: Settings = Settings(), workers: int = 1,
            sidecars: bool = False, progress: bool = True) -> dict[str, Any]:
    """Convert ``inputs`` into the imagefolder ``out``; returns the manifest (what became of every source)."""
    from tqdm import tqdm

    out = Path(out).expanduser()
    sources = find_sources(inputs, out)
    if not sources:
        raise ConfigError(f"no images found in {', '.join(map(str, inputs))}")
    out.mkdir(parents=True, exist_ok=True)
    for leftover in out.glob(PARTIAL_GLOB):  # left by a write that was killed, so could not clean up
        leftover.unlink()
    old = load_manifest(out)
    foreign = [p.name for p in find_images(out) if p.relative_to(out).as_posix() not in old["outputs"]]
    if foreign:
        raise ConfigError(f"output folder '{out}' holds images this script did not write ({foreign[0]}, ...); "
                          "use a new folder")
    same_settings = old["settings"] == asdict(settings)
    reusable = old["sources"] if same_settings else {}
    old_captions = read_captions(out, old["outputs"])
    carried = {r["pixels"]: old_captions.get(r.get("file_name", ""), "") for r in old["sources"].values()
               if r.get("status") == "ok"}

    def fresh(src: Path) -> bool:
        prev = reusable.get(str(src))
        return prev is None or prev["sha1"] != hashlib.sha1(src.read_bytes()).hexdigest()

    todo = [s for s in sources if fresh(s)]
    manifest = {"settings": asdict(settings), "sources": dict(reusable), "outputs": list(old["outputs"])}
    kept: dict[str, str] = {}  # pixel hash -> output name, first source in input order wins
    last_save = time.monotonic()
    pool = ProcessPoolExecutor(workers) if workers > 1 and len(todo) > 1 else None
    try:
        jobs = [(str(s), settings) for s in todo]
        results = pool.map(_convert_job, jobs, chunksize=4) if pool else map(_convert_job, jobs)
        for src, record in tqdm(_in_order(sources, todo, results, reusable), total=len(sources), unit="img",
                                desc="prepare", disable=not progress):
            if record["status"] == "ok":
                record = _place(out, src, record, kept, settings, manifest["outputs"])
            manifest["sources"][str(src)] = record
            if time.monotonic() - last_save > 30:
                _save_manifest(out, manifest)
                last_save = time.monotonic()
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
        _save_manifest(out, manifest)
    # Sources that disappeared from the inputs, and outputs that are no longer wanted, go away.
    manifest["sources"] = {str(s): manifest["sources"][str(s)] for s in sources}
    for name in set(manifest["outputs"]) - set(kept.values()):
        for stale in (out / name, (out / name).with_suffix(".txt")):
            stale.unlink(missing_ok=True)
    manifest["outputs"] = sorted(kept.values())
    given = source_captions(inputs, sources)
    captions = {name: carried.get(px, "") for px, name in kept.items()}
    for src, record in manifest["sources"].items():  # a caption that came with any copy of the picture
        name = record.get("file_name")
        if name and not captions[name]:
            captions[name] = given.get(src, "")
    write_captions(out, captions, sidecars)
    _save_manifest(out, manifest)
    return manifest


def _in_order(sources: Sequence[Path], todo: Sequence[Path], results: Iterator[dict],
              reusable: dict[str, dict]) -> Iterator[tuple[Path, dict]]:
    """Every source with its record, in input order: fresh conversions interleaved with remembered records."""
    pending = set(map(str, todo))
    for src in sources:
        yield src, (next(results) if str(src) in pending else dict(reusable[str(src)]))


def _place(out: Path, src: Path, record: dict, kept: dict[str, str], settings: Settings, outputs: list[str]) -> dict:
    """Write the JPEG of the first source showing these pixels; later ones are recorded as duplicates."""
    jpeg = record.pop("jpeg", None)
    pixels = record["pixels"]
    if pixels in kept:
        return {**record, "file_name": kept[pixels], "duplicate": True}
    name = kept[pixels] = output_name(str(src), pixels)
    if jpeg is None and not (out / name).is_file():  # remembered source whose output was deleted or never written
        jpeg = convert(str(src), settings).get("jpeg")
    if jpeg is not None:
        if name not in outputs:  # listed before it exists: an interrupt in between leaves no unknown file behind
            outputs.append(name)
        atomic_write(out / name, jpeg)
    record.pop("duplicate", None)
    return {**record, "file_name": name}


def _save_manifest(out: Path, manifest: dict[str, Any]) -> None:
    atomic_write(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True).encode())
