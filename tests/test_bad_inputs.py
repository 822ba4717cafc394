"""Every dataset type through the corpus of awkward inputs (tests/bad_inputs.py): awkward images train, broken
ones are named once and counted at the end and in report.html, captions in odd encodings are read, looping
symlinks do not hang the walk, a caption past CLIP's 77 tokens warns, and metadata.jsonl's odd rows follow one rule.
"""
from __future__ import annotations

import html
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import yaml

from ldm.data.folder import FolderDataset, find_images
from ldm.data.hf import hf_dataset
from ldm.data.images import BadImage, load_rgb
from ldm.util import ConfigError
from tests import bad_inputs as corpus
from tests.conftest import TINY_MODEL, main_py, run_dirs

FIXED = [{"target": "torchvision.transforms.Resize", "params": {"size": 16, "interpolation": 3}},
         {"target": "torchvision.transforms.CenterCrop", "params": {"size": 16}}]
SKIP_LINE = "skipping unreadable image"


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """The corpus with sidecar captions only (read-only)."""
    return corpus.write_corpus(tmp_path_factory.mktemp("corpus") / "images")


# ---- each input on its own ---------------------------------------------------------------------------------------
def test_each_awkward_image_decodes_upright_rgb_and_each_broken_one_is_refused(folder):
    for name in corpus.good_names():
        img = load_rgb(folder / name)
        assert img.mode == "RGB", name
    for name in corpus.bad_names():
        with pytest.raises(BadImage, match=re.escape(str(folder / name))):
            load_rgb(folder / name)
    assert load_rgb(folder / "exif_rotated.jpg").size == (20, 40)  # stored 40x20, shown turned
    assert load_rgb(folder / "tall.png").size == (8, 120) and load_rgb(folder / "one_pixel.png").size == (1, 1)
    ramp = np.asarray(load_rgb(folder / "gray16.png"))[..., 0]
    assert ramp.min() == 0 and ramp.max() == 255 and len(np.unique(ramp)) > 200  # scaled, not clipped white
    floats = np.asarray(load_rgb(folder / "float32.tif"))[..., 0]
    assert floats[0, 0] == 0 and floats[-1, -1] == 255
    la = np.asarray(load_rgb(folder / "gray_alpha.png"))
    assert (la[-1] == 255).all() and la[0, -1, 0] < 255  # transparent bottom half on white, opaque top kept
    with pytest.raises(BadImage, match="DecompressionBombError"):
        load_rgb(folder / "bomb.png")


def test_the_walk_does_not_follow_looping_symlinks(folder):
    start = time.monotonic()
    found = find_images(folder)
    assert time.monotonic() - start < 5
    assert sorted(p.name for p in found) == sorted(corpus.IMAGES)  # the self link once, nothing through loop/
    assert (folder / corpus.LOOP_DIR).is_symlink() and (folder / corpus.LOOP_DIR / folder.name).is_dir()


def test_captions_in_any_encoding_or_missing_are_read(folder, caplog):
    with caplog.at_level(logging.WARNING):
        ds = FolderDataset(str(folder), image_transforms=FIXED, default_caption=corpus.DEFAULT_CAPTION)
        ds = FolderDataset(str(folder), image_transforms=FIXED, default_caption=corpus.DEFAULT_CAPTION)  # again
    got = {path.name: caption for path, caption in zip(ds.files, ds.captions)}
    assert got == {name: corpus.expected_caption(name) for name in corpus.IMAGES}
    latin = [r.getMessage() for r in caplog.records if "is not UTF-8" in r.getMessage()]
    assert len(latin) == 1 and "cmyk.txt" in latin[0]  # one warning per file, not per read


def long_caption_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if "tokens but the text encoder reads" in line]


def test_a_caption_past_the_encoder_is_one_warning_naming_its_file(folder):
    from ldm.data.caption_length import long_caption_warnings
    from ldm.util import instantiate_from_config

    cond = instantiate_from_config(yaml.safe_load(TINY_MODEL.read_text())["model"]["params"]["cond_stage_config"])
    ds = FolderDataset(str(folder), image_transforms=FIXED, default_caption=corpus.DEFAULT_CAPTION)
    lines = long_caption_warnings(ds.named_captions(), cond)
    assert len(lines) == 1 and str(folder / "wide.png") in lines[0]
    assert "is 500 tokens but the text encoder reads 75" in lines[0]
    shared = long_caption_warnings([(f"img{i}.png", corpus.LONG_CAPTION) for i in range(5)], cond)
    assert len(shared) == 1 and "img0.png, img1.png, img2.png and 2 more" in shared[0]


