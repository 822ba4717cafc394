"""Data layer tests on real files of the awkward kinds scraped datasets contain, plus a few broken ones."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data as skdata
from torch.utils.data import DataLoader
from torchvision.transforms import InterpolationMode

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.folder import FolderDataset
from ldm.data.hf import hf_dataset
from ldm.data.images import BadImage, load_rgb
from ldm.data.text_only import TextOnly
from ldm.data.transforms import build_transforms
from ldm.util import ConfigError

SIZE = 32
TRANSFORMS = [
    {"target": "torchvision.transforms.Resize", "params": {"size": SIZE, "interpolation": 3, "antialias": True}},
    {"target": "torchvision.transforms.CenterCrop", "params": {"size": SIZE}},
    {"target": "torchvision.transforms.RandomHorizontalFlip"},
]
BAD = ("truncated.jpg", "empty.png", "text.png")


def photo(name: str, width: int = 64) -> Image.Image:
    img = Image.fromarray(getattr(skdata, name)())
    return img.resize((width, round(img.height * width / img.width)), Image.Resampling.BICUBIC)


def write_awkward_images(folder) -> dict[str, object]:
    """One file per awkward mode plus the three broken ones; returns name -> path."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}

    def save(name, img, **kw):
        img.save(folder / name, **kw)
        paths[name] = folder / name

    save("cmyk.jpg", photo("astronaut").convert("CMYK"), quality=90)
    rgba = photo("chelsea").convert("RGBA")
    rgba.putalpha(0)  # fully transparent
    rgba.paste((0, 0, 0, 255), (0, 0, 8, 8))  # except an opaque black corner
    save("rgba.png", rgba)
    gray16 = np.linspace(0, 65535, 48 * 48).reshape(48, 48).astype(np.uint16)
    save("gray16.png", Image.fromarray(gray16))
    pal = photo("coffee").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.putpixel((0, 0), 15)
    save("palette.png", pal, transparency=15)
    landscape = photo("coffee", 80).crop((0, 0, 80, 40))
    landscape.paste((255, 0, 0), (0, 0, 6, 6))  # marker in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    save("exif_rotated.jpg", landscape, exif=exif, quality=95)
    frames = [photo("astronaut", 40), Image.new("RGB", (40, 40), (0, 255, 0))]
    save("anim.gif", frames[0], save_all=True, append_images=frames[1:])
    (folder / "sub").mkdir()
    save("sub/chelsea.webp", photo("chelsea"))
    save("truncated.jpg", photo("astronaut"), quality=95)
    raw = paths["truncated.jpg"].read_bytes()
    paths["truncated.jpg"].write_bytes(raw[: len(raw) // 2])
    (folder / "empty.png").write_bytes(b"")
    (folder / "text.png").write_text("this is not an image\n")
    paths.update({"empty.png": folder / "empty.png", "text.png": folder / "text.png"})
    return paths


@pytest.fixture(scope="module")
def awkward(tmp_path_factory):
    root = tmp_path_factory.mktemp("awkward")
    return root, write_awkward_images(root)


def test_load_rgb_converts_every_mode(awkward):
    _, paths = awkward
    for name in ("cmyk.jpg", "rgba.png", "gray16.png", "palette.png", "exif_rotated.jpg", "anim.gif"):
        assert load_rgb(paths[name]).mode == "RGB", name
    rgba = np.asarray(load_rgb(paths["rgba.png"]))
    assert (rgba[0, 0] == 0).all() and (rgba[-1, -1] == 255).all()  # opaque black kept, transparent -> white
    assert tuple(np.asarray(load_rgb(paths["palette.png"]))[0, 0]) == (255, 255, 255)
    gray = np.asarray(load_rgb(paths["gray16.png"]))[..., 0]
    assert gray[0, 0] == 0 and gray[-1, -1] == 255 and 120 <= gray[24, 0] <= 135  # scaled, not clipped
    cmyk = np.asarray(load_rgb(paths["cmyk.jpg"])).astype(int)
    assert np.abs(cmyk - np.asarray(photo("astronaut"))).mean() < 20
    gif = np.asarray(load_rgb(paths["anim.gif"])).astype(int)
    assert np.abs(gif - np.asarray(photo("astronaut", 40))).mean() < 30  # first frame, not the green one
    upright = load_rgb(paths["exif_rotated.jpg"])
    assert upright.size == (40, 80)  # portrait after applying orientation 6
    r, g, b = upright.getpixel((37, 2))  # the marker moved from top-left to top-right
    assert r > 200 and g < 60 and b < 60


@pytest.mark.parametrize("name", BAD)
def test_load_rgb_bad_files_raise_naming_the_file(awkward, name):
    _, paths = awkward
    with pytest.raises(BadImage, match=name):
        load_rgb(paths[name])


def test_folder_dataset_skips_bad_files_once(awkward, caplog):
    root, _ = awkward
    ds = FolderDataset(str(root), image_transforms=TRANSFORMS, default_caption="a photo")
    assert len(ds) == 10
    with caplog.at_level(logging.WARNING, logger="ldm.data.images"):
        for _epoch in range(2):
            for i in range(len(ds)):
                item = ds[i]
                assert item["image"].shape == (3, SIZE, SIZE) and item["image"].dtype == torch.float32
                assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
                assert item["caption"] == "a photo"
    warned = [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]
    assert len(warned) == 3 and all(sum(b in w for w in warned) == 1 for b in BAD)
    assert sorted(p.split("/")[-1] for p in ds.skipped_files) == sorted(BAD)


def test_datamodule_workers_full_epoch_reports_skips(awkward):
    root, _ = awkward
    train = {"target": "ldm.data.folder.FolderDataset", "repeats": 2,
             "params": {"root": str(root), "image_transforms": TRANSFORMS}}
    val = {"target": "ldm.data.text_only.TextOnly", "params": {"captions": ["a cat", "a mug"]}}
    dm = DataModuleFromConfig(batch_size=4, train=train, validation=val, num_workers=2)
    seen = 0
    for batch in dm.train_dataloader():
        assert batch["image"].shape[1:] == (3, SIZE, SIZE) and len(batch["caption"]) == batch["image"].shape[0]
        seen += batch["image"].shape[0]
    assert seen == 20  # bad items replaced, not dropped
    assert sorted(p.split("/")[-1] for p in dm.skipped_files["train"]) == sorted(BAD)
    val_batch = next(iter(dm.val_dataloader()))
    assert val_batch["caption"] == ["a cat", "a mug"] and val_batch["seed"].tolist() == [0, 1]


def test_all_bad_files_is_a_clear_error(tmp_path):
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "b.jpg").write_text("nope")
    ds = FolderDataset(str(tmp_path))
    with pytest.raises(BadImage, match="all 2 images"):
        ds[0]


def test_captions_from_sidecar_jsonl_and_csv(tmp_path):
    for name in ("a.png", "b.png", "c.png"):
        photo("coffee", 16).save(tmp_path / name)
    (tmp_path / "a.txt").write_text("sidecar caption\n")
    assert [FolderDataset(str(tmp_path))[i]["caption"] for i in range(3)] == ["sidecar caption", "", ""]
    (tmp_path / "metadata.jsonl").write_text(json.dumps({"file_name": "b.png", "text": "from jsonl"}) + "\n")
    assert [FolderDataset(str(tmp_path))[i]["caption"] for i in range(3)] == ["sidecar caption", "from jsonl", ""]
    (tmp_path / "caps.csv").write_text("file_name,text\nc.png,\"from csv, quoted\"\n")
    ds = FolderDataset(str(tmp_path), caption_file="caps.csv", default_caption="dflt")
    assert [ds[i]["caption"] for i in range(3)] == ["sidecar caption", "dflt", "from csv, quoted"]


def test_folder_errors_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="folder '.*nowhere' does not exist") as err:
        FolderDataset(str(tmp_path / "nowhere"))
    assert "\n" not in str(err.value)
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ConfigError, match=r"no images in folder .*\.png, \.jpg") as err:
        FolderDataset(str(tmp_path))
    assert "\n" not in str(err.value)


