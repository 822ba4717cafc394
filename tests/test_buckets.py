"""Aspect-ratio buckets: the bucket list, the minimal crop, no image dropped, one bucket per batch, equal batch
counts on every DDP rank, and a main.py run on a folder of three aspect ratios (one process, then two)."""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from ldm.data.buckets import BucketCrop, BucketSampler, assign_buckets, bucket_sizes, nearest_bucket
from ldm.data.datamodule import DataModuleFromConfig
from ldm.util import ConfigError
from tests.conftest import REPO, TINY_MODEL, main_env, run_dirs

# (width, height) of the photos: wide, tall and square, with uneven counts so buckets differ in size.
SHAPES = {"astronaut": (48, 24), "rocket": (50, 26), "coffee": (46, 22), "chelsea": (24, 48), "horse": (22, 46),
          "camera": (32, 32), "moon": (31, 33)}


def write_shapes_folder(root: Path) -> Path:
    from skimage import data as skdata

    root.mkdir(parents=True, exist_ok=True)
    for name, size in SHAPES.items():
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a photo of a {name}")
    return root


@pytest.fixture(scope="module")
def shapes_folder(tmp_path_factory) -> Path:
    return write_shapes_folder(tmp_path_factory.mktemp("shapes"))


def test_bucket_sizes_fill_the_pixel_budget_within_the_aspect_limit():
    sizes = bucket_sizes(512, 64, 2.0)
    assert (512, 512) in sizes and (640, 384) in sizes and (384, 640) in sizes
    for h, w in sizes:
        assert h % 64 == 0 and w % 64 == 0 and h * w <= 512 * 512 and max(h / w, w / h) <= 2.0
        assert (w, h) in sizes  # every tall bucket has its wide twin
    assert len(bucket_sizes(512, 64, 4.0)) > len(sizes)
    with pytest.raises(ConfigError, match="max_aspect"):
        bucket_sizes(512, 64, 0.5)


def test_each_image_goes_to_the_nearest_aspect_and_is_cropped_minimally():
    sizes = bucket_sizes(512, 64, 2.0)
    assert sizes[nearest_bucket((1000, 500), sizes)] == (384, 640)  # (h, w): the widest bucket
    assert sizes[nearest_bucket((600, 600), sizes)] == (512, 512)
    image = Image.new("RGB", (1000, 500))
    cropped = BucketCrop("center")(image, (384, 640))
    assert cropped.image.size == (640, 384)
    assert cropped.original_size == (500, 1000)
    assert cropped.crop_top_left == (0, 64)  # resized to 768 x 384: 128 columns of overhang, half on each side
    tops = {BucketCrop("random")(image, (384, 640)).crop_top_left for _ in range(30)}
    assert len(tops) > 3 and all(top == 0 and 0 <= left <= 128 for top, left in tops)


def test_small_buckets_are_merged_or_repeated_and_the_table_says_so():
    buckets = bucket_sizes(512, 64, 2.0)
    sizes = [(1000, 500)] * 5 + [(500, 1000)] + [(512, 512)] * 6
    merged = assign_buckets(sizes, buckets, batch_size=4, small_buckets="merge")
    table = merged.table(4)
    assert "1 merged into 512 x 512" in table and "12 images" in table and "none dropped" in table
    assert sorted(Counter(merged.of_image).values()) == [5, 7]
    kept = assign_buckets(sizes, buckets, batch_size=4, small_buckets="repeat")
    assert sorted(Counter(kept.of_image).values()) == [1, 5, 6]
    assert "last batch filled by repeating 3 of its images" in kept.table(4)
    # Repeats count: 1 tall image x 4 repeats fills a batch by itself, so nothing is merged.
    assert sorted(Counter(assign_buckets(sizes, buckets, 4, repeats=4).of_image).values()) == [1, 5, 6]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_sampler_batches_hold_one_bucket_use_every_item_and_are_equal_per_rank(world):
    groups = [0] * 7 + [1] * 2 + [2] * 5
    samplers = [BucketSampler(groups, 3, seed=1, num_replicas=world, rank=r) for r in range(world)]
    per_rank = [s.batches() for s in samplers]
    assert len({len(b) for b in per_rank}) == 1  # no rank waits at the end of the epoch
    assert all(len(s) == len(per_rank[0]) * 3 == len(list(iter(s))) for s in samplers)
    seen = set()
    for batches in per_rank:
        for batch in batches:
            assert len(batch) == 3 and len({groups[i] for i in batch}) == 1
            seen.update(batch)
    assert seen == set(range(len(groups)))
    again = BucketSampler(groups, 3, seed=1, num_replicas=world, rank=0)
    assert again.batches() == per_rank[0]  # deterministic per seed: a resumed run sees the same epoch
    again.set_epoch(1)
    assert again.batches() != per_rank[0]


def test_buckets_refuse_resizing_transforms_and_unknown_keys(shapes_folder):
    train = {"target": "ldm.data.folder.FolderDataset",
             "params": {"root": str(shapes_folder),
                        "image_transforms": [{"target": "torchvision.transforms.Resize", "params": {"size": 16}}]}}
    with pytest.raises(ConfigError, match=r"image_transforms \['Resize'\]; buckets resize and crop"):
        DataModuleFromConfig(batch_size=2, train=train, buckets={"resolution": 32, "step": 8})
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['resolutoin'\]"):
        DataModuleFromConfig(batch_size=2, train={**train, "params": {"root": str(shapes_folder)}},
                             buckets={"resolutoin": 32})
    text = {"target": "ldm.data.text_only.TextOnly", "params": {"captions": ["a"]}}
    with pytest.raises(ConfigError, match="does not support it"):
        DataModuleFromConfig(batch_size=2, train=text, buckets={"resolution": 32, "step": 8})


