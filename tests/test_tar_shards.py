"""TarShards: WebDataset-style tar shards streamed into the DataModule, split across DataLoader workers."""
from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.tar_shards import TarShards, expand_urls
from ldm.util import ConfigError

RESIZE = [{"target": "torchvision.transforms.Resize", "params": {"size": 8}}]


def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def png(value: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (12, 12), (value, value, value)).save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, n_shards: int = 4, per_shard: int = 5, broken: bool = False) -> str:
    """Shards whose sample k has a gray level and caption identifying it."""
    root.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(per_shard):
                k = s * per_shard + i
                add(tar, f"{k:06d}.png", png(10 * k))
                add(tar, f"{k:06d}.txt", f"sample {k}".encode())
            if broken:
                add(tar, "bad.jpg", b"not an image")
    return str(root / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


def captions(items) -> list[str]:
    return [c for item in items for c in ([item["caption"]] if isinstance(item["caption"], str) else item["caption"])]


def test_brace_ranges_and_missing_shards(tmp_path):
    urls = write_shards(tmp_path / "s")
    assert [Path(u).name for u in expand_urls(urls)] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert len(expand_urls(str(tmp_path / "s" / "*.tar"))) == 4
    with pytest.raises(ConfigError, match="missing"):
        expand_urls(str(tmp_path / "s" / "shard-{000000..000009}.tar"))


def test_one_epoch_is_every_sample_once_shuffled_and_decoded(tmp_path):
    ds = TarShards(write_shards(tmp_path / "s"), RESIZE, shuffle_buffer=8, seed=1)
    assert len(ds) == 20  # counted from the shards' headers
    items = list(ds)
    assert sorted(captions(items)) == sorted(f"sample {k}" for k in range(20))
    assert captions(items) != [f"sample {k}" for k in range(20)]  # shuffled
    first = next(i for i in items if i["caption"] == "sample 3")
    assert first["image"].shape == (3, 8, 8)
    assert torch.allclose(first["image"], torch.full((3, 8, 8), 30 / 127.5 - 1), atol=1e-6)
    assert captions(list(ds)) != captions(items)  # a new order each pass


def test_undecodable_images_are_skipped(tmp_path):
    ds = TarShards(write_shards(tmp_path / "s", broken=True), RESIZE)
    assert len(ds) == 24  # the header count cannot know an image is broken: the quota is filled from good ones
    assert set(captions(list(ds))) == {f"sample {k}" for k in range(20)}


def test_workers_read_disjoint_shards_and_equal_quotas(tmp_path):
    ds = TarShards(write_shards(tmp_path / "s"), RESIZE, shuffle_buffer=0)
    dm = DataModuleFromConfig(batch_size=2, num_workers=2, train={
        "target": "ldm.data.tar_shards.TarShards",
        "params": {"urls": str(tmp_path / "s" / "*.tar"), "image_transforms": RESIZE, "shuffle_buffer": 4}})
    seen = captions(dm.train_dataloader())
    assert sorted(seen) == sorted(f"sample {k}" for k in range(20))
    # A quota larger than a reader's shards cycles through them again instead of ending early.
    longer = TarShards(ds.shards[:1], RESIZE, length=12, shuffle_buffer=0)
    assert len(list(longer)) == 12 and len(set(captions(list(longer)))) == 5
    with pytest.raises(ConfigError, match="repeats"):
        DataModuleFromConfig(batch_size=2, train={"target": "ldm.data.tar_shards.TarShards", "repeats": 2,
                                                  "params": {"urls": ds.shards}})


def test_image_variations_train_from_shards_through_main(tmp_path):
    """The variations recipe's data block swapped for shards: the image is its own condition, no captions needed."""
    import yaml

    from tests.conftest import main_py, run_dirs

    repo = Path(__file__).resolve().parents[1]
    urls = write_shards(tmp_path / "s")
    data = {"data": {"target": "ldm.data.datamodule.DataModuleFromConfig",
                     "params": {"batch_size": 4, "num_workers": 0, "train": {
                         "target": "ldm.data.tar_shards.TarShards",
                         "params": {"urls": urls, "shuffle_buffer": 8, "image_transforms": [
                             {"target": "torchvision.transforms.Resize", "params": {"size": 16}}]}}}},
            "lightning": {"trainer": {"accelerator": "cpu", "max_steps": 3, "enable_progress_bar": False,
                                      "enable_model_summary": False},
                          "callbacks": {"image_logger": {"params": {"batch_frequency": 0}}}}}
    (tmp_path / "data.yaml").write_text(yaml.safe_dump(data))
    r = main_py("-t", "--base", repo / "configs" / "tiny" / "tiny-variations.yaml", tmp_path / "data.yaml",
                "-l", tmp_path / "logs", "-n", "shards")
    assert r.returncode == 0, r.stderr[-3000:]
    assert (run_dirs(tmp_path / "logs")[0] / "checkpoints" / "last.ckpt").exists()


def test_streamed_images_are_bucketed_on_the_fly_in_whole_batches(tmp_path):
    root = tmp_path / "shapes"
    root.mkdir()
    shapes = [(48, 24), (24, 48), (32, 32)]
    for s in range(2):
        with tarfile.open(root / f"shard-{s:06d}.tar", "w") as tar:
            for i in range(9):
                buf = io.BytesIO()
                Image.new("RGB", shapes[(s + i) % 3], (i, i, i)).save(buf, format="PNG")
                add(tar, f"{s}{i:05d}.png", buf.getvalue())
                add(tar, f"{s}{i:05d}.txt", f"sample {s}-{i}".encode())
    train = {"target": "ldm.data.tar_shards.TarShards", "params": {"urls": str(root / "*.tar"), "shuffle_buffer": 4}}
    for workers in (0, 2):
        dm = DataModuleFromConfig(batch_size=3, train=train, num_workers=workers, buckets={"resolution": 32, "step": 8})
        dm.prepare_train()
        batches = list(dm.train_dataloader())
        assert len(batches) == 18 // 3  # whole batches only, the same number from every reader
        assert {tuple(b["image"].shape[-2:]) for b in batches} == {(24, 40), (40, 24), (32, 32)}
        assert all(b["image"].shape[0] == 3 and "crop_top_left" in b for b in batches)
    with pytest.raises(ConfigError, match="is streamed"):
        DataModuleFromConfig(batch_size=3, train=train, cache_latents="memory")
