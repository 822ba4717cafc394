"""kill -9 at any moment, during a checkpoint write too, and checkpoints that a disk or a copy broke.

The kill test trains the tiny model for 200 steps with ``last.ckpt`` written every 2 steps and kills the process
with SIGKILL (no handler runs) 10 times, in turn: while training (within a second of a checkpoint of its own), at
a random moment of its start-up (imports, building, restoring), and while a checkpoint is half written
(``tests.ddp_probe.SlowCheckpointWrites`` makes the writes slow; the test waits for the partial file). Each restart
is ``main.py -r <run dir>``; after each kill ``last.ckpt`` must read whole and hold no earlier step than before,
and the last restart must end at step 200, with no partial file left.
"""
from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.callbacks.checkpoint_io import unreadable_reason
from ldm.util import PARTIAL_GLOB
from tests.conftest import REPO, TINY_MODEL, main_env, main_py, run_dirs, write_train_yaml

MAX_STEPS, KILLS = 200, 10


def held_step(ckpt: Path) -> int:
    assert unreadable_reason(ckpt) is None, unreadable_reason(ckpt)
    return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])


def held_step_or(ckpt: Path, default: int) -> int:
    """The step ``ckpt`` holds, or ``default`` while it is being replaced (between the rename and the read)."""
    try:
        return int(torch.load(ckpt, map_location="cpu", weights_only=True)["global_step"])
    except Exception:
        return default


def start(args: list, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(REPO / "main.py"), *map(str, args)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_for(condition, timeout: float, proc: subprocess.Popen) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.02)
    return False


def kill9(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    return err


def test_kill_9_at_random_moments_never_loses_a_checkpoint(tmp_path, image_folder):
    config = write_train_yaml(tmp_path / "train.yaml", image_folder, image_every=0, trainer={"max_steps": MAX_STEPS},
                              callbacks={"slow": {"target": "tests.ddp_probe.SlowCheckpointWrites"}})
    logdir = tmp_path / "logs"
    every = ["lightning.modelcheckpoint.params.every_n_epochs=null",
             "+lightning.modelcheckpoint.params.every_n_train_steps=2"]
    rng = random.Random(15)
    began = time.monotonic()
    proc = start(["-t", "--base", TINY_MODEL, config, "-l", logdir, *every], main_env())
    # The first start runs until its first checkpoint: before that there is nothing to resume.
    assert wait_for(lambda: bool(run_dirs(logdir)) and (run_dirs(logdir)[0] / "checkpoints" / "last.ckpt").exists(),
                    240, proc), kill9(proc)[-3000:]
    to_first_checkpoint = time.monotonic() - began
    run = run_dirs(logdir)[0]
    ckpt = run / "checkpoints" / "last.ckpt"
    survived, steps, moments = 0, [held_step(ckpt)], {"start-up": 0, "training": 0, "checkpoint write": 0}
    for k in range(KILLS):
        if k % 3 == 0:  # training: once this start has written a checkpoint of its own, within a second
            wait_for(lambda: held_step_or(ckpt, steps[-1]) > steps[-1], 240, proc)
            time.sleep(rng.uniform(0.0, 1.0))
        elif k % 3 == 1:  # any moment up to when the first start wrote its first checkpoint: imports, building
            time.sleep(rng.uniform(0.0, to_first_checkpoint))
        else:  # this start writes slowly; kill it while a checkpoint is half on disk
            assert wait_for(lambda: any((run / "checkpoints").glob(PARTIAL_GLOB)), 240, proc)
        err = kill9(proc)
        assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}: {err[-3000:]}"
        moments["checkpoint write" if k % 3 == 2 else "training" if "Restored all states" in err else "start-up"] += 1
        step = held_step(ckpt)  # reads whole after every kill
        assert step >= steps[-1], f"last.ckpt went back from step {steps[-1]} to {step}"
        steps.append(step)
        survived += 1
        slow = {"SLOW_CHECKPOINT_WRITES": "0.01"} if k % 3 == 1 else {}
        proc = start(["-r", run], main_env(**slow))
    err = proc.communicate(timeout=600)[1]  # the last start runs to the end
    assert proc.returncode == 0, err[-3000:]
    assert held_step(ckpt) == MAX_STEPS
    assert not list((run / "checkpoints").glob(PARTIAL_GLOB))  # what the killed writes left was removed
    print(f"kill -9: survived {survived}/{KILLS} (killed during {moments}; steps held by last.ckpt after each "
          f"kill: {steps[1:]})")
    assert survived == KILLS and moments["checkpoint write"] == KILLS // 3 and steps[-1] < MAX_STEPS


# ---- checkpoints a disk or a copy broke ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory, image_folder) -> Path:
    """6 steps with a checkpoint every 2 (step=000002.ckpt, ... and last.ckpt). Read-only: copy it to change it."""
    tmp = tmp_path_factory.mktemp("short")
    config = write_train_yaml(tmp / "train.yaml", image_folder, image_every=0, trainer={"max_steps": 6})
    proc = main_py("-t", "--base", TINY_MODEL, config, "-l", tmp / "logs",
                   "lightning.modelcheckpoint.params.every_n_epochs=null",
                   "+lightning.modelcheckpoint.params.every_n_train_steps=2",
                   "lightning.modelcheckpoint.params.filename=\"{step:06}\"")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dirs(tmp / "logs")[0]


def copy_run(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to / run.name))


