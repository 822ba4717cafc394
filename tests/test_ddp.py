"""DDP on the CPU: main.py with 2 gloo processes (Lightning re-runs main.py for rank 1).

A test-only callback (``tests.ddp_probe.Probe``, given as a ``lightning.callbacks`` block) writes one JSON per
rank: the run dir it used, gradient and weight hashes at every step, the captions it trained on and every file
it wrote inside the run dir.
"""
from __future__ import annotations

import json
import os
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


@pytest.mark.parametrize("victim", ["rank 1", "rank 0"])
def test_a_killed_rank_stops_the_others_with_one_line_and_the_run_resumes(tmp_path, image_folder, victim):
    """kill -9 of one process of a 2-process run once it has written a checkpoint: the other stops within 30 s with
    one ``error: DDP: ...`` line (rank 0 names the rank that died) and no traceback; last.ckpt reads whole and -r
    continues with both processes."""
    import signal
    import time

    from ldm.callbacks.checkpoint_io import unreadable_reason

    config = write_train_yaml(tmp_path / "ddp.yaml", image_folder, image_every=0,
                              trainer={"max_steps": 400, "devices": 2, "strategy": "ddp"})
    every = ["lightning.modelcheckpoint.params.every_n_epochs=null",
             "+lightning.modelcheckpoint.params.every_n_train_steps=2"]
    main = subprocess.Popen([sys.executable, "main.py", "-t", "--base", str(TINY_MODEL), str(config),
                             "-l", str(tmp_path / "logs"), *every], cwd=REPO, env=main_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        end = time.monotonic() + 300
        while not list((tmp_path / "logs").glob("*/checkpoints/last.ckpt")) and time.monotonic() < end:
            assert main.poll() is None, main.communicate()[1][-3000:]
            time.sleep(0.2)
        children = subprocess.run(["pgrep", "-P", str(main.pid), "-f", "main.py"], capture_output=True, text=True)
        child = int(children.stdout.split()[0])
        killed, survivor = (child, main.pid) if victim == "rank 1" else (main.pid, child)
        os.kill(killed, signal.SIGKILL)
        stopped = time.monotonic()
        # The child writes to the same stderr pipe, so this returns once both processes have ended.
        err = main.communicate(timeout=60)[1]
        assert not os.path.exists(f"/proc/{survivor}") or open(f"/proc/{survivor}/stat").read().split()[2] == "Z"
        assert main.returncode == (1 if victim == "rank 1" else -signal.SIGKILL)
        took = time.monotonic() - stopped
    finally:
        if main.poll() is None:
            main.kill()
    lines = [line for line in err.splitlines() if line.startswith("error: DDP:")]
    expected = f"error: DDP: rank 1 (pid {child}) killed by SIGKILL" if victim == "rank 1" else \
        "error: DDP: rank 1 lost the other processes"
    assert len(lines) == 1 and lines[0].startswith(expected), err[-3000:]
    assert "Traceback" not in err
    assert took < 30
    print(f"DDP {victim} killed: the other process stopped in {took:.1f} s")
    run = run_dirs(tmp_path / "logs")[0]
    last = run / "checkpoints" / "last.ckpt"
    assert unreadable_reason(last) is None
    held = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    proc = subprocess.run([sys.executable, "main.py", "-r", str(run), f"lightning.trainer.max_steps={held + 2}"],
                          cwd=REPO, env=main_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == held + 2