def dreambooth_block(instances: Path, tmp: Path) -> dict:
    """A DreamBoothDataset block over ``instances`` with three square class images."""
    classes = tmp / "class"
    classes.mkdir()
    for n in range(3):
        Image.new("RGB", (32, 32), (n * 60, 90, 0)).save(classes / f"{n}.png")
    return {"target": "ldm.data.dreambooth.DreamBoothDataset",
            "params": {"instance_data_dir": str(instances), "instance_prompt": "a photo of sks thing",
                       "class_data_dir": str(classes), "class_prompt": "a photo of a thing", "num_class_images": 3,
                       "check_identifier": False}}


def test_dreambooth_class_images_take_their_instance_bucket(tmp_path, shapes_folder):
    train = dreambooth_block(shapes_folder, tmp_path)
    dm = DataModuleFromConfig(batch_size=2, train=train, num_workers=0, buckets={"resolution": 32, "step": 8})
    dm.prepare_train()
    for batch in dm.train_dataloader():
        assert batch["image"].shape == batch["class_image"].shape
    assert {tuple(b["image"].shape[-2:]) for b in dm.train_dataloader()} == {(24, 40), (40, 24), (32, 32)}


def _bucket_config(tmp: Path, folder: Path, trainer: dict, callbacks: dict, data: dict | None = None) -> Path:
    config = {
        "data": {"target": "ldm.data.datamodule.DataModuleFromConfig",
                 "params": {"batch_size": 2, "num_workers": 0, "buckets": {"resolution": 32, "step": 8},
                            **(data or {}),
                            "train": {"target": "ldm.data.folder.FolderDataset", "params": {"root": str(folder)}}}},
        "lightning": {"trainer": {"accelerator": "cpu", "max_epochs": 1, "log_every_n_steps": 1,
                                  "enable_progress_bar": False, "enable_model_summary": False, **trainer},
                      "callbacks": {"image_logger": {"params": {"batch_frequency": 2, "max_images": 2, "steps": 2,
                                                                "sizes": [[24, 40], [40, 24]]}},
                                    **callbacks}},
    }
    path = tmp / "buckets.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _train(tmp: Path, folder: Path, devices: int, data: dict | None = None) -> tuple[str, Path, dict]:
    probe = {"target": "tests.ddp_probe.Probe", "params": {"out_dir": str(tmp / "probe")}}
    trainer = {"devices": devices, **({"strategy": "ddp"} if devices > 1 else {})}
    config = _bucket_config(tmp, folder, trainer, {"probe": probe}, data)
    proc = subprocess.run([sys.executable, "main.py", "-t", "--base", str(TINY_MODEL), str(config), "-l",
                           str(tmp / "logs")], cwd=REPO, env=main_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r: json.loads((tmp / "probe" / f"rank{r}.json").read_text()) for r in range(devices)}
    return proc.stdout + proc.stderr, run_dirs(tmp / "logs")[0], records


def test_a_folder_of_three_aspect_ratios_trains_with_every_image_in_one_bucket_per_batch(tmp_path, shapes_folder):
    output, run, records = _train(tmp_path, shapes_folder, devices=1)
    assert "aspect-ratio buckets" in output and "7 images in 3 buckets; none dropped" in output
    rec = records[0]
    captions = {c for batch in rec["captions"] for c in batch}
    assert captions == {f"a photo of a {name}" for name in SHAPES}  # every image used in the epoch
    assert {tuple(s[-2:]) for s in rec["shapes"]} == {(24, 40), (40, 24), (32, 32)}
    grids = sorted(p.name.split("_gs")[0] for p in (run / "images" / "train").glob("samples*"))
    assert set(grids) == {"samples_cfg3_40x24", "samples_cfg3_24x40"}  # the configured sizes, (w x h) in the name
    with Image.open(next((run / "images" / "train").glob("samples_cfg3_40x24*"))) as grid:
        assert grid.size[0] > grid.size[1]  # wide tiles


def test_ddp_ranks_take_equal_batch_counts_and_share_the_cache_work(tmp_path, shapes_folder):
    output, run, records = _train(tmp_path, shapes_folder, devices=2,
                                  data={"cache_latents": "disk", "cache_text_embeddings": True})
    shards = sorted(p.name.split("-")[1] for p in (run / "cache" / "latents").glob("shard-*.safetensors"))
    assert set(shards) == {"0", "1"}  # each rank encoded its share
    index = json.loads((run / "cache" / "latents" / "index.json").read_text())["entries"]
    assert len(index) == len(SHAPES) and "latent cache: 7 entries" in output
    steps = [len(records[r]["steps"]) for r in (0, 1)]
    assert steps[0] == steps[1] > 0
    seen = {c for r in (0, 1) for batch in records[r]["captions"] for c in batch}
    assert seen == {f"a photo of a {name}" for name in SHAPES}
    assert all(shape[0] == 2 for r in (0, 1) for shape in records[r]["shapes"])  # full batches, topped up in-bucket
    assert records[0]["weight_hashes"] == records[1]["weight_hashes"]


def test_a_chain_of_merges_names_where_the_images_ended_up():
    # The tall image joins the 448 x 576 bucket, which is itself too small and joins 512 x 512.
    sizes = [(427, 640), (550, 660)] + [(512, 512)] * 6
    table = assign_buckets(sizes, bucket_sizes(512, 64, 2.0), batch_size=4).table(4)
    assert "384 x 640" in table and table.count("merged into 512 x 512") == 2 and "merged into 448 x 576" not in table
