"""Faults in data files: images in tar shards decode like everywhere else and bad ones are skipped with the shared
warning; malformed caption files stop with one line naming the file and the line."""
from __future__ import annotations

import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.folder import FolderDataset
from ldm.data.hf import hf_dataset
from ldm.data.images import load_rgb
from ldm.data.prepare import read_captions
from ldm.data.tar_shards import TarShards
from ldm.util import ConfigError
from tests.test_prepare import load_script

SIZE = 16
FIXED = [{"target": "torchvision.transforms.Resize", "params": {"size": SIZE, "interpolation": 3, "antialias": True}},
         {"target": "torchvision.transforms.CenterCrop", "params": {"size": SIZE}}]


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def awkward_images() -> dict[str, bytes]:
    """File name -> bytes for the modes where a plain ``Image.open(...).convert("RGB")`` goes wrong."""
    landscape = Image.new("RGB", (40, 20), (30, 90, 200))
    landscape.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display: the stored landscape is a portrait
    rgba = Image.new("RGBA", (24, 24), (0, 200, 0, 0))  # transparent green: shown (and trained) as white
    rgba.paste((0, 0, 0, 255), (0, 0, 12, 12))
    gray16 = Image.fromarray(np.linspace(0, 65535, 24 * 24).reshape(24, 24).astype(np.uint16))
    cmyk = Image.new("CMYK", (24, 24), (0, 180, 180, 20))
    return {"000000.jpg": encoded(landscape, "JPEG", exif=exif, quality=95), "000001.png": encoded(rgba, "PNG"),
            "000002.png": encoded(gray16, "PNG"), "000003.jpg": encoded(cmyk, "JPEG", quality=95)}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def skip_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "skipping unreadable image" in r.getMessage()]


def test_shard_images_decode_like_the_folder_dataset(tmp_path):
    images = awkward_images()
    folder = tmp_path / "folder"
    folder.mkdir()
    members = {}
    for name, data in images.items():
        (folder / name).write_bytes(data)
        members[name] = data
        members[name.split(".")[0] + ".txt"] = f"caption {name}".encode()
    shard = write_tar(tmp_path / "shard-000000.tar", members)
    from_folder = FolderDataset(str(folder), image_transforms=FIXED)
    from_shard = {item["caption"]: item["image"] for item in TarShards(str(shard), FIXED, shuffle_buffer=0)}
    assert len(from_shard) == 4
    for i, path in enumerate(from_folder.files):
        expected = from_folder[i]["image"]
        assert torch.equal(from_shard[f"caption {path.name}"], expected), path.name
    # The folder side really is upright and composited on white (so the comparison above means something).
    upright = load_rgb(folder / "000000.jpg")
    assert upright.size == (20, 40) and upright.getpixel((19, 0))[0] > 200  # red marker now at the top right
    assert (from_folder[1]["image"][:, -1, -1] > 0.95).all()  # transparent corner -> white


def test_bad_shard_members_are_skipped_with_the_shared_warning(tmp_path, caplog):
    good = encoded(Image.new("RGB", (12, 12), (90, 90, 90)), "PNG")
    truncated = encoded(Image.new("RGB", (64, 64), (10, 200, 30)), "JPEG")[:200]
    shard = write_tar(tmp_path / "s" / "shard-000000.tar", {
        "000000.png": good, "000000.txt": "caf\xe9 au lait".encode("latin-1"),  # an 8-bit caption, read anyway
        "000001.jpg": truncated, "000001.txt": b"broken",
        "000002.txt": b"a caption without an image",
        "000003.png": good, "000003.txt": b"second good"})
    with caplog.at_level(logging.WARNING):
        ds = TarShards(str(shard), FIXED, shuffle_buffer=0)
        assert len(ds) == 4
        for _epoch in range(2):
            assert sorted(item["caption"] for item in ds) == ["café au lait"] * 2 + ["second good"] * 2
    warned = skip_warnings(caplog)
    assert len(warned) == 2, warned  # once per bad sample, not once per pass
    assert any(f"{shard}:000001.jpg" in w for w in warned)
    assert any(f"{shard}:000002" in w and "no image" in w for w in warned)
    assert sorted(ds.skipped_files) == [f"{shard}:000001.jpg", f"{shard}:000002"]
    # The DataModule lists them at the end of the run, as for the other datasets, from worker processes too.
    dm = DataModuleFromConfig(batch_size=2, num_workers=2, train={
        "target": "ldm.data.tar_shards.TarShards", "params": {"urls": str(shard), "image_transforms": FIXED}})
    assert sum(len(b["caption"]) for b in dm.train_dataloader()) == 4
    assert dm.skipped_files == {"train": [f"{shard}:000001.jpg", f"{shard}:000002"]}


