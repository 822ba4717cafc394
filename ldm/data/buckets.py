"""Aspect-ratio buckets: train on pictures of every shape without cutting off heads and feet.

A square centre crop of a 2:1 wiki screenshot loses half of it. With buckets, every image goes to the bucket
(a training size, ``height x width``) whose aspect ratio is nearest its own, is resized so it just covers the
bucket and loses only the sliver that sticks out, and a batch holds images of one bucket only.

- :func:`bucket_sizes`: the buckets of a pixel budget (``resolution``²), sides multiples of ``step``, aspect at
  most ``max_aspect``.
- :class:`BucketCrop`: resize to cover, then a centre or random crop; it reports the original size and the crop's
  top-left corner with the item (SDXL's micro-conditioning reads them).
- :func:`assign_buckets`: image sizes → bucket per image; a bucket with fewer images than a batch is merged into
  its nearest-aspect neighbour (``small_buckets: merge``) or kept and filled by repetition (``repeat``). The table
  it returns says which, so no image vanishes unseen.
- :class:`BucketSampler`: the epoch's index order, one bucket per run of ``batch_size`` indices, padded within the
  bucket, with the same number of batches on every DDP rank. It is a ``DistributedSampler`` so Lightning leaves
  it in place; the order depends only on the seed and the epoch, so a resumed run sees the epochs it would have.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Iterator, Sequence

from PIL import Image
from torch.utils.data import DistributedSampler

from ldm.util import ConfigError

Size = tuple[int, int]  # (height, width), the order torch and SDXL's size conditioning use
CROPS = ("center", "random")
SMALL_BUCKETS = ("merge", "repeat")
RESIZE_FILTERS = {"nearest": Image.NEAREST, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC,
                  "lanczos": Image.LANCZOS, "box": Image.BOX, "hamming": Image.HAMMING}


def bucket_sizes(resolution: int = 512, step: int = 64, max_aspect: float = 2.0) -> list[Size]:
    """Every ``(h, w)`` with sides multiples of ``step``, ``h·w ≤ resolution²`` and the longest side as large as
    the budget allows, from tall to wide."""
    if resolution < step or step < 1:
        raise ConfigError(f"buckets: resolution {resolution} must be at least step {step} (and step >= 1)")
    if max_aspect < 1:
        raise ConfigError(f"buckets.max_aspect must be >= 1 (2.0 allows 2:1 and 1:2), got {max_aspect}")
    budget = resolution * resolution
    sizes = set()
    for w in range(step, budget // step + 1, step):
        h = budget // w // step * step
        if h >= step and max(h / w, w / h) <= max_aspect + 1e-9:
            sizes.add((h, w))
            sizes.add((w, h))
    return sorted(sizes, key=lambda s: s[1] / s[0])


def nearest_bucket(size: tuple[int, int], buckets: Sequence[Size]) -> int:
    """Index of the bucket nearest in log aspect ratio to an image of ``size = (width, height)`` (PIL's order);
    ties go to the larger bucket."""
    width, height = size
    aspect = math.log(width / height)
    return min(range(len(buckets)),
               key=lambda i: (abs(math.log(buckets[i][1] / buckets[i][0]) - aspect), -buckets[i][0] * buckets[i][1]))


@dataclass
class Cropped:
    image: Image.Image
    original_size: Size  # (h, w) before resizing
    crop_top_left: Size  # (top, left) in the resized image


class BucketCrop:
    """Resize an image so it covers ``target`` (h, w), then crop the overhang (centre, or random per call)."""

    def __init__(self, crop: str = "center", resize_filter: str = "bicubic") -> None:
        if crop not in CROPS:
            raise ConfigError(f"buckets.crop must be one of {CROPS}, got {crop!r}")
        if resize_filter not in RESIZE_FILTERS:
            raise ConfigError(f"buckets.resize_filter must be one of {sorted(RESIZE_FILTERS)}, got {resize_filter!r}")
        self.crop, self.resize_filter = crop, resize_filter

    def __call__(self, image: Image.Image, target: Size, rng: random.Random | None = None) -> Cropped:
        th, tw = target
        w, h = image.size
        scale = max(tw / w, th / h)
        rw, rh = max(tw, round(w * scale)), max(th, round(h * scale))
        if (rw, rh) != (w, h):
            image = image.resize((rw, rh), resample=RESIZE_FILTERS[self.resize_filter])
        if self.crop == "center":
            top, left = (rh - th) // 2, (rw - tw) // 2
        else:
            rng = rng or random
            top, left = rng.randint(0, rh - th), rng.randint(0, rw - tw)
        return Cropped(image.crop((left, top, left + tw, top + th)), (h, w), (top, left))

    def describe(self) -> str:
        return f"crop={self.crop} resize_filter={self.resize_filter}"


@dataclass
class BucketRow:
    size: Size
    images: int  # distinct images placed in this bucket
    items: int   # items per epoch (images x repeats)
    note: str = ""


@dataclass
class Assignment:
    buckets: list[Size]
    of_image: list[int]  # bucket index per image
    rows: list[BucketRow]

    def target(self, i: int) -> Size:
        return self.buckets[self.of_image[i]]

    def table(self, batch_size: int) -> str:
        lines = [f"{'bucket (w x h)':>15} {'aspect':>7} {'images':>7} {'batches':>8}  note"]
        for row in self.rows:
            h, w = row.size
            batches = math.ceil(row.items / batch_size) if row.items else 0
            lines.append(f"{f'{w} x {h}':>15} {w / h:7.2f} {row.images:7d} {batches:8d}  {row.note}".rstrip())
        used = sum(r.images for r in self.rows)
        lines.append(f"{used} images in {sum(1 for r in self.rows if r.images)} buckets; none dropped")
        return "\n".join(lines)


def assign_buckets(sizes: Sequence[tuple[int, int] | None], buckets: Sequence[Size], batch_size: int,
                   repeats: int = 1, small_buckets: str = "merge") -> Assignment:
    """Bucket per image from its ``(width, height)`` (None: unreadable header, it goes to the fullest bucket and
    the dataset skips it later). Buckets with fewer than ``batch_size`` items are merged or repeated."""
    if small_buckets not in SMALL_BUCKETS:
        raise ConfigError(f"buckets.small_buckets must be one of {SMALL_BUCKETS}, got {small_buckets!r}")
    buckets = list(buckets)
    nearest = [nearest_bucket(s, buckets) if s else -1 for s in sizes]
    fullest = max(range(len(buckets)), key=lambda b: nearest.count(b))
    nearest = [fullest if b < 0 else b for b in nearest]
    own = [nearest.count(b) for b in range(len(buckets))]  # images whose nearest bucket it is
    of_image = list(nearest)
    joined: dict[int, int] = {}  # merged bucket -> the bucket it joined
    while small_buckets == "merge":
        counts = [of_image.count(b) for b in range(len(buckets))]
        small = [b for b in range(len(buckets)) if 0 < counts[b] * repeats < batch_size]
        others = [b for b in range(len(buckets)) if counts[b] > 0]
        if not small or len(others) < 2:
            break
        b = min(small, key=lambda k: counts[k])
        aspect = math.log(buckets[b][1] / buckets[b][0])
        joined[b] = min((k for k in others if k != b),
                        key=lambda k: (abs(math.log(buckets[k][1] / buckets[k][0]) - aspect), -counts[k]))
        of_image = [joined[b] if k == b else k for k in of_image]
    counts = [of_image.count(b) for b in range(len(buckets))]
    rows = []
    for b, size in enumerate(buckets):
        if not own[b] and not counts[b]:
            continue
        notes = []
        if b in joined:
            final = joined[b]
            while final in joined:  # merged into a bucket that was merged in turn: name where they ended up
                final = joined[final]
            notes.append(f"{own[b]} merged into {buckets[final][1]} x {buckets[final][0]}")
        if counts[b] and counts[b] * repeats % batch_size:
            notes.append(f"last batch filled by repeating {batch_size - counts[b] * repeats % batch_size} of its images")
        rows.append(BucketRow(size, counts[b], counts[b] * repeats, "; ".join(notes)))
    return Assignment(buckets, of_image, rows)


class BucketSampler(DistributedSampler):
    """Indices such that every ``batch_size`` in a row come from one bucket, for ``DataLoader(batch_size=...)``.

    ``groups[i]`` is item i's bucket. Per epoch (seed + epoch decide everything): each bucket's items are
    shuffled and cut into batches, its last batch topped up with other items of the same bucket, and the batches
    shuffled; the list is then topped up with repeated batches to a multiple of ``num_replicas`` and rank ``r``
    takes every ``num_replicas``-th batch from ``r``: all ranks take the same number of steps.
    """

    def __init__(self, groups: Sequence[int], batch_size: int, seed: int = 0, shuffle: bool = True,
                 num_replicas: int = 1, rank: int = 0) -> None:
        # DistributedSampler's own __init__ wants a process group; this class only keeps its type and API.
        self.groups, self.batch_size = list(groups), int(batch_size)
        self.seed, self.shuffle = int(seed), bool(shuffle)
        self.num_replicas, self.rank, self.epoch = int(num_replicas), int(rank), 0
        if not 0 <= self.rank < self.num_replicas:
            raise ValueError(f"rank {rank} outside 0..{num_replicas - 1}")

    def batches(self, epoch: int | None = None) -> list[list[int]]:
        """This rank's batches for ``epoch`` (default: the current one)."""
        rng = random.Random(self.seed * 1_000_003 + (self.epoch if epoch is None else epoch))
        members: dict[int, list[int]] = {}
        for i, g in enumerate(self.groups):
            members.setdefault(g, []).append(i)
        batches = []
        for g in sorted(members):
            idx = list(members[g])
            if self.shuffle:
                rng.shuffle(idx)
            short = -len(idx) % self.batch_size
            idx += [idx[k % len(idx)] for k in range(short)]  # top up with this bucket's own items
            batches += [idx[k:k + self.batch_size] for k in range(0, len(idx), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        short = -len(batches) % self.num_replicas
        batches += [batches[k % len(batches)] for k in range(short)]  # every rank the same number of steps
        return batches[self.rank::self.num_replicas]

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch

    def __len__(self) -> int:
        members = {}
        for g in self.groups:
            members[g] = members.get(g, 0) + 1
        total = sum(math.ceil(n / self.batch_size) for n in members.values())
        return math.ceil(total / self.num_replicas) * self.batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
