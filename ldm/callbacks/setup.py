"""Create the run directory and write the resolved configs into it before training starts."""
from __future__ import annotations

import shlex
import sys
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import OmegaConf
from pytorch_lightning.utilities import rank_zero_only


class SetupCallback(pl.Callback):
    """Writes ``<logdir>/configs/<now>-project.yaml`` (model + data) and ``<now>-lightning.yaml``, and appends the
    command line (shell-quoted, after a ``# <now>`` line) to ``<logdir>/command.txt``. A config written for CompVis
    is saved as written too, in ``configs/compvis/<now>-original.yaml`` (``original_config``).

    A resumed run gets new files with its own timestamp and new lines in ``command.txt``, so the history of what
    was run is kept.
    """

    def __init__(self, logdir: str, now: str, config: dict, lightning_config: dict, resume: bool = False,
                 original_config: str | None = None):
        super().__init__()
        self.logdir = Path(logdir)
        self.now, self.config, self.resume = now, config, resume
        # A CompVis config as written, as YAML text (ldm.compvis translated it): saved beside, never merged by -r.
        self.original_config = original_config
        self.lightning_config = _without_original(lightning_config)
        self._command_written = False

    @rank_zero_only
    def setup(self, trainer, pl_module, stage: str) -> None:
        for sub in ("checkpoints", "configs", "images/train", "images/val"):
            (self.logdir / sub).mkdir(parents=True, exist_ok=True)
        cfgdir = self.logdir / "configs"
        OmegaConf.save(OmegaConf.create(self.config), cfgdir / f"{self.now}-project.yaml", resolve=True)
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}), cfgdir / f"{self.now}-lightning.yaml",
                       resolve=True)
        if self.original_config is not None:  # in a subfolder: -r merges only configs/*.yaml, the translated ones
            (cfgdir / "compvis").mkdir(exist_ok=True)
            (cfgdir / "compvis" / f"{self.now}-original.yaml").write_text(self.original_config)
        if not self._command_written:  # setup runs again for trainer.test() after fit: one line per start
            self._command_written = True
            with open(self.logdir / "command.txt", "a") as f:
                f.write(f"# {self.now}\npython {shlex.join(sys.argv)}\n")

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        # Scripts rebuild the model from the checkpoint alone (sampling, export), so it carries its config.
        checkpoint["config"] = self.config


def _without_original(lightning_config: dict) -> dict:
    """The lightning section without the copy of the original config it carries to this callback."""
    setup = ((lightning_config or {}).get("callbacks") or {}).get("setup_callback") or {}
    if "original_config" not in (setup.get("params") or {}):
        return lightning_config
    params = {k: v for k, v in setup["params"].items() if k != "original_config"}
    callbacks = {**lightning_config["callbacks"], "setup_callback": {**setup, "params": params}}
    if not params and set(setup) <= {"params"}:
        callbacks.pop("setup_callback")
    return {**lightning_config, "callbacks": callbacks}