def metadata_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]


def test_metadata_rows_for_missing_or_repeated_files_warn_once_and_first_wins(tmp_path, caplog):
    """The decision for both readers of metadata.jsonl: a row naming a file that is not there is one warning and
    ignored; a second row for one file is one warning and ignored (the first row's caption stays)."""
    root = corpus.write_corpus(tmp_path / "set")
    corpus.write_metadata(root)
    with caplog.at_level(logging.WARNING):
        folder_ds = FolderDataset(str(root), image_transforms=FIXED)
    warned = metadata_warnings(caplog)
    assert len(warned) == 2, warned
    assert any("'gone.png', which is not in" in w for w in warned)
    assert any("'bitmap.bmp' is listed again (first on line 13)" in w and "line 20" in w for w in warned)
    assert folder_ds.captions[[p.name for p in folder_ds.files].index("bitmap.bmp")] == "BMP"
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        hf = hf_dataset(str(root), image_transforms=FIXED, cache_dir=str(tmp_path / "cache"))
    warned = metadata_warnings(caplog)
    assert len(warned) == 2, warned
    assert any("gone.png, which does not exist" in w for w in warned)
    assert any("bitmap.bmp again" in w for w in warned)
    captions = {Path(name.split(" ", 1)[1]).name: caption for name, caption in
                (hf._record(i)[1:] for i in range(len(hf)))}
    assert len(hf) == len(corpus.IMAGES) and captions["bitmap.bmp"] == "BMP"


def test_a_broken_metadata_line_still_stops_with_one_line(tmp_path):
    root = corpus.write_corpus(tmp_path / "set", links=False)
    meta = corpus.write_metadata(root, broken=True)
    for load in (lambda: FolderDataset(str(root)), lambda: hf_dataset(str(root), cache_dir=str(tmp_path / "c"))):
        with pytest.raises(ConfigError, match=r"line 4: not valid JSON") as err:
            load()
        assert str(meta) in str(err.value) and "\n" not in str(err.value)


# ---- every dataset type trains through main.py -------------------------------------------------------------------
def data_section(kind: str, root: Path) -> dict:
    """The ``data`` block of one dataset type over the corpus at ``root``."""
    if kind == "folder":
        train = {"target": "ldm.data.folder.FolderDataset",
                 "params": {"root": str(root / "images"), "default_caption": corpus.DEFAULT_CAPTION}}
    elif kind == "hf_imagefolder":
        train = {"target": "ldm.data.hf.hf_dataset", "params": {"name": str(root / "images"),
                                                                "cache_dir": str(root / "hf-cache")}}
    elif kind == "dreambooth":  # the class images are the corpus too, so both sets meet every broken file
        train = {"target": "ldm.data.dreambooth.DreamBoothDataset",
                 "params": {"instance_data_dir": str(root / "images"), "instance_prompt": "a photo of sks thing",
                            "class_data_dir": str(root / "class"), "class_prompt": "a photo of a thing",
                            "num_class_images": len(corpus.IMAGES)}}
    else:
        train = {"target": "ldm.data.tar_shards.TarShards", "params": {"urls": str(root / "shard-000000.tar"),
                                                                        "shuffle_buffer": 0}}
    train["params"]["image_transforms"] = FIXED
    return {"target": "ldm.data.datamodule.DataModuleFromConfig",
            "params": {"batch_size": 3, "num_workers": 2 if kind == "folder" else 0, "train": train}}


# What each run is fed and which names its warnings must give for each broken input.
KINDS = ("folder", "hf_imagefolder", "dreambooth", "tar_shards")


