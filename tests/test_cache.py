"""Cached latents and text embeddings: the same losses as online encoding, stale entries recomputed (image file,
resize filter, VAE), both flips cached, random transforms refused, an interrupted fill resumed, and the encoders
off the accelerator while training."""
from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

import ldm.data.cache as cache
from ldm.data.datamodule import DataModuleFromConfig
from ldm.util import ConfigError, instantiate_from_config
from tests.conftest import TINY_MODEL
from tests.test_buckets import dreambooth_block, write_shapes_folder

BUCKETS = {"resolution": 32, "step": 8}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return write_shapes_folder(tmp_path_factory.mktemp("shapes"))


def tiny_model(seed: int = 0, **params):
    pl.seed_everything(seed, verbose=False)
    cfg = OmegaConf.to_container(OmegaConf.load(TINY_MODEL))["model"]
    cfg["params"].update(params)
    return instantiate_from_config(cfg)


def datamodule(folder: Path, transforms=(), **params) -> DataModuleFromConfig:
    train = {"target": "ldm.data.folder.FolderDataset",
             "params": {"root": str(folder), "image_transforms": list(transforms)}}
    return DataModuleFromConfig(batch_size=2, num_workers=0, train=train, **params)


class Losses(pl.Callback):
    def __init__(self):
        self.losses, self.keys = [], set()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))
        self.keys |= set(batch)


def fit(model, dm, steps: int = 6, run_dir: Path | None = None) -> Losses:
    import tempfile

    run_dir = run_dir or Path(tempfile.mkdtemp(prefix="cache-test-"))  # never the working directory
    pl.seed_everything(0, verbose=False)
    record = Losses()
    trainer = pl.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                         callbacks=[record], enable_progress_bar=False, enable_model_summary=False,
                         default_root_dir=str(run_dir))
    trainer.fit(model, dm)
    return record


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_cached_and_uncached_runs_log_the_same_losses(folder, tmp_path, mode):
    plain = fit(tiny_model(), datamodule(folder, buckets=BUCKETS))
    dm = datamodule(folder, buckets=BUCKETS, cache_latents=mode, cache_text_embeddings=True)
    model = tiny_model()
    cached = fit(model, dm, run_dir=tmp_path)
    assert "image_moments" in cached.keys and "caption_context" in cached.keys and "image" not in cached.keys
    assert "image" in plain.keys
    assert cached.losses == pytest.approx(plain.losses, abs=1e-5)
    assert len(set(plain.losses)) == len(plain.losses)  # the losses are real, changing numbers
    assert dm.cached_inputs == {"latents", "text"}
    assert model.first_stage_model in model._offloaded and model.cond_stage_model in model._offloaded
    if mode == "disk":
        assert list((tmp_path / "cache" / "latents").glob("shard-*.safetensors"))
        assert (tmp_path / "cache" / "latents" / "index.json").is_file()


def test_caption_dropout_uses_the_cached_empty_caption(folder):
    # With every caption dropped, the context is the empty caption's: the same as online encoding gives.
    plain = fit(tiny_model(), datamodule(folder, buckets=BUCKETS), steps=3)
    model = tiny_model()
    model.cond_stage_model.ucg_rate = 1.0
    plain_model = tiny_model()
    plain_model.cond_stage_model.ucg_rate = 1.0
    dropped = fit(plain_model, datamodule(folder, buckets=BUCKETS), steps=3)
    cached = fit(model, datamodule(folder, buckets=BUCKETS, cache_text_embeddings=True), steps=3)
    assert cached.losses == pytest.approx(dropped.losses, abs=1e-5)
    assert plain.losses != pytest.approx(dropped.losses, abs=1e-5)


def fill(folder: Path, run_dir: Path, model, transforms=(), **buckets) -> DataModuleFromConfig:
    dm = datamodule(folder, transforms, buckets={**BUCKETS, **buckets}, cache_latents="disk")
    dm.prepare_train(model, torch.device("cpu"), str(run_dir))
    return dm


def encoded(capsys) -> int:
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("latent cache:")][-1]
    return int(line.split("(")[1].split()[0])


def test_stale_entries_are_recomputed_never_reused(folder, tmp_path, capsys):
    work = write_shapes_folder(tmp_path / "photos")
    model = tiny_model()
    fill(work, tmp_path, model)
    assert encoded(capsys) == 7
    fill(work, tmp_path, model)
    assert encoded(capsys) == 0  # same files, settings and VAE: all reused
    fill(work, tmp_path, model, resize_filter="lanczos")
    assert encoded(capsys) == 7
    other_vae = tiny_model(seed=1)
    fill(work, tmp_path, other_vae)
    assert encoded(capsys) == 7
    (work / "camera.png").write_bytes((work / "moon.png").read_bytes())  # one image changed on disk
    fill(work, tmp_path, model)
    assert encoded(capsys) == 1


