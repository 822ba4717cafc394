"""main.py end to end: resume (-r) through a SIGTERM, --finetune_from on a folder with broken images, one-line
errors, --help and the saved configs.

Every main.py start spends seconds importing torch, Lightning and diffusers on one core (imports are single
threaded and tests run with OMP_NUM_THREADS=1), so there are few runs, each checked by several tests, and a
``background`` worker runs one main.py at a time beside the test's own: the error cases beside the first training
run, the fine-tuning run beside the resume test.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from tests.conftest import PHOTOS, REPO, TINY_MODEL, main_env, main_py, run_dirs, write_image_folder, write_train_yaml

ROOT_KEY = "data.params.train.params.root"


def load_ckpt(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metric(run: Path, column: str) -> dict[int, float]:
    """``{step: value}`` of one metrics.csv column."""
    with open(run / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def assert_ok(proc: subprocess.CompletedProcess, code: int = 0) -> None:
    assert proc.returncode == code, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def only_run(logdir: Path) -> Path:
    runs = run_dirs(logdir)
    assert len(runs) == 1, runs
    return runs[0]


def opt_steps(ckpt: dict) -> set[float]:
    return {s["step"].item() for s in ckpt["optimizer_states"][0]["state"].values()}


@pytest.fixture(scope="module")
def background():
    with ThreadPoolExecutor(max_workers=1) as pool:
        yield pool


@pytest.fixture(scope="module")
def train_yaml(tmp_path_factory) -> Path:
    """The folder is left to a command-line override (``root: ???``), so the saved config must hold the override."""
    return write_train_yaml(tmp_path_factory.mktemp("cli") / "train.yaml")


# ---- training runs -----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def first_run(tmp_path_factory, train_yaml, image_folder, error_subprocesses) -> Path:
    """20 steps (2 epochs of 10) of the tiny model, with three overrides. Read-only: copy it to resume it.
    (``error_subprocesses`` is requested so that the error cases run beside it.)"""
    logdir = tmp_path_factory.mktemp("first")
    assert_ok(main_py("-t", "--base", TINY_MODEL, train_yaml, "-l", logdir, f"{ROOT_KEY}={image_folder}",
                      "lightning.trainer.max_steps=20", "model.params.ema_decay=0.99"))
    return only_run(logdir)


def test_first_run_writes_the_run_dir(first_run):
    assert sorted(metric(first_run, "train/loss_step")) == list(range(20))
    ckpts = sorted(p.name for p in (first_run / "checkpoints").glob("*.ckpt"))
    assert ckpts == ["epoch=000000.ckpt", "epoch=000001.ckpt", "last.ckpt"]
    assert load_ckpt(first_run / "checkpoints" / "last.ckpt")["global_step"] == 20
    images = sorted(p.name for p in (first_run / "images" / "train").iterdir())
    assert [n for n in images if n.startswith("samples")] == [
        "samples_cfg3_gs-000010_e-000000_b-000009.png", "samples_cfg3_gs-000020_e-000001_b-000009.png"]
    assert (first_run / "loss_curve.png").stat().st_size > 0


def test_saved_configs_are_the_resolved_merge(first_run, image_folder):
    configs = first_run / "configs"
    (project,) = configs.glob("*-project.yaml")
    (lightning,) = configs.glob("*-lightning.yaml")
    saved = yaml.safe_load(project.read_text())
    tiny = yaml.safe_load(TINY_MODEL.read_text())
    assert set(saved) == {"model", "data"}
    assert saved["data"]["params"]["train"]["params"]["root"] == str(image_folder)  # override of a '???'
    assert saved["model"]["params"]["ema_decay"] == 0.99  # override
    assert saved["model"]["params"]["unet_config"] == tiny["model"]["params"]["unet_config"]  # from tiny-sd.yaml
    assert saved["data"]["params"]["train"]["repeats"] == 5  # from the data YAML
    light = yaml.safe_load(lightning.read_text())["lightning"]
    assert light["trainer"]["max_steps"] == 20 and light["trainer"]["accelerator"] == "cpu"
    assert light["callbacks"]["image_logger"]["params"] == {"batch_frequency": 10, "max_images": 2, "steps": 2}
    assert "${" not in project.read_text() + lightning.read_text()


@pytest.fixture(scope="module")
def finetune_job(first_run, tmp_path_factory, train_yaml, background) -> Future:
    """--finetune_from the first run's last.ckpt with another seed, on a folder of two photos, three images in
    awkward modes and two broken files, for one epoch (7 files, batch 2: 4 steps read every file)."""
    tmp = tmp_path_factory.mktemp("finetune")
    folder = write_image_folder(tmp / "images", PHOTOS[:2])
    photo = Image.open(folder / f"{PHOTOS[0]}.png")
    photo.convert("CMYK").save(folder / "cmyk.jpg")
    rgba = photo.convert("RGBA")
    rgba.putalpha(128)
    rgba.save(folder / "rgba.png")
    Image.fromarray(np.linspace(0, 65535, 32 * 32).reshape(32, 32).astype(np.uint16)).save(folder / "gray16.png")
    photo.save(folder / "truncated.jpg", quality=95)
    data = (folder / "truncated.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.png").write_bytes(b"")

    def run() -> tuple[subprocess.CompletedProcess, Path, Path]:
        proc = main_py("-t", "--base", TINY_MODEL, train_yaml, "-l", tmp / "logs", "-s", "7",
                       "--finetune_from", first_run / "checkpoints" / "last.ckpt", f"{ROOT_KEY}={folder}",
                       "data.params.train.repeats=1", "lightning.trainer.max_steps=4",
                       "lightning.callbacks.image_logger.params.batch_frequency=0")
        assert_ok(proc)
        return proc, folder, only_run(tmp / "logs")

    return background.submit(run)


def test_resume_sigterm_and_resume_from_ckpt_file(first_run, tmp_path, finetune_job):
    """-r <run dir> from step 20 is stopped by SIGTERM at step 25 (``tests.ddp_probe.SignalAt``, as a preempting
    scheduler would); -r <its last.ckpt> goes on mid-epoch to 30. Step, optimizer, LR schedule and EMA continue.
    (``finetune_job`` is requested so that the fine-tuning run proceeds beside this one.)"""
    run = Path(shutil.copytree(first_run, tmp_path / first_run.name))
    stop = ["+lightning.callbacks.stop.target=tests.ddp_probe.SignalAt", "+lightning.callbacks.stop.params.step=25"]
    stopped = main_py("-r", run, "lightning.trainer.max_steps=30", *stop)
    assert_ok(stopped, 143)  # 128 + SIGTERM, as a shell reports a process killed by SIGTERM
    assert "SIGTERMException at global step 25" in stopped.stderr
    assert run_dirs(tmp_path) == [run]  # continued in place
    last = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 25 and last["state_dict"]["model_ema.num_updates"].item() == 25
    assert opt_steps(last) == {25.0} and last["lr_schedulers"][0]["last_epoch"] == 25
    # Warm-up is 10 steps from 1e-10: a restarted schedule would log a tiny LR again at step 20.
    assert metric(run, "lr-AdamW")[20] == pytest.approx(1e-4)
    saved = sorted((run / "configs").glob("*-lightning.yaml"))
    assert len(saved) == 2  # the resumed run adds its own configs, holding its overrides
    assert yaml.safe_load(saved[-1].read_text())["lightning"]["trainer"]["max_steps"] == 30

    assert_ok(main_py("-r", run / "checkpoints" / "last.ckpt", "lightning.callbacks.stop=null"))
    last = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 30 and last["state_dict"]["model_ema.num_updates"].item() == 30
    assert opt_steps(last) == {30.0} and last["lr_schedulers"][0]["last_epoch"] == 30
    assert sorted(metric(run, "train/loss_step")) == list(range(30))  # one history across the three runs


def test_finetune_from_loads_weights_and_starts_at_zero(first_run, finetune_job):
    proc, _, run = finetune_job.result()
    source = first_run / "checkpoints" / "last.ckpt"
    src = load_ckpt(source)["state_dict"]
    assert f"loaded {len(src)} tensors from {source}" in proc.stdout
    last = load_ckpt(run / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and sorted(metric(run, "train/loss_step")) == [0, 1, 2, 3]
    assert opt_steps(last) == {4.0}
    # The frozen autoencoder comes from the checkpoint, not from seed 7's initialisation.
    frozen = [k for k in src if k.startswith("first_stage_model.")]
    assert frozen and all(torch.equal(last["state_dict"][k], src[k]) for k in frozen)


def test_awkward_images_train_and_broken_ones_are_named_once(finetune_job):
    proc, folder, _ = finetune_job.result()
    output = proc.stdout + proc.stderr
    warnings = [line for line in output.splitlines() if "skipping unreadable image" in line]
    assert len(warnings) == 2, warnings
    for bad in ("truncated.jpg", "empty.png"):
        assert sum(str(folder / bad) in line for line in warnings) == 1
    for good in ("cmyk.jpg", "rgba.png", "gray16.png"):
        assert good not in output


# ---- errors ----------------------------------------------------------------------------------------------------
# name: (main.py arguments, words the one-line message must hold, run in a subprocess). "RUN" stands for a valid
# training command line ("-t --base tiny-sd.yaml TRAIN_YAML -l MISSING/logs"), MISSING for an empty folder. Cases that stop before torch is imported run as subprocesses, as does one that stops after the whole
# model stack is imported (a real process must print nothing else on stderr). The other late ones call main.main()
# in this process, which has imported torch and Lightning already.
ERRORS = {
    "unknown flag": (["RUN", "--bogus"], ["'--bogus'", "--help"], True),
    "missing base file": (["-t", "--base", "MISSING/nope.yaml"], ["MISSING/nope.yaml", "does not exist"], True),
    "resume path missing": (["-r", "MISSING/run"], ["MISSING/run", "does not exist"], True),
    "required key unset": (["-t", "--base", str(TINY_MODEL), str(REPO / "configs/tiny/tiny-train.yaml")],
                           [ROOT_KEY, "required"], True),
    "gpus without cuda": (["RUN", "--gpus", "0,1"], ["--gpus 0,1", "CPU", "accelerator=cpu"], True),
    "forced unknown trainer key": (["RUN", "+lightning.trainer.foo=1"], ["lightning.trainer.foo", "Trainer"], False),
    "target does not import": (["RUN", "model.params.unet_config.target=ldm.models.nope.unet"],
                               ["model.params.unet_config.target", "ldm.models.nope"], False),
    "override typo": (["RUN", "lightning.trainer.max_step=10"],
                      ["lightning.trainer.max_step'", "lightning.trainer.max_steps"], False),
    "missing data folder": (["RUN", f"{ROOT_KEY}=MISSING/nope"], ["MISSING/nope", "does not exist"], False),
    "nothing to do without -t": (["--base", str(TINY_MODEL), "TRAIN_YAML", "-l", "MISSING/logs"],
                                 ["-t", "no validation or test"], False),
}


@pytest.fixture(scope="module")
def error_args(tmp_path_factory, tiny_train_yaml):
    """``error_args(name)`` -> (the case's arguments with placeholders filled, the MISSING folder)."""
    missing = tmp_path_factory.mktemp("missing")
    run = ["-t", "--base", str(TINY_MODEL), "TRAIN_YAML", "-l", "MISSING/logs"]

    def fill(name: str) -> tuple[list[str], Path]:
        args = ERRORS[name][0]
        args = run + args[1:] if args[0] == "RUN" else args
        return [a.replace("MISSING", str(missing)).replace("TRAIN_YAML", str(tiny_train_yaml)) for a in args], missing

    return fill


@pytest.fixture(scope="module")
def error_subprocesses(background, error_args) -> dict[str, Future]:
    return {name: background.submit(main_py, *error_args(name)[0]) for name, case in ERRORS.items() if case[2]}


@pytest.mark.parametrize("name", list(ERRORS))
def test_errors_are_one_line_with_exit_code_2(name, error_args, request, monkeypatch, capsys):
    args, missing = error_args(name)
    if ERRORS[name][2]:
        proc = request.getfixturevalue("error_subprocesses")[name].result()
        code, stderr = proc.returncode, proc.stderr
    else:
        import main

        monkeypatch.chdir(REPO)
        monkeypatch.setattr(sys, "argv", ["main.py", *args])
        monkeypatch.setattr(os, "environ", main_env())  # main.py sets the run dir variable; keep it from later tests
        with pytest.raises(SystemExit) as stopped:
            main.main()
        code, stderr = stopped.value.code, capsys.readouterr().err
    lines = stderr.strip().splitlines()
    assert code == 2, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for word in ERRORS[name][1]:
        assert word.replace("MISSING", str(missing)) in lines[0]
    assert not (missing / "logs").exists()  # no run dir for a run that never started


def test_help_is_quick_and_lists_the_flags():
    start = time.monotonic()
    proc = main_py("--help", timeout=60)
    assert proc.returncode == 0 and time.monotonic() - start < 10
    for flag in ("--train", "--base", "--name", "--resume", "--finetune_from", "--logdir", "--seed", "--scale_lr",
                 "--no-test", "--debug", "--gpus", "--num_nodes", "key=value"):
        assert flag in proc.stdout
