"""WebDataset-style tar shards (the LAION-aesthetics layout), streamed: no index, no extraction, no random access.

A shard is a plain tar whose members are grouped into samples by key: ``000123.jpg`` + ``000123.txt`` (+ any
``000123.json``) form one sample. Shards are read sequentially with the standard library's ``tarfile`` in
streaming mode, so a multi-terabyte set costs neither disk nor a scan up front (give ``length``).

Each process × DataLoader worker ("slot") reads its own fixed share of the shards (shard i goes to slot
i mod slots) in a freshly shuffled order each pass, through a sample shuffle buffer, and yields exactly
``length // slots`` samples per epoch, cycling through its shards when they run out: every GPU then takes the same
number of steps, which DDP needs.

Images are decoded by :func:`ldm.data.images.load_rgb` like every other dataset's, and a sample that cannot be used
(an image that does not decode, no image at all, or the rest of a truncated shard) is skipped with the shared
warning naming ``shard:member``, once over all workers, and listed again when the run ends.
"""
from __future__ import annotations

import glob
import random
import re
import tarfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch.utils.data import IterableDataset, get_worker_info

from ldm.data.buckets import nearest_bucket
from ldm.data.folder import IMAGE_EXTENSIONS, decode_text
from ldm.data.images import ImageCaptionDataset, SkipLog
from ldm.data.transforms import build_transforms
from ldm.util import ConfigError

IMAGE_EXTS = tuple(e.lstrip(".") for e in IMAGE_EXTENSIONS)
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


def samples_in(shard: str, skip_log: SkipLog | None = None) -> Iterator[dict[str, Any]]:
    """The samples of one shard, in order: ``{"__key__": key, "__names__": {ext: member}, ext: bytes, ...}``.

    A shard that turns out to be truncated or corrupt ends early: what was read is kept, and the break is
    reported through ``skip_log`` (or raised without one), so a bad download costs its samples, not the run.
    """
    current: dict[str, Any] = {}
    last = None  # key of the last sample handed out, to say where a broken shard stopped
    try:
        with tarfile.open(shard, mode="r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                name = member.name.rsplit("/", 1)[-1]
                key, _, ext = name.partition(".")
                key = member.name[: len(member.name) - len(name)] + key
                if current and current["__key__"] != key:
                    last = current["__key__"]
                    yield current
                    current = {}
                data = tar.extractfile(member).read()
                if len(data) != member.size:
                    raise tarfile.ReadError(f"member {member.name} is cut short")
                current.setdefault("__names__", {})[ext.lower()] = member.name
                current["__key__"] = key
                current[ext.lower()] = data
    except (tarfile.TarError, OSError, EOFError) as err:
        if skip_log is None:
            raise ConfigError(f"TarShards: cannot read shard '{shard}': {type(err).__name__}: {err}") from err
        where = f"after sample {last}" if last is not None else "before its first sample"
        skip_log.add(f"{shard} (the rest, {where})",
                     f"shard {shard} is truncated or corrupt {where}; the rest of it is skipped: "
                     f"{type(err).__name__}: {err}")
        current = {}  # its last sample may be incomplete
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


class TarShards(IterableDataset, ImageCaptionDataset):
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
        # The map-style base gives the shared decoding and skipped-file report (DataModule lists those at the end).
        ImageCaptionDataset.__init__(self, build_transforms(image_transforms), f"tar shards {urls!r}")
        self.length = int(length) if length is not None else sum(
            1 for s in self.shards for _ in samples_in(s, self.skip_log))
        self.shuffle_buffer, self.seed = int(shuffle_buffer), seed
        self._passes = 0
        self.stream_buckets: list | None = None  # aspect-ratio buckets, chosen per image as it streams past
        self.batch_size = 1
        self._pending: dict = {}  # per reader: bucket -> items waiting for a full batch (kept across epochs)

    def use_stream_buckets(self, buckets: list, crop, batch_size: int) -> None:
        """Group the stream into runs of ``batch_size`` items of one bucket (``ldm.data.buckets``); sizes are read
        as the images arrive, so no table can be printed up front. Items waiting for their bucket to fill stay
        for the next epoch rather than being dropped."""
        self.stream_buckets, self.bucket_crop, self.batch_size = list(buckets), crop, int(batch_size)

    def __getitem__(self, i: int) -> Any:
        raise TypeError("TarShards is streamed: iterate over it (no random access)")

    def named_captions(self) -> Iterator[tuple[str, str]]:
        """Nothing: captions arrive with the stream, and reading every shard up front to check them would cost
        the pass that streaming avoids."""
        return iter(())

    def __len__(self) -> int:
        """Samples per process per epoch (what one GPU's DataLoader sees)."""
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        return self.length // (torch.distributed.get_world_size() if distributed else 1)

    def decode(self, sample: dict[str, Any], shard: str) -> dict[str, Any] | None:
        """The item of one sample, or None (skipped with a warning) when it has no image or the image is broken."""
        ext = next((e for e in IMAGE_EXTS if e in sample), None)
        if ext is None:
            name = f"{shard}:{sample['__key__']}"
            if name not in self.skip_log:
                has = ", ".join(sorted(sample["__names__"])) or "nothing"
                self.skip_log.add(name, f"sample {name} has no image ({', '.join(IMAGE_EXTS)}); it has {has}")
            return None
        image = self.load_image(sample[ext], f"{shard}:{sample['__names__'][ext]}")
        if image is None:
            return None
        caption = next((decode_text(sample[e], f"{shard}:{sample['__names__'][e]}").strip()
                        for e in CAPTION_EXTS if e in sample), "")
        if self.stream_buckets is None:
            return {"image": self.transform(image), "caption": caption}
        bucket = nearest_bucket(image.size, self.stream_buckets)
        cropped = self.bucket_crop(image, self.stream_buckets[bucket])
        return {"image": self.transform(cropped.image), "caption": caption, "_bucket": bucket,
                "original_size": torch.tensor(cropped.original_size), "crop_top_left": torch.tensor(cropped.crop_top_left)}

    def _stream(self, shards: list[str], rng: random.Random) -> Iterator[dict[str, Any]]:
        while True:  # cycle: a reader yields its quota even when its shards hold fewer samples
            order = shards[:]
            rng.shuffle(order)
            found = False
            for shard in order:
                for sample in samples_in(shard, self.skip_log):
                    item = self.decode(sample, shard)
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
        stream = self._stream(mine, rng)
        size = max(1, self.shuffle_buffer)
        shuffled = self._shuffled(stream, rng, quota, size)
        if self.stream_buckets is None:
            yield from shuffled
            return
        # Whole batches of one bucket; every reader yields the same number of them, so DDP ranks stay in step.
        for _ in range(quota // self.batch_size):
            while True:
                item = next(shuffled, None) or next(stream)
                waiting = self._pending.setdefault(item.pop("_bucket"), [])
                waiting.append(item)
                if len(waiting) == self.batch_size:
                    break
            yield from waiting
            waiting.clear()

    @staticmethod
    def _shuffled(stream, rng: random.Random, quota: int, size: int) -> Iterator[dict[str, Any]]:
        buffer: list[dict[str, Any]] = []
        pulled = 0
        for _ in range(quota):  # exactly `quota` samples are read: one pass over the shards when length counts them
            while pulled < quota and len(buffer) < size:
                buffer.append(next(stream))
                pulled += 1
            yield buffer.pop(rng.randrange(len(buffer)))
