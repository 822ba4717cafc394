"""Faults in data files: malformed caption files stop with one line naming the file and the line."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from ldm.data.folder import FolderDataset
from ldm.data.hf import hf_dataset
from ldm.data.prepare import read_captions
from ldm.util import ConfigError
from tests.test_prepare import load_script


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
