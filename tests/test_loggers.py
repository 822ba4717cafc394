"""TensorBoard and Weights & Biases loggers configured by YAML: metrics and sample grids reach both, and W&B without
credentials logs offline instead of waiting on a login prompt."""
import yaml

from tests.conftest import main_env, main_py, run_dirs, write_train_yaml


def test_tensorboard_and_wandb_without_login(tmp_path, image_folder):
    """TensorBoard receives the losses and the sample grids (read back from its events file), W&B goes offline."""
    data = write_train_yaml(tmp_path / "train.yaml", image_folder, image_every=4,
                            trainer={"max_steps": 4})
    loggers = tmp_path / "loggers.yaml"
    loggers.write_text(yaml.safe_dump({"lightning": {"logger": {
        "tensorboard": {"target": "pytorch_lightning.loggers.TensorBoardLogger", "params": {"name": "tb"}},
        "wandb": {"target": "pytorch_lightning.loggers.WandbLogger", "params": {"project": "smoke"}}}}}))
    env = main_env(HOME=str(tmp_path / "home"))  # no ~/.netrc: no W&B credentials
    env.pop("WANDB_MODE", None)
    env.pop("WANDB_API_KEY", None)
    result = main_py("-t", "--base", "configs/tiny/tiny-sd.yaml", data, loggers, "-l", tmp_path / "logs", env=env)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "logging offline" in result.stdout
    (run,) = run_dirs(tmp_path / "logs")
    check_tensorboard_events(run)
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "W&B run stored offline in the run dir"
    assert list(offline[0].rglob("media/images/train/samples_cfg3_*.png")), "sample grids reach W&B"
    assert (run / "metrics.csv").exists() and (run / "checkpoints" / "last.ckpt").exists()


def check_tensorboard_events(run):
    """Read the TensorBoard events back: the per-step losses are the ones metrics.csv holds, at the same steps, and
    the sample grids are the PNGs the image logger saved, pixel for pixel."""
    import csv
    import io

    import numpy as np
    import pytest
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

    (events,) = {f.parent for f in (run / "tb").rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(events), size_guidance={SCALARS: 0, IMAGES: 0})
    acc.Reload()
    rows = list(csv.DictReader((run / "metrics.csv").open()))
    losses = [tag for tag in acc.Tags()["scalars"] if tag.startswith("train/loss")]
    assert losses, acc.Tags()["scalars"]
    for tag in losses:
        ours = {int(r["step"]): float(r[tag]) for r in rows if r.get(tag)}
        theirs = {e.step: e.value for e in acc.Scalars(tag)}
        assert ours and theirs.keys() == ours.keys(), (tag, ours, theirs)
        assert all(np.isfinite(v) and v == pytest.approx(ours[k], rel=1e-6) for k, v in theirs.items()), tag
    assert len({e.step for e in acc.Scalars(losses[0])}) >= 4  # one value per step of the 4-step run
    images = acc.Tags()["images"]
    assert "train/samples_cfg3" in images, images
    for tag in images:
        (event,) = acc.Images(tag)  # image_every=4 in a 4-step run: one grid per key, at step 4
        assert event.step == 4
        got = np.asarray(Image.open(io.BytesIO(event.encoded_image_string)).convert("RGB"))
        (png,) = (run / "images" / "train").glob(f"{tag.split('/', 1)[1]}_gs-000004_*.png")
        assert got.shape == (event.height, event.width, 3)
        assert np.array_equal(got, np.asarray(Image.open(png).convert("RGB"))), tag
