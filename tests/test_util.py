"""The helpers every part shares: crash-safe writes (atomic_path)."""
from __future__ import annotations

import os

import pytest

from ldm.util import PARTIAL_GLOB, atomic_path


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
