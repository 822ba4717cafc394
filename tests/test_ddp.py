"""DDP on the CPU: main.py with 2 gloo processes (Lightning re-runs main.py for rank 1).

A test-only callback (``tests.ddp_probe.Probe``, given as a ``lightning.callbacks`` block) writes one JSON per
rank: the run dir it used, gradient and weight hashes at every step, the captions it trained on and every file
it wrote inside the run dir.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, TINY_MODEL, main_env, run_dirs, write_train_yaml

STEPS = 6


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, image_folder):
    """(main.py's output, run dir, {rank: probe record}) for a 6-step, 2-process run logging images at 3 and 6."""
    tmp = tmp_path_factory.mktemp("ddp")
    probe = {"target": "tests.ddp_probe.Probe", "params": {"out_dir": str(tmp / "probe")}}
    config = write_train_yaml(tmp / "ddp.yaml", image_folder, image_every=3, callbacks={"probe": probe},
                              trainer={"max_steps": STEPS, "devices": 2, "strategy": "ddp"})
    proc = subprocess.run([sys.executable, "main.py", "-t", "--base", str(TINY_MODEL), str(config),
                           "-l", str(tmp / "logs")], cwd=REPO, env=main_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r: json.loads((tmp / "probe" / f"rank{r}.json").read_text()) for r in (0, 1)}
    runs = run_dirs(tmp / "logs")
    assert len(runs) == 1, runs  # rank 1 made no run dir of its own
    return proc.stdout + proc.stderr, runs[0], records


def test_both_ranks_train_in_the_same_run_dir(ddp):
    output, run, records = ddp
    assert [records[r]["rank"] for r in (0, 1)] == [0, 1]
    assert records[0]["pid"] != records[1]["pid"]
    for rec in records.values():
        assert rec["world_size"] == 2
        assert rec["steps"] == list(range(1, STEPS + 1))
        assert rec["run_dir"] == str(run)
        assert rec["callback_dirs"] == records[0]["callback_dirs"]
        assert rec["callback_dirs"]["RunCheckpoint"] == str(run / "checkpoints")
    assert "All distributed processes registered. Starting with 2 processes" in output
    assert "sync_dist=True" not in output  # the epoch loss is averaged over both ranks


def test_gradients_are_averaged_so_weights_stay_identical(ddp):
    _, _, records = ddp
    assert records[0]["grad_hashes"] == records[1]["grad_hashes"]
    assert records[0]["weight_hashes"] == records[1]["weight_hashes"]
    assert len(set(records[0]["weight_hashes"])) == STEPS  # the weights did change at every step
    # ...while each rank trained on its own shard of the data.
    assert records[0]["captions"] != records[1]["captions"]


def test_only_rank_zero_writes(ddp):
    _, run, records = ddp
    assert records[1]["written"] == []
    written = [entry.split(" ", 1)[1] for entry in records[0]["written"] if entry.startswith("open ")]
    images = sorted(p.relative_to(run).as_posix() for p in (run / "images" / "train").iterdir())
    assert len(images) == 6  # inputs, reconstruction, samples at steps 3 and 6
    assert sorted(w for w in written if w.startswith("images/")) == images  # each written once, by rank 0
    assert any(w.startswith("checkpoints/.last.ckpt") for w in written)
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["global_step"] == STEPS