def test_truncated_shard_gives_what_it_holds_and_warns(tmp_path, caplog):
    noise = [Image.fromarray(np.random.default_rng(k).integers(0, 255, (32, 32, 3), dtype=np.uint8)) for k in range(6)]
    members = {f"{k:06d}.{ext}": data for k in range(6) for ext, data in
               (("png", encoded(noise[k], "PNG")), ("txt", f"s{k}".encode()))}
    shard = write_tar(tmp_path / "shard-000000.tar", members)
    with tarfile.open(shard) as tar:
        cut = tar.getmember("000003.png")
    shard.write_bytes(shard.read_bytes()[: cut.offset_data + cut.size // 2])  # a download that stopped in sample 3
    with caplog.at_level(logging.WARNING):
        ds = TarShards(str(shard), FIXED, shuffle_buffer=0)
        got = [item["caption"] for item in ds]
    assert len(ds) == 3 and got == ["s0", "s1", "s2"]
    warned = skip_warnings(caplog)
    assert len(warned) == 1 and f"shard {shard} is truncated or corrupt after sample 000002" in warned[0]
    assert ds.skipped_files == [f"{shard} (the rest, after sample 000002)"]


def metadata_with_bad_line(folder: Path, bad: str, line: int = 18) -> Path:
    """20 images listed in metadata.jsonl, a blank line after the first row (it still counts), ``bad`` on ``line``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(20):
        Image.new("RGB", (8, 8), (i * 10, 0, 0)).save(folder / f"{i:02d}.png")
        lines.append(json.dumps({"file_name": f"{i:02d}.png", "text": f"image {i}"}))
    lines.insert(1, "")
    lines[line - 1] = bad
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder / "metadata.jsonl"


@pytest.mark.parametrize("bad, expected", [
    ('{"file_name": "16.png", "text": "unterminated}', r"line 18: not valid JSON .*expected one JSON object"),
    ('["16.png", "a list"]', r"line 18: expected a JSON object .* got a list"),
    ('{"name": "16.png", "text": "x"}', r"line 18: needs keys 'file_name' and 'text', has \['name', 'text'\]"),
    ('{"file_name": "16.png", "text": {"en": "x"}}', r"line 18: 'text' must be a string or null, got a dict"),
])
def test_malformed_metadata_line_is_one_line_naming_file_and_line(tmp_path, bad, expected):
    meta = metadata_with_bad_line(tmp_path / "set", bad)
    for load in (lambda: FolderDataset(str(meta.parent)), lambda: read_captions(meta.parent)):
        with pytest.raises(ConfigError, match=expected) as err:
            load()
        assert str(meta) in str(err.value) and "\n" not in str(err.value)


def test_hf_imagefolder_malformed_metadata_is_one_line(tmp_path):
    meta = metadata_with_bad_line(tmp_path / "set", '{"file_name": "16.png", "text": "unterminated}')
    with pytest.raises(ConfigError, match=r"line 18: not valid JSON") as err:
        hf_dataset(str(meta.parent), cache_dir=str(tmp_path / "cache"))
    assert str(meta) in str(err.value) and "\n" not in str(err.value) and "Arrow" not in str(err.value)
    # datasets reads metadata as UTF-8 only and its error names neither file nor line: say which line is not.
    meta.write_bytes(meta.read_bytes().replace(b'"image 4"', '"image \xe94"'.encode("latin-1")))
    with pytest.raises(ConfigError, match=r"metadata.jsonl' line 6 is not UTF-8") as err:
        hf_dataset(str(meta.parent), cache_dir=str(tmp_path / "cache"))
    assert "\n" not in str(err.value)


def test_scripts_print_one_error_line_for_malformed_metadata(tmp_path, capsys):
    meta = metadata_with_bad_line(tmp_path / "set", "not json at all")
    assert load_script("contact_sheet.py").main([str(meta.parent)]) == 2
    assert load_script("prepare_dataset.py").main([str(meta.parent), "-o", str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") and "line 18" in line for line in err), err


def test_main_stops_with_one_line_for_malformed_metadata(tmp_path):
    """Through hf_dataset, where datasets used to say 'ArrowInvalid ... in row 16' (0-based, blank lines uncounted)."""
    import yaml

    from tests.conftest import main_py, write_train_yaml

    meta = metadata_with_bad_line(tmp_path / "set", '{"file_name": "16.png", "text": "unterminated}')
    yaml_path = write_train_yaml(tmp_path / "train.yaml", meta.parent)
    config = yaml.safe_load(yaml_path.read_text())
    train = config["data"]["params"]["train"]
    train["target"] = "ldm.data.hf.hf_dataset"
    train["params"] = {"name": str(meta.parent), "cache_dir": str(tmp_path / "cache"),
                       "image_transforms": train["params"]["image_transforms"]}
    yaml_path.write_text(yaml.safe_dump(config))
    r = main_py("-t", "--base", Path(__file__).resolve().parents[1] / "configs" / "tiny" / "tiny-sd.yaml",
                yaml_path, "-l", tmp_path / "logs")
    assert r.returncode == 2, r.stderr[-2000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and str(meta) in errors[0] and "line 18" in errors[0], r.stderr[-2000:]
    assert "Traceback" not in r.stderr