def test_hf_local_imagefolder_custom_columns(tmp_path):
    folder = tmp_path / "hfdata"
    folder.mkdir()
    rows = []
    for i, name in enumerate(("astronaut", "chelsea", "coffee")):
        photo(name, 24).save(folder / f"{name}.png")
        rows.append({"file_name": f"{name}.png", "prompt": f"photo of {name}", "id": i})
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    rows.append({"file_name": "broken.jpg", "prompt": "broken", "id": 3})
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = str(tmp_path / "cache")
    ds = hf_dataset(str(folder), image_column="image", text_column="prompt", image_transforms=TRANSFORMS,
                    cache_dir=cache)
    items = [ds[i] for i in range(len(ds))]
    assert len(items) == 4 and all(it["image"].shape == (3, SIZE, SIZE) for it in items)
    assert {it["caption"] for it in items} == {"photo of astronaut", "photo of chelsea", "photo of coffee"}
    assert len(ds.skipped_files) == 1 and "broken.jpg" in ds.skipped_files[0]
    with pytest.raises(ConfigError, match=r"text_column 'text' not found.*\['image', 'prompt', 'id'\]") as err:
        hf_dataset(str(folder), cache_dir=cache)
    assert "\n" not in str(err.value)


def test_hf_unknown_name_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="offline") as err:
        hf_dataset("no-such-user/no-such-dataset-xyz", cache_dir=str(tmp_path))
    assert "\n" not in str(err.value)


