"""What a DataModule caches for a model, checked and filled: the bridge between ``data.params.cache_*`` and
:mod:`ldm.data.cache`. Runs from ``LatentDiffusion.on_fit_start`` on every rank (the model is on its device by
then); the encoders are put on ``device`` while they encode and back where they were after."""
from __future__ import annotations

from pathlib import Path

import torch

from ldm.data.cache import CachedDataset, CacheStore, LatentIndex, fill_latents, fill_text, fingerprint, key_of
from ldm.util import ConfigError


def _store(mode: str, cache_dir: str | None, run_dir: str | None, what: str) -> CacheStore:
    if mode == "memory":
        return CacheStore(None)
    root = Path(cache_dir).expanduser() if cache_dir else Path(run_dir) / "cache" if run_dir else None
    if root is None:
        raise ConfigError("data.params.cache_latents: disk needs cache_dir (or a run dir); use memory for a quick try")
    return CacheStore(root / what)


def _on(part, device):
    was = next(part.parameters()).device
    part.to(device)
    return was


def cached_dataset(dm, inner, model, device, run_dir: str | None) -> tuple[CachedDataset, frozenset[str]]:
    """``inner`` wrapped so its items carry cached latents and/or text embeddings; the set of what is cached.

    The random state is restored afterwards: a cached run draws the same noise and timesteps as an uncached one."""
    devices = [device] if torch.device(device).type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        return _cached_dataset(dm, inner, model, device, run_dir)


def _cached_dataset(dm, inner, model, device, run_dir: str | None) -> tuple[CachedDataset, frozenset[str]]:
    cached = set()
    latents = text = None
    if dm.cache_latents:
        if model.cond_stage_model.kind == "image":
            raise ConfigError("data.params.cache_latents: this model is conditioned on the images themselves (image "
                              "variations), so batches need the pixels; turn cache_latents off")
        store = _store(dm.cache_latents, dm.cache_dir, run_dir, "latents")
        index = LatentIndex(fingerprint(model.first_stage_model))
        was = _on(model.first_stage_model, device)
        try:
            made = fill_latents(inner, store, index, model.first_stage_model, device, batch_size=dm.batch_size,
                                num_workers=dm.num_workers)
        finally:
            model.first_stage_model.to(was)
        print(f"latent cache: {len(store)} entries ({made} encoded now) in {store.folder or 'memory'}")
        latents, cached = (store, index), cached | {"latents"}
    if dm.cache_text_embeddings:
        cond = model.cond_stage_model
        if cond.kind != "text" or any(p.requires_grad for p in cond.parameters()):
            raise ConfigError("data.params.cache_text_embeddings needs a frozen text encoder (the conditioner trains, "
                              "or reads images); turn it off or freeze the conditioner")
        mode = dm.cache_latents or ("disk" if dm.cache_dir or run_dir else "memory")  # beside the latents
        store = _store(mode, dm.cache_dir, run_dir, "text")
        captions = sorted({c for i in range(len(inner)) for c in inner.captions_of(i).values()})
        identity = key_of(fingerprint(cond), model.hparams.get("cond_stage_config"))
        was = _on(cond, device)
        try:
            keys = fill_text(captions, store, cond, identity, batch_size=max(dm.batch_size, 16))
        finally:
            cond.to(was)
        print(f"text cache: {len(captions)} distinct captions in {store.folder or 'memory'}")
        text, cached = (store, keys), cached | {"text"}
    return CachedDataset(inner, latents, text), frozenset(cached)
