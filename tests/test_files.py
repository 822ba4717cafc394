"""Our safetensors reader and writer (ldm.weights.files) against the safetensors package."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ldm.util import ConfigError
from ldm.weights.files import DTYPES, read_safetensors, write_safetensors


def mixed_tensors() -> dict[str, torch.Tensor]:
    """Every dtype both sides know, in an order neither writer uses, with a scalar, an empty tensor and odd sizes
    (so alignment padding matters)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for i, dtype in enumerate(reversed(list(DTYPES.values()))):
        x = torch.randn(3, 5 + i, generator=g) * 50
        out[f"t{i:02}.{str(dtype)[6:]}"] = x > 0 if dtype == torch.bool else x.to(dtype)
    out["a.scalar"] = torch.tensor(2.5, dtype=torch.float64)
    out["b.empty"] = torch.zeros(0, 4, dtype=torch.int16)
    out["c.noncontiguous"] = torch.arange(24, dtype=torch.float32).reshape(4, 6).t()
    return out


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
        bits = [t.contiguous().reshape(-1).view(torch.uint8) for t in (a[name], b[name])]  # bit for bit
        assert torch.equal(*bits), name


def test_our_file_is_byte_for_byte_save_files(tmp_path):
    tensors = mixed_tensors()
    ours = write_safetensors(tmp_path / "ours.safetensors", tensors, {"format": "pt"})
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors", metadata={"format": "pt"})
    assert ours.read_bytes() == (tmp_path / "theirs.safetensors").read_bytes()
    # fp16 cast tensor by tensor: the same bytes as casting the whole dict first.
    write_safetensors(tmp_path / "half.safetensors", tensors, half=True)
    save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in tensors.items()},
              tmp_path / "theirs-half.safetensors")
    assert (tmp_path / "half.safetensors").read_bytes() == (tmp_path / "theirs-half.safetensors").read_bytes()


def test_safe_open_reads_our_file_with_its_metadata(tmp_path):
    tensors = mixed_tensors()
    meta = {"sd_finetune.step": "12", "format": "pt", "note": "ünïcode, \"quoted\""}
    path = write_safetensors(tmp_path / "ours.safetensors", tensors, meta, progress=True, desc="test")
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == meta
        theirs = {name: f.get_tensor(name) for name in f.keys()}
    assert_same_tensors(theirs, tensors)


def test_we_read_save_files_output(tmp_path):
    tensors = mixed_tensors()
    meta = {"a": "1", "b": "two", "c": "{\"json\": true}"}
    save_file({k: v.contiguous() for k, v in tensors.items()}, tmp_path / "theirs.safetensors", metadata=meta)
    ours, our_meta = read_safetensors(tmp_path / "theirs.safetensors")
    assert our_meta == meta
    assert_same_tensors(ours, tensors)
    save_file({"x": torch.ones(2)}, tmp_path / "bare.safetensors")
    assert read_safetensors(tmp_path / "bare.safetensors")[1] == {}


def test_read_is_a_copy_on_write_map_of_the_file(tmp_path):
    path = write_safetensors(tmp_path / "w.safetensors", {"w": torch.arange(1024, dtype=torch.float32)})
    before = path.read_bytes()
    w = read_safetensors(path)[0]["w"]
    w += 1  # a private map: the tensor is writable, the file stays as it was
    assert w[0].item() == 1 and path.read_bytes() == before


def test_a_truncated_file_is_named_in_one_line(tmp_path):
    path = tmp_path / "theirs.safetensors"
    save_file({"w": torch.zeros(1000)}, path)
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ConfigError, match=r"is truncated: its header describes 4,\d+ bytes, the file has") as err:
        read_safetensors(cut)
    assert "\n" not in str(err.value)
    cut.write_bytes(path.read_bytes()[:20])
    with pytest.raises(ConfigError, match="is not a safetensors file .or is truncated"):
        read_safetensors(cut)


def test_a_failed_write_leaves_the_old_file_and_no_partial_one(tmp_path):
    path = write_safetensors(tmp_path / "m.safetensors", {"w": torch.ones(3)})
    before = path.read_bytes()

    # "a" is written, then "b" (a tensor without data) cannot be copied out: the write stops half-way.
    bad = {"a": torch.ones(3), "b": torch.empty(3, device="meta")}
    with pytest.raises(NotImplementedError):
        write_safetensors(path, bad)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ["m.safetensors"]
