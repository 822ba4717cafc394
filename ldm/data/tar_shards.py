"""WebDataset-style tar shards (the LAION-aesthetics layout), streamed: no index, no extraction, no random access.

A shard is a plain tar whose members are grouped into samples by key: ``000123.jpg`` + ``000123.txt`` (+ any
``000123.json``) form one sample. Shards are read sequentially with the standard library's ``tarfile`` in
streaming mode, so a multi-terabyte set costs neither disk nor a scan up front (give ``length``).

Each process × DataLoader worker ("slot") reads its own fixed share of the shards (shard i goes to slot
i mod slots) in a freshly shuffled order each pass, through a sample shuffle buffer, and yields exactly
``length // slots`` samples per epoch, cycling through its shards when they run out: every GPU then takes the same
number of steps, which DDP needs.
"""
from __future__ import annotations

import glob
import io
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.transforms import build_transforms
from ldm.util import ConfigError

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTS = ("txt", "caption")


def expand_urls(urls: str | Sequence[str]) -> list[str]:
    """Shard paths from brace ranges (``shards/{000000..000099}.tar``, as WebDataset writes them), globs, or a list."""
    out = []
    for url in [urls] if isinstance(urls, str) else list(urls):
        match = re.search(r"\{(\d+)\.\.(\d+)\}", url)
        if match:
            lo, hi, width = int(match[1]), int(match[2]), len(match[1])
            out += expand_urls([url[:match.start()] + f"{i:0{width}d}" + url[match.end():] for i in range(lo, hi + 1)])
        elif any(c in url for c in "*?["):
            out += sorted(glob.glob(url))
        else:
            out.append(url)
    missing = [u for u in out if not Path(u).is_file()]
    if not out or missing:
        raise ConfigError(f"TarShards: no shard files at {urls!r}" + (f" (missing e.g. {missing[0]!r})" if missing else ""))
    return out


def samples_in(shard: str) -> Iterator[dict[str, bytes]]:
    """The samples of one shard, in order: ``{"__key__": key, ext: bytes, ...}``."""
    current: dict[str, Any] = {}
    with tarfile.open(shard, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = member.name.rsplit("/", 1)[-1]
            key, _, ext = name.partition(".")
            key = member.name[: len(member.name) - len(name)] + key
            if current and current["__key__"] != key:
                yield current
                current = {}
            current["__key__"] = key
            current[ext.lower()] = tar.extractfile(member).read()
    if current:
        yield current


def _slot() -> tuple[int, int]:
    """(this reader's index, number of readers) over DDP ranks × DataLoader workers."""
    rank, world = 0, 1
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    info = get_worker_info()
    wid, workers = (info.id, info.num_workers) if info is not None else (0, 1)
    return rank * workers + wid, world * workers


class TarShards(IterableDataset):
    """Items ``{"image": (3,H,W) in [-1,1], "caption": str}`` streamed from tar shards.

    Args:
        urls: shard paths: a brace range, a glob or a list.
        image_transforms: torchvision transforms, as for the other datasets (``ldm.data.transforms``).
        length: samples per epoch over all processes; default: counted once by reading the shards' headers.
        shuffle_buffer: samples held to shuffle from (0: shard order only).
        seed: base of the shard-order and buffer shuffles (each pass and each reader differ from it).
    """

    def __init__(self, urls: str | Sequence[str], image_transforms: Any = None, length: int | None = None,
                 shuffle_buffer: int = 1000, seed: int = 0):
        self.shards = expand_urls(urls)
        self.transform = build_transforms(image_transforms)
        self.length = int(length) if length is not None else sum(1 for s in self.shards for _ in samples_in(s))
        self.shuffle_buffer, self.seed = int(shuffle_buffer), seed
        self._passes = 0

    def __len__(self) -> int:
        """Samples per process per epoch (what one GPU's DataLoader sees)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self.length // (torch.distributed.get_world_size() if distributed else 1)

    def decode(self, sample: dict[str, bytes]) -> dict[str, Any] | None:
        """The item of one sample, or None when it has no decodable image (skipped, like broken files elsewhere)."""
        data = next((sample[e] for e in IMAGE_EXTS if e in sample), None)
        if data is None:
            return None
        try:
            image = Image.open(io.BytesIO(data)).convert("RGB")
        except Exception:  # a broken image is skipped: one bad file must not stop a long streamed run
            return None
        caption = next((sample[e].decode("utf-8", "replace").strip() for e in CAPTION_EXTS if e in sample), "")
        return {"image": self.transform(image), "caption": caption}

    def _stream(self, shards: list[str], rng: random.Random) -> Iterator[dict[str, Any]]:
        while True:  # cycle: a reader yields its quota even when its shards hold fewer samples
            order = shards[:]
            rng.shuffle(order)
            found = False
            for shard in order:
                for sample in samples_in(shard):
                    item = self.decode(sample)
                    if item is not None:
                        found = True
                        yield item
            if not found:
                raise ConfigError(f"TarShards: shards {order[:3]} hold no decodable image")

    def __iter__(self) -> Iterator[dict[str, Any]]:
        slot, slots = _slot()
        mine = self.shards[slot::slots] or [self.shards[slot % len(self.shards)]]
        rng = random.Random(f"{self.seed}-{slot}-{self._passes}-{torch.initial_seed()}")
        self._passes += 1
        quota = self.length // slots
        buffer: list[dict[str, Any]] = []
        stream = self._stream(mine, rng)
        pulled, size = 0, max(1, self.shuffle_buffer)
        for _ in range(quota):  # exactly `quota` samples are read: one pass over the shards when length counts them
            while pulled < quota and len(buffer) < size:
                buffer.append(next(stream))
                pulled += 1
            yield buffer.pop(rng.randrange(len(buffer)))
