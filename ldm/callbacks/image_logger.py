"""Sample grids during training: inputs, reconstructions and guided samples, saved under ``images/``."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from ldm.outputs import image_grid
from ldm.util import ConfigError

MIN_TILE = 64  # grid tiles smaller than this are enlarged (nearest neighbour), so 8-pixel demo samples are visible


class ImageLogger(pl.Callback):
    """Log image grids every ``batch_frequency`` training steps and for the first ``max_val_batches`` validation
    batches (including text-only prompt batches, each sampled with its own fixed seed).

    ``sizes`` (``[[h, w], ...]``) samples every logged batch at each size, one grid per size (``samples_cfg3_640x384``).
    Sampling settings (``sampler``, ``steps``, ``guidance_scale``, ``negative_prompt``, ``eta``) default to a fast
    50-step DDIM; samples use EMA weights when the model is configured to. Grids go to
    ``<logdir>/images/{train,val}/{key}_gs-{step:06}_e-{epoch:06}_b-{batch:06}.png`` and to TensorBoard and
    Weights & Biases when those loggers are on.
    """

    def __init__(self, logdir: str, batch_frequency: int = 500, max_images: int = 4, nrow: int | None = None,
                 log_first_step: bool = False, log_on_validation: bool = True, max_val_batches: int = 4,
                 sampler: str = "ddim", steps: int = 50, guidance_scale: float = 3.0, negative_prompt: str = "",
                 eta: float = 0.0, size: int | None = None, sizes: list | None = None, disabled: bool = False):
        super().__init__()
        self.logdir = Path(logdir)
        self.batch_frequency, self.max_images, self.nrow = batch_frequency, max_images, nrow
        self.log_first_step, self.log_on_validation, self.max_val_batches = log_first_step, log_on_validation, max_val_batches
        self.sample_kwargs = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale,
                              "negative_prompt": negative_prompt, "eta": eta}
        if size is not None:
            self.sample_kwargs["size"] = size
        if sizes:  # e.g. [[512, 512], [384, 640], [640, 384]]: one grid per size, for bucketed training
            for value in sizes:
                pair = [value] * 2 if isinstance(value, int) else list(value)
                if len(pair) != 2 or any(int(v) % 8 for v in pair):
                    raise ConfigError(f"image_logger.sizes: {value!r} is not a size [height, width] of multiples of 8")
            self.sample_kwargs["sizes"] = [list(v) if not isinstance(v, int) else [v, v] for v in sizes]
        self.disabled = disabled
        self._last_step = -1

    def _due(self, step: int) -> bool:
        """Due after every ``batch_frequency``-th optimizer step (and after the first one with ``log_first_step``)."""
        if step == self._last_step or step == 0:
            return False
        return (self.batch_frequency > 0 and step % self.batch_frequency == 0) or (self.log_first_step and step == 1)

    @rank_zero_only
    def log_batch(self, trainer, pl_module, batch, batch_idx: int, split: str) -> dict[str, Path]:
        with trainer.precision_plugin.forward_context():
            images = pl_module.log_images(batch, n=self.max_images, **self.sample_kwargs)
        written = {}
        folder = self.logdir / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        step, epoch = pl_module.global_step, pl_module.current_epoch
        for key, value in images.items():
            grid = image_grid(value, self.nrow or len(value), min_tile=MIN_TILE)
            path = folder / f"{key}_gs-{step:06}_e-{epoch:06}_b-{batch_idx:06}.png"
            grid.save(path)
            written[key] = path
            self._to_loggers(trainer, f"{split}/{key}", np.asarray(grid), step, batch)
        return written

    @staticmethod
    def _to_loggers(trainer, tag: str, grid: np.ndarray, step: int, batch) -> None:
        from pytorch_lightning.loggers import TensorBoardLogger, WandbLogger

        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(tag, grid, step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image(key=tag, images=[grid], step=step)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        # Under gradient accumulation several batches share one global step; log once per step.
        if not self.disabled and self._due(pl_module.global_step):
            self._last_step = pl_module.global_step
            self.log_batch(trainer, pl_module, batch, batch_idx, "train")

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if self.disabled or not self.log_on_validation or trainer.sanity_checking:
            return
        loaders = trainer.val_dataloaders
        if isinstance(loaders, (list, tuple)) and dataloader_idx < len(loaders) - 1:
            return  # held-out images for val/loss come first; the configured validation set (prompts) is last
        if batch_idx < self.max_val_batches:
            self.log_batch(trainer, pl_module, batch, batch_idx, "val")
