"""A run stopped anywhere and resumed trains on exactly the batches, crops, flips, caption dropouts and noise of a
run that was never stopped, so its final weights are bit-identical (on the CPU).

Four main.py runs of the tiny model on four photos with random crops and flips, 10% caption dropout and EMA
(batch 2, 2 repeats: 4 steps an epoch, 8 steps in all): straight through (with 2 data-loading workers); stopped by
``max_steps`` in the middle of the first epoch and resumed with ``-r``; resumed from the checkpoint written at the end
of the first epoch (Lightning's end-of-epoch hooks), as a step-limited and as an epoch-limited run with 2 workers;
resumed from periodic checkpoints (``every_n_train_steps: 2``) in the middle and after the last step of the first
epoch. Each step's images, captions and loss are logged (``tests.ddp_probe.BatchLog``).
"""
from __future__ import annotations

import json
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
import yaml

from ldm.data.resume import EpochOrder, SeededItems, item_seed
from tests.conftest import TINY_MODEL, main_py, run_dirs, write_train_yaml

STEPS = 8  # two epochs of four batches


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"


def steps(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def weights(run: Path, name: str = "last.ckpt") -> dict:
    return torch.load(run / "checkpoints" / name, map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, image_folder) -> dict[str, tuple[Path, Path]]:
    """{name: (run dir, step log)} of the four runs, all finished at step 8."""
    tmp = tmp_path_factory.mktemp("resume")
    config = write_train_yaml(tmp / "train.yaml", image_folder, batch_size=2, repeats=2, image_every=0,
                              trainer={"max_steps": STEPS},
                              callbacks={"checkpoint_steps": {"target": "pytorch_lightning.callbacks.ModelCheckpoint",
                                                              "params": {"dirpath": None, "filename": "{step:03}",
                                                                         "every_n_train_steps": 2,
                                                                         "save_top_k": -1}}})
    spec = yaml.safe_load(config.read_text())
    spec["data"]["params"]["train"]["params"]["image_transforms"] = [
        {"target": "torchvision.transforms.Resize", "params": {"size": 20}},
        {"target": "torchvision.transforms.RandomCrop", "params": {"size": 16}},
        {"target": "torchvision.transforms.RandomHorizontalFlip"}]
    config.write_text(yaml.safe_dump(spec))

    def start(name: str, *extra: str) -> tuple[Path, Path]:
        log = tmp / f"{name}.jsonl"
        assert_ok(main_py("-t", "--base", TINY_MODEL, config, "-l", tmp / name, *extra,
                          "+lightning.callbacks.batch_log.target=tests.ddp_probe.BatchLog",
                          f"+lightning.callbacks.batch_log.params.path={log}"))
        return run_dirs(tmp / name)[0], log

    with ThreadPoolExecutor(2) as pool:
        straight = pool.submit(start, "straight", "data.params.num_workers=2")
        stopped = pool.submit(start, "stopped", "lightning.trainer.max_steps=3")
        straight, (stopped, stopped_log) = straight.result(), stopped.result()
    resumed = {"max_steps": (stopped, stopped_log)}
    # The same first half as the straight run, continued from two of its checkpoints.
    for name, ckpt in (("epoch_end", "epoch=000000.ckpt"), ("periodic", "step=002.ckpt"),
                       ("periodic_last_batch", "step=004.ckpt"), ("epochs_workers", "epoch=000000.ckpt")):
        run = Path(shutil.copytree(straight[0], tmp / name / straight[0].name))
        done = int(weights(run, ckpt)["global_step"])
        log = tmp / f"{name}.jsonl"
        log.write_text("".join(json.dumps(s) + "\n" for s in steps(straight[1]) if s["step"] <= done))
        (run / "checkpoints" / "last.ckpt").unlink()
        resumed[name] = (run, log, ckpt)
    # An epoch-based run (no max_steps) with workers: Lightning loads no loader state after an end-of-epoch
    # checkpoint and its workers read the order before set_epoch.
    # A checkpoint after an epoch's last step, in an epoch-limited run: Lightning restarts it at the next epoch.
    by_epoch = ["lightning.trainer.max_steps=-1", "+lightning.trainer.max_epochs=2"]
    epochs = {"epochs_workers": [*by_epoch, "data.params.num_workers=2"], "periodic_last_batch": by_epoch}
    with ThreadPoolExecutor(2) as pool:
        jobs = [pool.submit(main_py, "-r", stopped, f"lightning.trainer.max_steps={STEPS}")]
        jobs += [pool.submit(main_py, "-r", run / "checkpoints" / ckpt, f"lightning.callbacks.batch_log.params.path={log}",
                             *epochs.get(name, []))
                 for name, (run, log, ckpt) in [(k, v) for k, v in resumed.items() if k != "max_steps"]]
        for job in jobs:
            assert_ok(job.result())
    return {"straight": straight, **{k: v[:2] for k, v in resumed.items()}}


@pytest.mark.parametrize("name", ["max_steps", "epoch_end", "periodic", "periodic_last_batch", "epochs_workers"])
def test_a_resumed_run_trains_on_the_same_batches_and_ends_with_the_same_weights(runs, name):
    straight_run, straight_log = runs["straight"]
    run, log = runs[name]
    expected, got = steps(straight_log), steps(log)
    assert [s["step"] for s in got] == list(range(1, STEPS + 1))
    for a, b in zip(expected, got):
        assert (b["step"], b["captions"], b["images"]) == (a["step"], a["captions"], a["images"])
        assert b["loss"] == a["loss"]  # the same noise, timesteps and caption dropout
    a, b = weights(straight_run), weights(run)
    assert a["global_step"] == b["global_step"] == STEPS
    different = [k for k in a["state_dict"] if not torch.equal(a["state_dict"][k], b["state_dict"][k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"
    print(f"mid-epoch resume ({name}): {len(a['state_dict'])} tensors bit-exact after {STEPS} steps")


def test_workers_do_not_change_the_batches(runs):
    """The straight run used 2 workers, the stopped one none: their first 3 steps are the same."""
    assert [s["images"] for s in steps(runs["straight"][1])[:3]] == [s["images"] for s in steps(runs["max_steps"][1])[:3]]


# ---- the sampler on its own ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("world", [1, 2])
def test_resume_at_continues_the_epoch_then_counts_epochs_itself(world):
    groups = [i % 3 for i in range(23)]
    for rank in range(world):
        fresh = EpochOrder(groups, 2, seed=5, num_replicas=world, rank=rank)
        fresh.set_epoch(4)
        epoch4 = list(fresh)
        fresh.set_epoch(5)
        epoch5 = list(fresh)
        resumed = EpochOrder(groups, 2, seed=5, num_replicas=world, rank=rank)
        resumed.resume_at(4, 3)
        resumed.set_epoch(9)  # Lightning's number after some resumes is off by one; a resumed sampler counts
        assert list(resumed) == epoch4[3 * 2:]
        resumed.set_epoch(9)
        assert list(resumed) == epoch5
        done = EpochOrder(groups, 2, seed=5, num_replicas=world, rank=rank)
        done.resume_at(4, len(epoch4) // 2)  # written in the end-of-epoch hooks: nothing left of epoch 4
        assert list(done) == [] and list(done) == epoch5


def test_item_seeds_are_unique_per_epoch_and_position():
    seeds = {item_seed(23, epoch, pos) for epoch in range(50) for pos in range(200)}
    assert len(seeds) == 50 * 200


def test_seeded_items_repeat_their_randomness_and_leave_the_callers_state_alone():
    class Draws(torch.utils.data.Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, i):
            import random

            import numpy as np

            return (i, torch.rand(()).item(), random.random(), float(np.random.rand()))

    items = SeededItems(Draws())
    torch.manual_seed(0)
    before = torch.get_rng_state()
    first = items[(2, 77)]
    assert torch.equal(torch.get_rng_state(), before)
    assert items[(2, 77)] == first and items[(2, 78)] != first
