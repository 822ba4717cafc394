"""Cached latents and text embeddings: encode each training image and caption once, not once per epoch.

With ``cache_latents`` the VAE encodes every image (after its bucket crop and the deterministic transforms)
before training starts and the batches carry the posterior instead of pixels: ``image_moments`` = mean and std
stacked on the channel axis, from which :meth:`ldm.models.parts.FirstStage.sample_moments` draws a fresh latent at
every step, as online encoding would. ``RandomHorizontalFlip`` is kept by caching both orientations; any other
random transform (a random crop, colour jitter) would be frozen by a cache, so it is refused. With
``cache_text_embeddings`` a frozen text encoder encodes each distinct caption once (``""`` included, for caption
dropout) and batches carry ``caption_context``.

An entry's key hashes everything that decides its tensors: the image file (path, size and mtime, or a content
hash for bytes), the bucket, the crop and resize filter, every transform, and the encoder's weights. Change any of
them and the entries are recomputed; stale ones are never read.

Entries live in memory, or (``disk``) as safetensors shards in a folder, written as they are filled (atomically,
every :data:`SHARD_ENTRIES` entries), so Ctrl-C loses at most one shard and a restart encodes only what is
missing. Under DDP each rank encodes its share; after a barrier rank 0 writes ``index.json`` and the others read
it after a second barrier (memory caches are exchanged with ``all_gather_object``).
"""
from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms as T
from tqdm import tqdm

from ldm.models.parts import conditioning_rows
from ldm.util import ConfigError, atomic_path

SHARD_ENTRIES = 256
FORMAT = "ldm-cache-1"
# torchvision transforms that draw random numbers; a cache would freeze their first draw.
RANDOM_TRANSFORMS = ("Random", "ColorJitter", "AutoAugment", "RandAugment", "TrivialAugment", "AugMix",
                     "GaussianBlur", "ElasticTransform")


# ---- distributed helpers (no-ops in one process) --------------------------------------------------------------
def _dist():
    return torch.distributed if torch.distributed.is_available() and torch.distributed.is_initialized() else None


def rank_and_world() -> tuple[int, int]:
    d = _dist()
    return (d.get_rank(), d.get_world_size()) if d else (0, 1)


def barrier() -> None:
    if _dist():
        _dist().barrier()