def test_flips_are_cached_both_ways_and_random_transforms_refused(folder, tmp_path):
    flip = [{"target": "torchvision.transforms.RandomHorizontalFlip", "params": {"p": 0.5}}]
    dm = fill(folder, tmp_path, tiny_model(), flip)
    item = dm.datasets["train"][0]
    store, index = dm.datasets["train"].latents
    entry = store.get(index.key(dm.datasets["train"].dataset, 0, dm.datasets["train"].targets[0]))
    assert set(entry) >= {"moments", "moments_flipped"}
    assert not torch.equal(entry["moments"], entry["moments_flipped"])
    assert any(torch.equal(item["image_moments"], entry[k]) for k in ("moments", "moments_flipped"))
    jitter = [{"target": "torchvision.transforms.ColorJitter", "params": {"brightness": 0.2}}]
    with pytest.raises(ConfigError, match="ColorJitter, a random transform"):
        fill(folder, tmp_path / "b", tiny_model(), jitter)
    with pytest.raises(ConfigError, match="buckets.crop is random"):
        fill(folder, tmp_path / "c", tiny_model(), crop="random")


def test_an_interrupted_fill_keeps_its_shards_and_resumes(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(cache, "SHARD_ENTRIES", 2)
    calls = {"n": 0}
    real = cache._encode_batch

    def interrupted(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache, "_encode_batch", interrupted)
    model = tiny_model()
    with pytest.raises(KeyboardInterrupt):
        fill(folder, tmp_path, model)
    shards = list((tmp_path / "cache" / "latents").glob("shard-*.safetensors"))
    assert shards and not list((tmp_path / "cache" / "latents").glob(".*.part"))
    monkeypatch.setattr(cache, "_encode_batch", real)
    fill(folder, tmp_path, model)
    assert 0 < encoded(capsys) < 7  # only what the interrupted fill had not written


def test_text_cache_refuses_a_trainable_text_encoder(folder):
    model = tiny_model()
    model.cond_stage_model.set_trainable(True)
    dm = datamodule(folder, cache_text_embeddings=True)
    with pytest.raises(ConfigError, match="needs a frozen text encoder"):
        dm.prepare_train(model, torch.device("cpu"), None)


def test_logged_samples_and_reconstructions_come_from_a_cached_batch(folder):
    model = tiny_model()
    dm = datamodule(folder, buckets=BUCKETS, cache_latents="memory", cache_text_embeddings=True)
    dm.prepare_train(model, torch.device("cpu"), None)
    batch = next(iter(dm.train_dataloader()))
    images = model.log_images(batch, n=2, steps=2)
    h, w = batch["image_moments"].shape[-2:]
    assert images["reconstruction"].shape[-2:] == (h * 2, w * 2)
    assert images["samples_cfg3"].shape == images["reconstruction"].shape


def test_hf_imagefolder_trains_bucketed_from_the_cache(tmp_path):
    import json

    work = write_shapes_folder(tmp_path / "hf")
    rows = [{"file_name": p.name, "text": p.with_suffix(".txt").read_text()} for p in sorted(work.glob("*.png"))]
    (work / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    train = {"target": "ldm.data.hf.hf_dataset", "params": {"name": str(work)}}
    dm = DataModuleFromConfig(batch_size=2, num_workers=0, train=train, buckets=BUCKETS, cache_latents="memory",
                              cache_text_embeddings=True)
    dm.prepare_train(tiny_model(), torch.device("cpu"), None)
    batches = list(dm.train_dataloader())
    assert {tuple(b["image_moments"].shape[-2:]) for b in batches} == {(12, 20), (20, 12), (16, 16)}
    assert {c for b in batches for c in b["caption"]} == {r["text"] for r in rows}
    assert len(dm.datasets["train"].latents[0]) == len(rows)


def test_dreambooth_trains_from_cached_instance_and_class_images(folder, tmp_path):
    train = dreambooth_block(folder, tmp_path)
    plain = fit(tiny_model(), DataModuleFromConfig(batch_size=2, num_workers=0, train=train, buckets=BUCKETS), steps=3)
    dm = DataModuleFromConfig(batch_size=2, num_workers=0, train=train, buckets=BUCKETS, cache_latents="memory",
                              cache_text_embeddings=True)
    cached = fit(tiny_model(), dm, steps=3)
    assert {"image_moments", "class_image_moments", "caption_context", "class_caption_context"} <= cached.keys
    assert cached.losses == pytest.approx(plain.losses, abs=1e-5)  # instance + prior loss, as online
    # 7 instance photos, and the 3 class images once per bucket they were cropped to
    assert len(dm.datasets["train"].latents[0]) >= 7 + 3


def test_text_cache_refuses_rows_with_several_captions(tmp_path):
    import datasets
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    ds = datasets.Dataset.from_dict({"image": [str(tmp_path / "a.png")] * 2, "text": [["a cat", "a kitten"]] * 2})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "saved"))
    train = {"target": "ldm.data.hf.hf_dataset", "params": {"name": str(tmp_path / "saved")}}
    with pytest.raises(ConfigError, match="several captions per image"):
        DataModuleFromConfig(batch_size=1, train=train, cache_text_embeddings=True, holdout=0)
    DataModuleFromConfig(batch_size=1, train=train, cache_latents="memory", holdout=0)  # latents alone are fine
