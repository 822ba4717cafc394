"""TensorBoard and Weights & Biases loggers configured by YAML: metrics and sample grids reach both, and W&B without
credentials logs offline instead of waiting on a login prompt."""
import yaml

from tests.conftest import main_env, main_py, run_dirs, write_train_yaml


def test_tensorboard_and_wandb_without_login(tmp_path, image_folder):
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
    assert list((run / "tb").rglob("events.out.tfevents.*")), "TensorBoard events written"
    offline = list((run / "wandb").glob("offline-run-*"))
    assert offline, "W&B run stored offline in the run dir"
    assert list(offline[0].rglob("media/images/train/samples_cfg3_*.png")), "sample grids reach W&B"
    assert (run / "metrics.csv").exists() and (run / "checkpoints" / "last.ckpt").exists()
