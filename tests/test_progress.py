"""A main.py run that knows its progress: GIFs and strips per prompt growing from step 0 (and across a resume),
per-timestep validation loss in metrics.csv, and scores.json with best.ckpt."""
from __future__ import annotations

import csv
import json

import yaml
from PIL import Image

from tests.conftest import TINY_MODEL, main_py, run_dirs, write_train_yaml


def test_progress_frames_val_loss_per_timestep_and_best_checkpoint(tmp_path, image_folder):
    progress = {"progress": {"params": {"every_n_steps": 5, "prompts": ["a cat", "a red car"], "steps": 2}}}
    config = write_train_yaml(tmp_path / "run.yaml", image_folder, callbacks=progress,
                              trainer={"max_steps": 10, "val_check_interval": 5, "check_val_every_n_epoch": None})
    cfg = yaml.safe_load(config.read_text())
    cfg["data"]["params"]["validation"] = cfg["data"]["params"]["train"] | {"repeats": 1}
    config.write_text(yaml.safe_dump(cfg))
    proc = main_py("-t", "--base", TINY_MODEL, config, "-l", tmp_path / "logs")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    (run,) = run_dirs(tmp_path / "logs")
    names = json.loads((run / "progress" / "prompts.json").read_text())
    assert sorted(names.values()) == ["a cat", "a red car"]
    for name in names:
        frames = sorted(p.name for p in (run / "progress" / "frames" / name).iterdir())
        assert frames == ["step-000000.png", "step-000005.png", "step-000010.png"]  # before the first step, then every 5
        with Image.open(run / "progress" / f"{name}.gif") as gif:
            assert gif.n_frames == 3
        with Image.open(run / "progress" / f"{name}_strip.png") as strip, \
                Image.open(run / "progress" / "frames" / name / "step-000000.png") as frame:
            assert strip.size == (3 * frame.width, frame.height)
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    per_t = sorted(k for k in rows[0] if k.startswith("val/loss_t"))
    assert per_t == ["val/loss_t0100", "val/loss_t0300", "val/loss_t0500", "val/loss_t0700", "val/loss_t0900"]
    vals = [r for r in rows if r["val/loss"]]
    assert len(vals) == 2
    mean = sum(float(vals[0][k]) for k in per_t) / len(per_t)
    assert abs(mean - float(vals[0]["val/loss"])) < 1e-5  # val/loss is the mean over the fixed timesteps
    scores = json.loads((run / "checkpoints" / "scores.json").read_text())
    assert [v["step"] for v in scores["validations"]] == [5, 10]

    resumed = main_py("-r", run, "lightning.trainer.max_steps=15")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    name = next(iter(names))
    frames = sorted(p.name for p in (run / "progress" / "frames" / name).iterdir())
    assert frames[-1] == "step-000015.png" and len(frames) == 4  # the resumed run adds to the same GIF
    with Image.open(run / "progress" / f"{name}.gif") as gif:
        assert gif.n_frames == 4
