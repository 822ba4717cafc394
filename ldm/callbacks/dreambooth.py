"""DreamBooth callbacks: generate missing class images with the base model, and sample grids that show overfitting
and language drift while training.

Class images are made in ``on_fit_start`` rather than in the DataModule's ``prepare_data`` because they need the
model (the base weights, before any step), which the DataModule never sees. Lightning builds the train
DataLoader after ``on_fit_start``, so the dataset picks the new files up before the first batch.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.callbacks.image_logger import MIN_TILE
from ldm.data.datamodule import inner_dataset
from ldm.data.dreambooth import DreamBoothDataset
from ldm.data.folder import find_images
from ldm.outputs import image_grid
from ldm.util import atomic_path

log = logging.getLogger(__name__)


def dreambooth_datasets(trainer) -> list[DreamBoothDataset]:
    """The DreamBooth datasets of the trainer's DataModule (unwrapping ``repeats``)."""
    datasets = getattr(trainer.datamodule, "datasets", {}) if trainer.datamodule is not None else {}
    found = [inner_dataset(dataset, DreamBoothDataset) for dataset in datasets.values()]
    return [d for d in found if d is not None]


def to_pil(image: torch.Tensor) -> Image.Image:
    """(C,H,W) in [-1, 1] → an RGB picture (gray samples of 1-channel models are repeated to RGB)."""
    image = image.float().cpu().clamp(-1, 1).expand(3, -1, -1) if image.shape[0] == 1 else image.float().cpu().clamp(-1, 1)
    return Image.fromarray(((image + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


@torch.no_grad()
def generate_class_images(model, folder: str | Path, prompt: str, count: int, batch_size: int = 4,
                          size: int | None = None, sampler: str = "ddim", steps: int = 50,
                          guidance_scale: float = 7.5, negative_prompt: str = "") -> int:
    """Make ``folder`` hold at least ``count`` images for ``prompt``; return how many were generated.

    Image ``class-{seed:05d}.png`` is always sampled with seed ``seed``, and each file is written under a
    temporary name and renamed, so an interrupted run resumes where it stopped and leaves no half-written file.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    missing = count - len(find_images(folder))
    todo, seed = [], 0
    while len(todo) < missing:  # the lowest seeds whose file is not there yet
        if not (folder / f"class-{seed:05d}.png").exists():
            todo.append(seed)
        seed += 1
    for start in tqdm(range(0, len(todo), batch_size), desc=f"class images for {prompt!r}", unit="batch"):
        seeds = todo[start:start + batch_size]
        images = model.generate([prompt] * len(seeds), seeds, size=size, sampler=sampler, steps=steps,
                                guidance_scale=guidance_scale, negative_prompt=negative_prompt, use_ema=False)
        for seed, image in zip(seeds, images):
            with atomic_path(folder / f"class-{seed:05d}.png") as tmp:
                to_pil(image).save(tmp, format="PNG")
    return len(todo)


class ClassImages(pl.Callback):
    """Before training, top up every DreamBooth dataset's ``class_data_dir`` to ``num_class_images`` with the base
    model's samples for ``class_prompt`` (rank 0 generates, all ranks wait, then every rank rescans)."""

    def __init__(self, batch_size: int = 4, size: int | None = None, sampler: str = "ddim", steps: int = 50,
                 guidance_scale: float = 7.5, negative_prompt: str = ""):
        super().__init__()
        self.kwargs = {"batch_size": batch_size, "size": size, "sampler": sampler, "steps": steps,
                       "guidance_scale": guidance_scale, "negative_prompt": negative_prompt}

    def on_fit_start(self, trainer, pl_module):
        for dataset in dreambooth_datasets(trainer):
            if not dataset.with_prior_preservation:
                continue
            if trainer.is_global_zero and dataset.scan_class_images() > 0:
                made = generate_class_images(pl_module, dataset.class_data_dir, dataset.class_prompt,
                                             dataset.num_class_images, **self.kwargs)
                log.info("generated %d class images in %s", made, dataset.class_data_dir)
            trainer.strategy.barrier("dreambooth_class_images")
            dataset.scan_class_images()


class DreamBoothSamples(pl.Callback):
    """Every ``every_n_steps`` steps, one grid: a row for the instance prompt (does the subject appear?), one for
    the bare class prompt (has the class drifted towards the subject?) and one per user prompt (does the subject
    survive new contexts, or does every prompt return the training photos?). Fixed seeds per column, so grids
    from different steps differ only by training. Saved as ``<run dir>/images/train/dreambooth_gs-<step>.png``.

    ``instance_prompt``/``class_prompt`` default to the DreamBooth dataset's.
    """

    def __init__(self, every_n_steps: int = 200, prompts: Sequence[str] = (), n: int = 4, seed: int = 0,
                 instance_prompt: str | None = None, class_prompt: str | None = None, size: int | None = None,
                 sampler: str = "ddim", steps: int = 50, guidance_scale: float = 7.5, negative_prompt: str = "",
                 log_first_step: bool = True):
        super().__init__()
        self.every, self.prompts, self.n, self.seed = every_n_steps, list(prompts), n, seed
        self.instance_prompt, self.class_prompt, self.log_first_step = instance_prompt, class_prompt, log_first_step
        self.sample_kwargs = {"size": size, "sampler": sampler, "steps": steps, "guidance_scale": guidance_scale,
                              "negative_prompt": negative_prompt}
        self._last = -1

    def rows(self, trainer) -> list[str]:
        datasets = dreambooth_datasets(trainer)
        instance = self.instance_prompt or (datasets[0].instance_prompt if datasets else None)
        klass = self.class_prompt or (datasets[0].class_prompt if datasets else None)
        return [p for p in (instance, klass, *self.prompts) if p]

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        due = step > 0 and ((self.every > 0 and step % self.every == 0) or (self.log_first_step and step == 1))
        if due and step != self._last and trainer.is_global_zero:
            self._last = step
            self.log_grid(trainer, pl_module, step)

    def on_train_end(self, trainer, pl_module):
        if trainer.global_step != self._last and trainer.is_global_zero:
            self.log_grid(trainer, pl_module, trainer.global_step)

    @torch.no_grad()
    def log_grid(self, trainer, pl_module, step: int) -> Path:
        rows = self.rows(trainer)
        captions = [p for p in rows for _ in range(self.n)]
        seeds = [self.seed + i for _ in rows for i in range(self.n)]
        images = pl_module.generate(captions, seeds, **self.sample_kwargs)
        folder = Path(trainer.default_root_dir) / "images" / "train"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"dreambooth_gs-{step:06}.png"
        image_grid(images, self.n, min_tile=MIN_TILE).save(path)
        (folder / f"dreambooth_gs-{step:06}.txt").write_text("\n".join(rows) + "\n", encoding="utf-8")
        return path