def test_text_only_list_file_and_stable_seeds(tmp_path):
    ds = TextOnly(captions=["a cat", "a dog"], seed=100, n_per_caption=2)
    assert [ds[i] for i in range(len(ds))] == [
        {"caption": "a cat", "seed": 100}, {"caption": "a cat", "seed": 101},
        {"caption": "a dog", "seed": 102}, {"caption": "a dog", "seed": 103},
    ]
    assert ds[2] == TextOnly(captions=["a cat", "a dog"], seed=100, n_per_caption=2)[2]
    (tmp_path / "prompts.txt").write_text("first prompt\n\nsecond prompt\n")
    batch = next(iter(DataLoader(TextOnly(caption_file=str(tmp_path / "prompts.txt")), batch_size=8)))
    assert batch["caption"] == ["first prompt", "second prompt"]
    assert batch["seed"].dtype == torch.int64 and batch["seed"].tolist() == [0, 1]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ConfigError, match="empty"):
        TextOnly(caption_file=str(tmp_path / "empty.txt"))


def test_transforms_interpolation_int_and_range():
    pipeline = build_transforms(TRANSFORMS[:1])
    resize = pipeline.transforms[0]
    assert resize.interpolation == InterpolationMode.BICUBIC and resize.antialias is True
    out = pipeline(photo("astronaut", 128))
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.float32
    assert out.min() >= -1.0 and out.max() <= 1.0 and out.min() < -0.5 and out.max() > 0.5
    with pytest.raises(ConfigError, match="torchvision.transforms.Resizee") as err:
        build_transforms([{"target": "torchvision.transforms.Resizee", "params": {"size": 8}}])
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="Resize"):
        build_transforms([{"target": "torchvision.transforms.Resize", "params": {"sise": 8}}])


def test_hf_save_to_disk_folder(tmp_path):
    import datasets

    paths = []
    for name in ("chelsea", "coffee"):
        photo(name, 16).save(tmp_path / f"{name}.png")
        paths.append(str(tmp_path / f"{name}.png"))
    ds = datasets.Dataset.from_dict({"img": paths, "caption": ["cat", "mug"]}).cast_column("img", datasets.Image())
    datasets.DatasetDict({"train": ds}).save_to_disk(str(tmp_path / "saved"))
    loaded = hf_dataset(str(tmp_path / "saved"), image_column="img", text_column="caption")
    assert [loaded[i]["caption"] for i in range(2)] == ["cat", "mug"] and loaded[0]["image"].shape[0] == 3
    with pytest.raises(ConfigError, match=r"no split 'validation'; splits: \['train'\]"):
        hf_dataset(str(tmp_path / "saved"), split="validation")