def damage(ckpt: Path, how: str) -> None:
    data = ckpt.read_bytes()
    if how == "truncated":
        ckpt.write_bytes(data[: len(data) * 2 // 3])
    elif how == "flipped byte":
        mid = len(data) // 2
        ckpt.write_bytes(data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1:])
    elif how == "empty":
        ckpt.write_bytes(b"")
    else:
        ckpt.unlink()


@pytest.mark.parametrize("how", ["truncated", "flipped byte", "empty", "missing"])
def test_a_broken_last_ckpt_is_replaced_by_the_newest_readable_checkpoint(short_run, tmp_path, capsys, how):
    from main import resolve_resume

    run = copy_run(short_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    damage(last, how)
    os.utime(run / "checkpoints" / "step=000004.ckpt", (1, 1))  # the newest readable one is step 6's
    _, ckpt, _ = resolve_resume(str(run))
    assert ckpt == run / "checkpoints" / "step=000006.ckpt"
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and f"resuming from {ckpt}" in note[0] and str(last) in note[0]


def test_a_run_with_a_truncated_last_ckpt_continues_from_the_newest_readable_one(short_run, tmp_path):
    run = copy_run(short_run, tmp_path)
    last = run / "checkpoints" / "last.ckpt"
    damage(last, "truncated")
    proc = main_py("-r", run, "lightning.trainer.max_steps=8")
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stderr.splitlines() if line.startswith("--resume:")]
    assert len(notes) == 1 and "truncated" in notes[0], proc.stderr[-2000:]
    assert held_step(last) == 8  # continued from step 6, not from 0


def resume_error(args: list[str], capsys) -> str:
    import main

    from ldm.util import run_cli

    saved = dict(os.environ)  # main.run sets the run dir for its DDP processes; later tests must not inherit it
    try:
        assert run_cli(main.run, args) == 2
    finally:
        os.environ.clear()
        os.environ.update(saved)
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_broken_checkpoint_named_on_the_command_line_is_one_line_naming_a_readable_one(short_run, tmp_path, capsys):
    run = copy_run(short_run, tmp_path)
    bad = run / "checkpoints" / "step=000006.ckpt"
    bad.write_bytes(bad.read_bytes()[:1000])
    line = resume_error(["-r", str(bad)], capsys)
    assert str(bad) in line and "truncated" in line and "the newest readable checkpoint of the run is" in line


def test_resuming_into_another_architecture_is_one_line(short_run, tmp_path, capsys):
    run = copy_run(short_run, tmp_path)
    line = resume_error(["-r", str(run), "model.params.unet_config.params.config.layers_per_block=2"], capsys)
    assert "does not fit this model" in line and "last.ckpt" in line


def test_no_readable_checkpoint_at_all_is_one_line(short_run, tmp_path, capsys):
    run = copy_run(short_run, tmp_path)
    for ckpt in (run / "checkpoints").glob("*.ckpt"):
        ckpt.write_bytes(b"not a checkpoint")
    assert "no other readable checkpoint" in resume_error(["-r", str(run)], capsys)


# ---- a full disk -----------------------------------------------------------------------------------------------------
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    from ldm.callbacks.checkpoint_io import AtomicCheckpointIO, DiskFullError, _WriteErrors

    io = AtomicCheckpointIO()
    path = tmp_path / "last.ckpt"
    io.save_checkpoint({"global_step": 1}, path)

    class FillsUp:  # the file on a disk with 200 bytes left
        def __init__(self, f):
            self.f, self.written = f, 0

        def write(self, data):
            self.written += len(data)
            if self.written > 200:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.f.write(data)

        def flush(self):
            self.f.flush()

    wrap = _WriteErrors.__init__
    monkeypatch.setattr(_WriteErrors, "__init__", lambda self, f: wrap(self, FillsUp(f)))
    with pytest.raises(DiskFullError) as err:
        io.save_checkpoint({"global_step": 2, "w": torch.ones(1000)}, path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and "MiB free" in message and "intact" in message
    assert os.listdir(tmp_path) == ["last.ckpt"]  # no partial file
    assert io.load_checkpoint(path)["global_step"] == 1


@pytest.fixture
def small_disk(tmp_path):
    """A 50 MiB tmpfs: a tiny model's checkpoint is ~20 MB and its first save writes two (the periodic file and
    last.ckpt); the next save's new file does not fit beside them."""
    mount = tmp_path / "run" / "checkpoints"
    mount.mkdir(parents=True)
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=50m", "tmpfs", str(mount)], capture_output=True, text=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({made.stderr.strip() or 'mount failed'}); the writer's "
                    "ENOSPC handling is tested without one above")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_run_on_a_full_disk_stops_with_one_line_and_resumes_once_there_is_room(small_disk, image_folder, tmp_path):
    run = small_disk.parent
    config = write_train_yaml(tmp_path / "train.yaml", image_folder, image_every=0, trainer={"max_steps": 6})
    proc = main_py("-t", "--base", TINY_MODEL, config, "lightning.modelcheckpoint.params.every_n_epochs=null",
                   "+lightning.modelcheckpoint.params.every_n_train_steps=2",
                   env=main_env(SD_FINETUNE_RUN_DIR=str(run)))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and f"writing {small_disk}/" in errors[0], errors
    assert "Traceback" not in proc.stderr
    assert held_step(small_disk / "last.ckpt") == 2  # the checkpoint before the full disk, whole
    assert not list(small_disk.glob(PARTIAL_GLOB))
    subprocess.run(["mount", "-o", "remount,size=100m", str(small_disk)], check=True)  # the user made room
    proc = main_py("-r", run)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert held_step(small_disk / "last.ckpt") == 6


def test_a_nan_loss_through_main_py_is_one_line(tmp_path, image_folder):
    config = write_train_yaml(tmp_path / "train.yaml", image_folder, image_every=0, trainer={"max_steps": 4})
    proc = main_py("-t", "--base", TINY_MODEL, config, "-l", tmp_path / "logs", "model.base_learning_rate=1e30")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: loss became nan at global step 1; last good checkpoint is none written yet"]
