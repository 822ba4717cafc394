"""Captions read from image folders: tolerant text encodings, and one rule shared by training and the data tools."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ldm.data.folder import FolderDataset
from ldm.data.hf import hf_dataset
from ldm.data.prepare import read_captions
from ldm.data.review import contact_sheet, summarize
from ldm.data.text_only import TextOnly
from ldm.util import ConfigError


def gray(folder: Path, name: str, value: int = 128) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (value, value, value)).save(folder / name)


def captions_of(ds: FolderDataset) -> dict[str, str]:
    return {Path(ds.files[i]).name: ds[i]["caption"] for i in range(len(ds))}


def encoding_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if "is not UTF-8" in r.getMessage()]


def test_sidecars_in_any_common_encoding_are_read_and_warned_once(tmp_path, caplog):
    for name in ("latin.png", "bom.png", "cp1252.png", "utf16.png", "plain.png"):
        gray(tmp_path, name)
    (tmp_path / "latin.txt").write_bytes("café crème, déjà vu\n".encode("latin-1"))
    (tmp_path / "bom.txt").write_bytes("\ufeffnaïve caption\n".encode("utf-8"))
    (tmp_path / "cp1252.txt").write_bytes("a \u201cquoted\u201d \u20ac price\n".encode("cp1252"))
    (tmp_path / "utf16.txt").write_text("notepad caption\n", encoding="utf-16")  # with its BOM, as Notepad saves
    (tmp_path / "plain.txt").write_text("plain ütf-8\n", encoding="utf-8")
    expected = {"bom.png": "naïve caption", "cp1252.png": "a \u201cquoted\u201d \u20ac price",
                "latin.png": "café crème, déjà vu", "plain.png": "plain ütf-8", "utf16.png": "notepad caption"}
    with caplog.at_level(logging.WARNING):
        ds = FolderDataset(str(tmp_path))
        for _epoch in range(2):
            assert captions_of(ds) == expected
        assert read_captions(tmp_path) == expected  # the tools read them the same way
    warned = encoding_warnings(caplog)
    # Only the two 8-bit files warn (a BOM says what the encoding is), each once, naming the file.
    assert len(warned) == 2, warned
    assert any("latin.txt" in w for w in warned) and any("cp1252.txt" in w for w in warned)


def test_caption_file_and_prompt_file_in_cp1252(tmp_path, caplog):
    gray(tmp_path, "a.png")
    (tmp_path / "metadata.jsonl").write_bytes(
        (json.dumps({"file_name": "a.png", "text": "the café"}, ensure_ascii=False) + "\n").encode("cp1252"))
    with caplog.at_level(logging.WARNING):
        assert FolderDataset(str(tmp_path))[0]["caption"] == "the café"
    assert len(encoding_warnings(caplog)) == 1 and "metadata.jsonl" in encoding_warnings(caplog)[0]
    (tmp_path / "prompts.txt").write_bytes("une tête\ndeux\n".encode("latin-1"))
    assert TextOnly(caption_file=str(tmp_path / "prompts.txt")).captions == ["une tête", "deux"]


@pytest.fixture
def mixed_folder(tmp_path) -> Path:
    """Every combination of a metadata.jsonl row and a sidecar; EXPECTED says what each image's caption is."""
    folder = tmp_path / "set"
    for i, name in enumerate(("a.png", "b.png", "c.png", "d.png", "e.png", "f.png")):
        gray(folder, name, 60 + 20 * i)
    rows = [{"file_name": "a.png", "text": ""},  # empty row: the sidecar is used
            {"file_name": "b.png", "text": "metadata wins"},  # non-empty row: beats its sidecar
            {"file_name": "d.png", "text": None},  # null counts as empty
            {"file_name": "e.png", "text": "   "}]  # whitespace counts as empty; no sidecar
    (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for name, text in (("a", "sidecar alpha"), ("b", "sidecar ignored"), ("c", "sidecar gamma"), ("d", "sidecar delta")):
        (folder / f"{name}.txt").write_text(text + "\n")
    return folder


EXPECTED = {"a.png": "sidecar alpha", "b.png": "metadata wins", "c.png": "sidecar gamma", "d.png": "sidecar delta",
            "e.png": "", "f.png": ""}


def test_training_and_every_tool_read_the_same_captions(mixed_folder, monkeypatch):
    from ldm.data import captioning

    assert captions_of(FolderDataset(str(mixed_folder))) == EXPECTED
    assert captions_of(FolderDataset(str(mixed_folder), default_caption="dflt")) == {
        **EXPECTED, "e.png": "dflt", "f.png": "dflt"}
    assert read_captions(mixed_folder) == EXPECTED  # prepare_dataset.py, caption.py and contact_sheet.py use this

    summary = summarize(mixed_folder)
    assert summary["captioned"] == 4
    assert dict(summary["top_words"]) == {"sidecar": 3, "alpha": 1, "metadata": 1, "wins": 1, "gamma": 1, "delta": 1}

    # caption.py captions exactly the images that have no caption (e, f), keeping the four others.
    said: list[str] = []
    monkeypatch.setattr(captioning, "load_blip", lambda *_: (_ for _ in ()).throw(ConfigError("stop here")))
    with pytest.raises(ConfigError, match="stop here"):
        captioning.caption_folder(mixed_folder, progress=False, log=said.append)
    assert said and said[0].startswith("captioning 2 of 6 images")

    # The contact sheet marks "(no caption)" in red under e and f only.
    out = contact_sheet(mixed_folder, mixed_folder.parent / "sheet.png", n=6, columns=6, thumb=64)
    sheet = np.asarray(Image.open(out).convert("RGB")).astype(int)
    cell = sheet.shape[1] // 6
    red = (sheet[..., 0] > 200) & (sheet[..., 1] < 80) & (sheet[..., 2] < 80)
    assert [bool(red[:, k * cell:(k + 1) * cell].any()) for k in range(6)] == [False] * 4 + [True] * 2


def test_hf_imagefolder_falls_back_to_sidecars_like_the_folder_dataset(mixed_folder, tmp_path):
    ds = hf_dataset(str(mixed_folder), cache_dir=str(tmp_path / "cache"))
    # datasets' imagefolder leaves out images without a metadata row (c, f); the listed ones agree with training.
    got = {Path(ds.ds[i]["image"]["path"]).name: ds[i]["caption"] for i in range(len(ds))}
    assert got == {k: v for k, v in EXPECTED.items() if k in ("a.png", "b.png", "d.png", "e.png")}
