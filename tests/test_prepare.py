"""Dataset preparation as a new user runs it: prepare_dataset.py on a folder of every awkward format plus broken files,
caption.py with a tiny random BLIP saved in the test, contact_sheet.py, then main.py training on the result through
both hf_dataset and the folder dataset."""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import pytest
import yaml
from PIL import Image

from ldm.data import prepare as prep
from ldm.data.hf import hf_dataset
from ldm.data.prepare import Settings, prepare, read_captions
from ldm.data.review import contact_sheet, pick, wrap
from tests.conftest import REPO, TINY_MODEL, main_env, main_py, run_dirs
from tests.test_data import photo, write_awkward_images

BAD = ("truncated.jpg", "empty.png", "text.png")
SETTINGS = ["--size", "32", "--crop", "--min-size", "16"]
GOOD = 10  # 7 awkward images + la.png, rocket.bmp, chelsea.tiff; rocket_copy.tiff is a duplicate, tiny.png too small
WORDS = "a an the photo picture of cat dog rocket coffee cup woman space red blue green on with table sky".split()


def script(name: str, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], env=env or main_env(),
                          capture_output=True, text=True, timeout=120)


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), REPO / "scripts" / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def snapshot(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {p.relative_to(folder).as_posix(): (p.stat().st_mtime_ns, p.read_bytes())
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    """The awkward modes and broken files of test_data, plus LA, BMP, TIFF, an exact duplicate in another container,
    a too-small image and a source caption."""
    root = tmp_path_factory.mktemp("raw")
    write_awkward_images(root)
    la = photo("coffee").convert("LA")
    la.putalpha(128)
    la.save(root / "la.png")
    (root / "la.txt").write_text("a cup of coffee, half transparent\n")
    photo("rocket").save(root / "rocket.bmp")
    photo("rocket").save(root / "rocket_copy.tiff")  # same pixels as rocket.bmp
    photo("chelsea").save(root / "chelsea.tiff", compression="tiff_lzw")
    Image.new("RGB", (8, 8), (1, 2, 3)).save(root / "tiny.png")
    return root


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("prepared") / "set"
    proc = script("prepare_dataset.py", raw, "-o", out, *SETTINGS, "--sidecars", "-q")
    assert proc.returncode == 0, proc.stderr
    return out, proc


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A random BLIP a few hundred kB big, with a BERT tokenizer over a 26-entry vocabulary, saved like a Hub copy."""
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipImageProcessor, BlipProcessor

    folder = tmp_path_factory.mktemp("blip")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "[DEC]", *WORDS]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizer(str(folder / "vocab.txt"), bos_token="[DEC]")  # BLIP starts captions with [DEC]
    BlipProcessor(BlipImageProcessor(size={"height": 32, "width": 32}), tokenizer).save_pretrained(folder)
    config = BlipConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, encoder_hidden_size=32, max_position_embeddings=32,
                         pad_token_id=0, sep_token_id=3, eos_token_id=3, bos_token_id=vocab.index("[DEC]")),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=32)
    torch.manual_seed(0)
    BlipForConditionalGeneration(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def captioned(prepared, tiny_blip, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    folder = tmp_path_factory.mktemp("captioned") / "set"
    shutil.copytree(prepared[0], folder)
    proc = script("caption.py", folder, "--model", tiny_blip, "--prefix", "a photo, ", "--batch-size", "4",
                  "--num-beams", "1", "--min-new-tokens", "3", "--max-new-tokens", "6", "-q")
    assert proc.returncode == 0, proc.stderr
    return folder, proc


def test_prepare_writes_rgb_jpegs_and_lists_bad_files_once(raw, prepared, tmp_path):
    out, proc = prepared
    jpegs = sorted(out.glob("*.jpg"))
    assert len(jpegs) == GOOD
    for path in jpegs:
        with Image.open(path) as img:
            assert (img.format, img.mode, img.size) == ("JPEG", "RGB", (32, 32))
    rows = [json.loads(line) for line in (out / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == [p.name for p in jpegs]
    assert {r["text"] for r in rows} == {"", "a cup of coffee, half transparent"}  # the source's sidecar carried over
    assert all(p.with_suffix(".txt").is_file() for p in jpegs)
    output = proc.stdout + proc.stderr
    for bad in (*BAD, "tiny.png"):
        assert output.count(str(raw / bad)) == 1, (bad, output)
    assert "empty file" in output and "truncated" in output and "short side under 16" in output
    assert f"duplicate removed: {raw / 'rocket_copy.tiff'}" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["sources"] == {"found": 15, "written": GOOD, "skipped": 4, "duplicates_removed": 1}
    assert summary["image_sizes"]["most_common"] == [["32x32", GOOD]]
    loaded = datasets.load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(tmp_path / "hf"))
    assert len(loaded) == GOOD and set(loaded.column_names) == {"image", "text"}


def test_without_resize_modes_are_converted_upright_on_white(raw, tmp_path):
    manifest = prepare([raw], tmp_path / "out", Settings(quality=100), workers=2, progress=False)
    by_source = {Path(src).name: rec for src, rec in manifest["sources"].items()}

    def image(name: str) -> np.ndarray:
        return np.asarray(Image.open(tmp_path / "out" / by_source[name]["file_name"])).astype(int)

    rotated = image("exif_rotated.jpg")  # stored 80x40 with a red corner; EXIF says rotate 90 degrees clockwise
    assert rotated.shape == (80, 40, 3) and rotated[2, -3, 0] > 200 and rotated[2, -3, 1:].max() < 60
    assert image("rgba.png")[-5:, -5:].min() > 245  # transparent -> white, not black
    assert image("gray16.png")[-1].mean() > 200 and image("gray16.png")[0].mean() < 50  # 16-bit ramp kept
    assert by_source["chelsea.webp"]["status"] == "ok" and by_source["la.png"]["status"] == "ok"
    assert [r["status"] for n, r in sorted(by_source.items()) if n in BAD] == ["unreadable"] * 3


def test_rerun_does_nothing_and_resumes_to_the_fresh_result(raw, prepared, tmp_path, monkeypatch):
    out = tmp_path / "set"
    shutil.copytree(prepared[0], out)
    fresh = snapshot(out)
    calls = []
    real_convert = prep.convert
    monkeypatch.setattr(prep, "convert", lambda path, settings: calls.append(Path(path).name) or real_convert(path, settings))
    settings = Settings(size=32, crop=True, min_size=16)
    prepare([raw], out, settings, sidecars=True, progress=False)
    assert calls == [] and snapshot(out) == fresh  # not one file touched, not even its mtime
    # An interrupted run: one JPEG missing, half the manifest lost; and a new input folder with a new picture.
    lost = next(out.glob("anim-*.jpg"))  # anim.gif stays in the manifest below: remembered, but its output is gone
    lost.unlink()
    manifest = json.loads((out / prep.MANIFEST).read_text())
    forgotten = [Path(src).name for src in list(manifest["sources"])[7:]]
    manifest["sources"] = dict(list(manifest["sources"].items())[:7])
    (out / prep.MANIFEST).write_text(json.dumps(manifest))
    more = tmp_path / "more"
    more.mkdir()
    photo("astronaut").rotate(90).save(more / "new.png")
    prepare([raw, more], out, settings, sidecars=True, progress=False)
    assert sorted(calls) == sorted([*forgotten, "anim.gif", "new.png"])
    assert lost.read_bytes() == fresh[lost.name][1]
    assert len(list(out.glob("new-*.jpg"))) == 1 and len(read_captions(out)) == GOOD + 1
    prepare([raw], out, settings, sidecars=True, progress=False)  # the extra input is gone again
    assert {k: v[1] for k, v in snapshot(out).items()} == {k: v[1] for k, v in fresh.items()}
    calls.clear()
    prepare([raw], out, Settings(size=32, crop=True, min_size=16, quality=80), progress=False)
    assert len(calls) == 15 and len(list(out.glob("*.jpg"))) == GOOD  # new settings: all converted, same names


def test_caption_with_tiny_blip_then_a_second_run_does_nothing(captioned, tiny_blip, monkeypatch, capsys):
    folder, proc = captioned
    assert f"{GOOD} images: {GOOD - 1} captioned now, 1 already had a caption" in proc.stdout
    captions = read_captions(folder)
    assert captions[next(n for n in captions if n.startswith("la-"))] == "a cup of coffee, half transparent"
    new = [text for name, text in captions.items() if not name.startswith("la-")]
    assert len(new) == GOOD - 1 and all(text.startswith("a photo, ") for text in new)
    assert all(len(text.split()) >= 3 and set(text.split()[2:]) <= set(WORDS) for text in new)
    for name, text in captions.items():  # the sidecars prepare wrote follow the new captions
        assert (folder / name).with_suffix(".txt").read_text() == text + "\n"
    assert json.loads((folder / "summary.json").read_text())["captioned"] == GOOD
    before = snapshot(folder)
    monkeypatch.setattr("ldm.data.captioning.load_blip", lambda *_: pytest.fail("BLIP loaded with nothing to do"))
    assert load_script("caption.py").main([str(folder), "--model", str(tiny_blip), "--prefix", "a photo, "]) == 0
    assert f"0 captioned now, {GOOD} already had a caption" in capsys.readouterr().out
    assert snapshot(folder) == before


def test_caption_overwrite_replaces_and_hub_id_offline_is_one_line(prepared, tiny_blip, tmp_path):
    from ldm.data.captioning import caption_folder

    folder = tmp_path / "set"
    shutil.copytree(prepared[0], folder)
    result = caption_folder(folder, str(tiny_blip), overwrite=True, suffix=".", num_beams=1, min_new_tokens=2,
                            progress=False, log=lambda _: None)
    assert result["captioned"] == GOOD and all(t.endswith(".") for t in read_captions(folder).values())
    proc = script("caption.py", prepared[0], "-q")  # the default Hub id, with HF_HUB_OFFLINE=1
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Salesforce/blip-image-captioning-base" in errors[0] and "--model" in errors[0]


def test_contact_sheet_shows_images_with_captions(captioned, capsys):
    folder, _ = captioned
    args = [str(folder), "-n", "6", "--columns", "3", "--thumb", "64", "--font-size", "12"]
    assert load_script("contact_sheet.py").main(args) == 0
    sheet, stdout = folder / ".preview" / "contact_sheet.png", capsys.readouterr().out
    assert str(sheet) in stdout and "most frequent caption words: " in stdout
    assert "photo" in dict(json.loads((folder / "summary.json").read_text())["top_words"])
    img = np.asarray(Image.open(sheet).convert("L"))
    line_h, pad = round(12 * 1.3), 8
    cell_w, cell_h = 64 + 2 * pad, 64 + 3 * pad + line_h * 5
    assert img.shape == (2 * cell_h, 3 * cell_w)
    for row in range(2):
        for col in range(3):
            x, y = col * cell_w + pad, row * cell_h + pad
            assert img[y:y + 64, x:x + 64].std() > 10  # a picture
            text = img[y + 64 + pad + line_h:y + 64 + pad + 3 * line_h, x:x + 64]
            assert (text < 100).sum() > 20  # dark caption text under it


def test_sheet_helpers_wrap_and_pick():
    from PIL import ImageFont

    font = ImageFont.load_default(size=12)
    lines = wrap("a very long caption " + "x" * 80, font, 60)
    assert all(font.getlength(line) <= 60 for line in lines) and len(lines) > 3
    assert "".join(lines).replace(" ", "") == "averylongcaption" + "x" * 80
    files = [Path(f"{i}.jpg") for i in range(10)]
    assert pick(files, 3, None) == [files[0], files[4], files[9]]  # first, middle, last
    assert pick(files, 4, seed=1) == pick(files, 4, seed=1) and len(pick(files, 20, None)) == 10


def test_trains_with_main_through_hf_dataset_and_folder(captioned, tmp_path):
    folder, _ = captioned
    contact_sheet(folder, n=4, thumb=32)  # a PNG in the hidden .preview folder must not become a training image
    assert len(hf_dataset(str(folder), cache_dir=str(tmp_path / "cache"))) == GOOD
    train = yaml.safe_load((REPO / "configs" / "tiny" / "tiny-train.yaml").read_text())
    block = train["data"]["params"]["train"]
    block["target"], block["params"]["name"] = "ldm.data.hf.hf_dataset", str(folder)
    del block["params"]["root"]
    (tmp_path / "hf.yaml").write_text(yaml.safe_dump(train))
    steps = ["lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.batch_frequency=0"]
    env = main_env(HF_DATASETS_CACHE=str(tmp_path / "cache"))
    jobs = {
        "hf": ("-t", "--base", TINY_MODEL, tmp_path / "hf.yaml", "-l", tmp_path / "hf", *steps),
        "folder": ("-t", "--base", TINY_MODEL, REPO / "configs" / "tiny" / "tiny-train.yaml", "-l", tmp_path / "folder",
                   f"data.params.train.params.root={folder}", *steps),
    }
    with ThreadPoolExecutor(2) as pool:
        procs = dict(zip(jobs, pool.map(lambda args: main_py(*args, env=env), jobs.values())))
    for kind, proc in procs.items():
        assert proc.returncode == 0, (kind, proc.stderr[-3000:])
        assert "skipping unreadable image" not in proc.stderr
        (run,) = run_dirs(tmp_path / kind)
        assert (run / "checkpoints" / "last.ckpt").is_file()


def test_help_reads_like_documentation_and_errors_are_one_line(tmp_path, capsys):
    for name, words in {"prepare_dataset.py": ["--size", "--crop", "--resample", "--min-size", "duplicates", "resume"],
                        "caption.py": ["--model", "--prefix", "--overwrite", "hf download", "HF_HUB_OFFLINE"],
                        "contact_sheet.py": ["-n N", "--seed", ".preview", "summary.json"]}.items():
        text = load_script(name).build_parser().format_help()
        assert all(w in text for w in words), (name, [w for w in words if w not in text])
    from ldm.data.captioning import DEFAULT_MODEL

    assert load_script("caption.py").DEFAULT_MODEL == DEFAULT_MODEL
    assert load_script("prepare_dataset.py").main([str(tmp_path / "nope"), "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err and "does not exist" in err