def bad_file_names(kind: str, root: Path) -> dict[str, list[str]]:
    """Broken input -> the names a warning about it may use (DreamBooth meets each twice, in two folders)."""
    if kind == "tar_shards":
        shard = root / "shard-000000.tar"
        return {n: [f"{shard}:{corpus.shard_member(n)}"] for n in corpus.bad_names() if corpus.IMAGES[n][2]}
    folders = ["images", "class"] if kind == "dreambooth" else ["images"]
    return {f"{d}/{n}": [str(root / d / n)] for d in folders for n in corpus.bad_names()}


def train_through_main(kind: str, root: Path):
    corpus.write_corpus(root / "images")
    if kind == "hf_imagefolder":
        corpus.write_metadata(root / "images")
    if kind == "dreambooth":
        corpus.write_corpus(root / "class")
    if kind == "tar_shards":
        corpus.write_shard(root / "shard-000000.tar")
    config = {"data": data_section(kind, root),
              "lightning": {"trainer": {"accelerator": "cpu", "max_steps": 6, "log_every_n_steps": 1,
                                        "enable_progress_bar": False, "enable_model_summary": False},
                            "callbacks": {"image_logger": {"params": {"batch_frequency": 0}}}}}
    (root / "train.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    # 6 steps of 3 cover the 18 items once: every broken file is met.
    proc = main_py("-t", "--base", TINY_MODEL, root / "train.yaml", "-l", root / "logs", timeout=300)
    return proc, root


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    with ThreadPoolExecutor(max_workers=2) as pool:
        jobs = {kind: pool.submit(train_through_main, kind, tmp_path_factory.mktemp(kind)) for kind in KINDS}
        return {kind: job.result() for kind, job in jobs.items()}


@pytest.mark.parametrize("kind", KINDS)
def test_corpus_trains_and_each_broken_file_is_named_once(runs, kind):
    proc, root = runs[kind]
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "Traceback" not in output, output[-4000:]
    warnings = [line for line in output.splitlines() if SKIP_LINE in line]
    expected = bad_file_names(kind, root)
    for bad, names in expected.items():
        hits = [w for w in warnings if any(f"{n}:" in w or w.rstrip().endswith(n) or f"{n} " in w for n in names)]
        assert len(hits) == 1, (bad, hits)
    assert len(warnings) == len(expected), warnings
    for good in corpus.good_names():
        assert not any(good in w for w in warnings), good
    # The end-of-run summary and the report count them.
    summary = [line for line in output.splitlines() if "unreadable image(s) were skipped in the train data" in line]
    assert len(summary) == 1 and summary[0].startswith(f"{len(expected)} unreadable image(s)"), summary
    (run,) = run_dirs(root / "logs")
    page = html.unescape((run / "report.html").read_text())
    assert f"<h3>train: {len(expected)}</h3>" in page
    assert all(names[0] in page for names in expected.values())


@pytest.mark.parametrize("kind", ["folder", "hf_imagefolder"])
def test_long_caption_warns_once_in_a_run(runs, kind):
    proc, root = runs[kind]
    lines = long_caption_lines(proc.stdout + proc.stderr)
    assert len(lines) == 1 and "is 500 tokens" in lines[0], lines


def test_metadata_rows_warn_once_in_a_run(runs):
    proc, _ = runs["hf_imagefolder"]
    output = proc.stdout + proc.stderr
    assert sum("gone.png, which does not exist" in line for line in output.splitlines()) == 1
    assert sum("bitmap.bmp again" in line for line in output.splitlines()) == 1


def test_bad_inputs_figure(runs):
    """Inputs tried = each corpus file, caption file and metadata row a run was fed; a crash = a run that did not
    exit 0 or printed a traceback."""
    tried = crashes = 0
    for kind, (proc, root) in runs.items():
        fed = len(corpus.IMAGES) + len(corpus.CAPTIONS) + 1  # + the looping directory link
        fed *= 2 if kind == "dreambooth" else 1
        fed += 2 if kind == "hf_imagefolder" else 0  # the missing-file and the duplicate row
        fed -= 2 if kind == "tar_shards" else 0  # tar holds no symlinks
        tried += fed
        crashes += proc.returncode != 0 or "Traceback" in proc.stdout + proc.stderr
    print(f"bad inputs tried {tried}, crashes {crashes}")
    assert tried >= 90 and crashes == 0
