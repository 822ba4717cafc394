"""The helpers every part shares: crash-safe writes (atomic_path), a script's exit code (run_cli), plain configs
(to_container) and picture grids (image_grid)."""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image

from ldm.config import to_container
from ldm.outputs import image_grid
from ldm.util import PARTIAL_GLOB, ConfigError, atomic_path, run_cli


# ---- atomic_path --------------------------------------------------------------------------------------------------
def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            assert tmp.parent == tmp_path and tmp.name.startswith(".")
            assert list(tmp_path.glob(PARTIAL_GLOB)) == [tmp]  # what cleanups of killed writes look for
            raise RuntimeError("disk full")
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out.txt"]
    with pytest.raises(KeyboardInterrupt):  # Ctrl-C mid-write too
        with atomic_path(target) as tmp:
            tmp.write_text("x")
            raise KeyboardInterrupt
    assert target.read_text() == "old" and sorted(os.listdir(tmp_path)) == ["out.txt"]
    for durable in (False, True):
        with atomic_path(target, durable=durable) as tmp:
            tmp.write_text(f"new {durable}")
            assert target.read_text() != f"new {durable}"  # not visible before the block ends
        assert target.read_text() == f"new {durable}" and sorted(os.listdir(tmp_path)) == ["out.txt"]


def test_atomic_path_names_differ_between_writers(tmp_path):
    with atomic_path(tmp_path / "a") as one, atomic_path(tmp_path / "a") as two:
        one.write_text("1")
        two.write_text("2")
        assert one != two
    assert (tmp_path / "a").read_text() == "1" and os.listdir(tmp_path) == ["a"]  # the last to finish wins


# ---- run_cli ------------------------------------------------------------------------------------------------------
def fail(error: BaseException):
    raise error


def test_run_cli_exit_codes(capsys):
    assert run_cli(lambda: None) == 0
    assert run_cli(lambda: [1, 2]) == 0  # what an action returns is only an exit code when it is an int
    assert run_cli(lambda: True) == 0
    assert run_cli(lambda code: code, 143) == 143
    assert capsys.readouterr().err == ""
    assert run_cli(fail, ConfigError("--ddim_steps must be at least 1")) == 2
    assert capsys.readouterr().err == "error: --ddim_steps must be at least 1\n"
    assert run_cli(fail, OSError("cannot decode image x.png"), errors=(OSError,)) == 2
    assert capsys.readouterr().err == "error: cannot decode image x.png\n"
    with pytest.raises(OSError):  # only the errors a script names are the user's
        run_cli(fail, OSError("disk full"))
    assert run_cli(fail, KeyboardInterrupt(), interrupted="interrupted; run it again to continue") == 130
    assert capsys.readouterr().err == "interrupted; run it again to continue\n"
    with pytest.raises(KeyboardInterrupt):
        run_cli(fail, KeyboardInterrupt())


# ---- to_container -------------------------------------------------------------------------------------------------
def test_to_container_resolves_omegaconf_and_passes_the_rest():
    cfg = OmegaConf.create({"size": 256, "crop": "${size}", "steps": [{"target": "a.B", "params": {"n": "${size}"}}]})
    plain = to_container(cfg)
    assert plain == {"size": 256, "crop": 256, "steps": [{"target": "a.B", "params": {"n": 256}}]}
    assert type(plain) is dict and type(plain["steps"]) is list and type(plain["steps"][0]) is dict
    assert to_container(cfg.steps) == [{"target": "a.B", "params": {"n": 256}}]
    same = {"a": 1}
    assert to_container(same) is same and to_container(None) is None and to_container([1]) == [1]


# ---- image_grid ---------------------------------------------------------------------------------------------------
def samples(n=5, c=3, h=8, w=8, seed=0) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed)) * 1.5  # beyond [-1, 1] too


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def test_grid_is_torchvisions_make_grid_in_white():
    x = samples(5, 3, 12, 10)
    reference = torchvision.utils.make_grid(to_uint8(x), nrow=3, padding=2, pad_value=255).permute(1, 2, 0).numpy()
    grid = image_grid(x, 3)
    assert grid.mode == "RGB" and grid.size == (2 + 3 * (10 + 2), 2 + 2 * (12 + 2))
    assert np.array_equal(np.asarray(grid), reference)
    assert (np.asarray(grid)[:2] == 255).all()  # padding is white
    # The same pictures as uint8 HxWxC arrays or PIL images make the same grid.
    arrays = [a for a in to_uint8(x).permute(0, 2, 3, 1).numpy()]
    assert np.array_equal(np.asarray(image_grid(arrays, 3)), reference)
    assert np.array_equal(np.asarray(image_grid([Image.fromarray(a) for a in arrays], 3)), reference)


def test_gray_samples_become_a_gray_rgb_grid():
    x = samples(4, 1)
    grid = np.asarray(image_grid(x, 2))
    assert grid.shape == (2 + 2 * 10, 2 + 2 * 10, 3)
    assert (grid[..., 0] == grid[..., 1]).all() and (grid[..., 1] == grid[..., 2]).all()
    gray = [a[..., 0] for a in to_uint8(x).permute(0, 2, 3, 1).numpy()]
    assert np.array_equal(np.asarray(image_grid(gray, 2)), grid)  # HxW arrays too
    assert np.asarray(image_grid(x[:1], 1)).shape == (8, 8, 3)  # a lone gray tile


def test_zoom_enlarges_tiles_without_smoothing():
    x = samples(6, 1, 8, 8)
    # zoom k with padding k is the padding-1 grid enlarged k times (how the digits grids were made).
    small = image_grid(x, 3, padding=1)
    expected = small.resize((small.width * 4, small.height * 4), Image.Resampling.NEAREST)
    assert np.array_equal(np.asarray(image_grid(x, 3, padding=4, zoom=4)), np.asarray(expected))
    # min_tile: as many whole times as fit; tiles already that big stay as they are.
    assert image_grid(x, 3, min_tile=64).size == (2 + 3 * (64 + 2), 2 + 2 * (64 + 2))
    assert image_grid(x, 3, min_tile=60).size == (2 + 3 * (56 + 2), 2 + 2 * (56 + 2))
    assert image_grid(samples(2, 3, 64, 48), 2, min_tile=64).size == (2 + 2 * (48 + 2), 2 + 64 + 2)
    tile = np.asarray(image_grid(x[:2], 2, padding=0, zoom=3))[:3, :3]
    assert (tile == tile[0, 0]).all()  # one source pixel became a 3x3 block