def fingerprint(module: torch.nn.Module) -> str:
    """A hash of every tensor of ``module`` (names, shapes, dtypes, values): new weights, new cache entries."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()[:16]


def key_of(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class CacheStore:
    """``{key: {name: tensor}}`` entries, in memory (``folder=None``) or as safetensors shards in ``folder``."""

    def __init__(self, folder: str | os.PathLike | None = None) -> None:
        self.folder = Path(folder) if folder is not None else None
        self.memory: dict[str, dict[str, torch.Tensor]] = {}
        self.pending: dict[str, dict[str, torch.Tensor]] = {}
        self.index: dict[str, str] = {}  # key -> shard file name
        self._handles: dict[str, Any] = {}
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self.scan()

    def __getstate__(self) -> dict:  # DataLoader workers open their own shard handles
        return {**self.__dict__, "_handles": {}, "pending": {}}

    def __contains__(self, key: str) -> bool:
        return key in self.memory or key in self.index or key in self.pending

    def __len__(self) -> int:
        return len(set(self.memory) | set(self.index) | set(self.pending))

    def scan(self) -> None:
        """Rebuild the index from the shards on disk (every complete shard: they are written atomically)."""
        index = {}
        for shard in sorted(self.folder.glob("shard-*.safetensors")):
            with safe_open(shard, "pt") as f:
                for name in f.keys():
                    index[name.split(".", 1)[0]] = shard.name
        self.index = index

    def write_index(self) -> None:
        with atomic_path(self.folder / "index.json") as tmp:
            tmp.write_text(json.dumps({"format": FORMAT, "entries": self.index}))

    def read_index(self) -> None:
        path = self.folder / "index.json"
        self.index = json.loads(path.read_text())["entries"] if path.is_file() else {}

    def get(self, key: str) -> dict[str, torch.Tensor]:
        if key in self.memory:
            return self.memory[key]
        if key in self.pending:
            return self.pending[key]
        shard = self.index[key]
        if shard not in self._handles:
            self._handles[shard] = safe_open(self.folder / shard, "pt")
        f = self._handles[shard]
        prefix = key + "."
        return {name[len(prefix):]: f.get_tensor(name) for name in f.keys() if name.startswith(prefix)}

    def add(self, key: str, tensors: dict[str, torch.Tensor]) -> None:
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        if self.folder is None:
            self.memory[key] = tensors
            return
        self.pending[key] = tensors
        if len(self.pending) >= SHARD_ENTRIES:
            self.flush()

    def flush(self) -> None:
        if self.folder is None or not self.pending:
            return
        rank, _ = rank_and_world()
        name = f"shard-{rank}-{uuid.uuid4().hex[:12]}.safetensors"
        flat = {f"{key}.{k}": v for key, tensors in self.pending.items() for k, v in tensors.items()}
        with atomic_path(self.folder / name) as tmp:
            save_file(flat, str(tmp), metadata={"format": FORMAT})
        self.index.update(dict.fromkeys(self.pending, name))
        self.pending = {}

    def synchronise(self) -> None:
        """After every rank added its share: make all entries visible to all ranks."""
        self.flush()
        d = _dist()
        if d is None:
            if self.folder is not None:
                self.write_index()
            return
        if self.folder is None:
            gathered = [None] * d.get_world_size()
            d.all_gather_object(gathered, self.memory)
            for part in gathered:
                self.memory.update(part)
            return
        d.barrier()
        if d.get_rank() == 0:
            self.scan()
            self.write_index()
        d.barrier()
        self.read_index()


# ---- what the cache stores ---------------------------------------------------------------------------------
def split_transform(dataset) -> tuple[Callable, float]:
    """The dataset's transform without its horizontal flip, and the flip's probability (0 without one); a
    ConfigError for any other random transform, which a cache would freeze."""
    steps = list(dataset.transform.transforms) if isinstance(dataset.transform, T.Compose) else [dataset.transform]
    kept, flip = [], 0.0
    for step in steps:
        name = type(step).__name__
        if isinstance(step, T.RandomHorizontalFlip):
            flip = float(step.p)
        elif name.startswith(RANDOM_TRANSFORMS):
            raise ConfigError(f"cache_latents: {dataset.description} uses {name}, a random transform; the cache holds "
                              "one encoding per image, so use a deterministic one (CenterCrop for RandomCrop) or "
                              "turn cache_latents off (RandomHorizontalFlip is fine: both sides are cached)")
        else:
            kept.append(step)
    if dataset.bucket_crop is not None and dataset.bucket_crop.crop == "random":
        raise ConfigError("cache_latents: buckets.crop is random; the cache holds one crop per image: use "
                          "buckets.crop: center or turn cache_latents off")
    return T.Compose(kept), flip


class _Jobs(Dataset):
    """Pictures to encode, decoded in DataLoader workers: ``(key, tensors or None)``."""

    def __init__(self, jobs: Sequence[tuple[str, Any, int, Any, Callable, float]]) -> None:
        self.jobs = list(jobs)

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, n: int):
        key, ds, j, target, transform, flip = self.jobs[n]
        picture = ds.picture(j, target, transform)
        return key, picture, flip


def _collate(rows):
    return rows


def _encode_batch(rows, first_stage, device, store: CacheStore) -> None:
    by_shape: dict[tuple, list] = {}
    for key, picture, flip in rows:
        if picture is not None:
            by_shape.setdefault(tuple(picture["image"].shape), []).append((key, picture, flip))
    for group in by_shape.values():
        x = torch.stack([p["image"] for _, p, _ in group]).to(device)
        moments = first_stage.encode_moments(x)
        flipped = first_stage.encode_moments(x.flip(-1)) if any(f > 0 for _, _, f in group) else None
        for n, (key, picture, flip) in enumerate(group):
            entry = {"moments": moments[n]}
            if flip > 0:
                entry["moments_flipped"] = flipped[n]
            entry.update({k: v for k, v in picture.items() if k != "image"})
            store.add(key, entry)


class LatentIndex:
    """The cache key of every (dataset, index, bucket) picture, computed once per process."""

    def __init__(self, vae_fingerprint: str) -> None:
        self.vae = vae_fingerprint
        self._settings: dict[int, tuple[Callable, float, str]] = {}
        self._keys: dict[tuple, str] = {}

    def settings(self, ds) -> tuple[Callable, float, str]:
        if id(ds) not in self._settings:
            transform, flip = split_transform(ds)
            crop = ds.bucket_crop.describe() if ds.bucket_crop is not None else None
            self._settings[id(ds)] = (transform, flip, f"{crop}|{transform!r}")
        return self._settings[id(ds)]

    def key(self, ds, j: int, target) -> str:
        k = (id(ds), j, tuple(target) if target is not None else None)
        if k not in self._keys:
            _, flip, settings = self.settings(ds)
            self._keys[k] = key_of(ds.identity(j), k[2], settings, flip > 0, self.vae)
        return self._keys[k]

    def __getstate__(self) -> dict:  # ids differ in workers: they recompute (cheaply) from the files
        return {"vae": self.vae, "_settings": {}, "_keys": {}}


def fill_latents(dataset, store: CacheStore, index: LatentIndex, first_stage, device, batch_size: int = 8,
                 num_workers: int = 0) -> int:
    """Encode every picture ``dataset`` serves that ``store`` lacks (this rank's share); return how many."""
    rank, world = rank_and_world()
    jobs, seen = [], set()
    for i in range(len(dataset)):
        target = dataset.targets[i] if dataset.targets is not None else None
        for ds, j in dataset.slots(i).values():
            key = index.key(ds, j, target)
            if key not in store and key not in seen:
                seen.add(key)
                transform, flip, _ = index.settings(ds)
                jobs.append((key, ds, j, target, transform, flip))
    jobs.sort(key=lambda job: job[3] or (0, 0))  # one bucket per encoder batch where possible
    mine = jobs[rank::world]
    loader = DataLoader(_Jobs(mine), batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    for rows in tqdm(loader, desc=f"caching latents (rank {rank})" if world > 1 else "caching latents",
                     unit="batch", disable=not mine):
        _encode_batch(rows, first_stage, device, store)
    store.synchronise()
    return len(mine)


def fill_text(captions: Sequence[str], store: CacheStore, conditioner, encoder_fingerprint: str,
              batch_size: int = 32) -> dict[str, str]:
    """Encode each distinct caption (and ``""``) once; return ``{caption: key}``."""
    rank, world = rank_and_world()
    keys = {c: key_of("text", c, encoder_fingerprint) for c in sorted(set(captions) | {""})}
    missing = [c for c, k in keys.items() if k not in store][rank::world]
    for start in tqdm(range(0, len(missing), batch_size), desc="caching text embeddings", unit="batch",
                      disable=not missing):
        chunk = missing[start:start + batch_size]
        with torch.no_grad():
            contexts = conditioning_rows(conditioner(chunk))
        for caption, context in zip(chunk, contexts):
            # A conditioning with added UNet inputs (SDXL's pooled text_embeds) is stored whole.
            store.add(keys[caption], context if isinstance(context, dict) else {"context": context})
    store.synchronise()
    return keys


class CachedDataset(Dataset):
    """``dataset``'s items with cached tensors in place of what they cache: ``<image key>_moments`` for each image
    (a picture that failed to decode is replaced by the next cached one of its bucket, as uncached items are) and
    ``<caption key>_context`` next to each caption when text is cached."""

    def __init__(self, dataset, latents: tuple[CacheStore, LatentIndex] | None = None,
                 text: tuple[CacheStore, dict[str, str]] | None = None, seed: int = 0) -> None:
        self.dataset, self.latents, self.text, self.seed = dataset, latents, text, seed
        self.targets = dataset.targets

    def __len__(self) -> int:
        return len(self.dataset)

    def _entry(self, ds, j: int, target) -> dict[str, torch.Tensor]:
        store, index = self.latents
        for offset in range(len(ds)):
            key = index.key(ds, (j + offset) % len(ds), target)
            if key in store:
                return store.get(key)
        raise ConfigError(f"cache_latents: no image of {ds.description} could be encoded; see the warnings above")

    def __getitem__(self, i: int) -> dict[str, Any]:
        target = self.targets[i] if self.targets is not None else None
        if self.latents is None:
            item = self.dataset[i]
        else:
            item = dict(self.dataset.captions_of(i))
            for role, (ds, j) in self.dataset.slots(i).items():
                entry = self._entry(ds, j, target)
                flip = "moments_flipped" in entry and torch.rand(()) < self.latents[1].settings(ds)[1]
                item[f"{role}_moments"] = entry["moments_flipped" if flip else "moments"]
                if role == "image":
                    item.update({k: v for k, v in entry.items() if not k.startswith("moments")})
        if self.text is not None:
            store, keys = self.text
            for name in [k for k in item if k == "caption" or k.endswith("_caption")]:
                entry = store.get(keys[item[name]])
                item[f"{name}_context"] = entry["context"] if len(entry) == 1 else entry
        return item
