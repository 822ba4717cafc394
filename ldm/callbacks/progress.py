"""Prompt-by-step progress, live: a GIF and a strip per prompt that grow while the model trains.

Every ``every_n_steps`` optimizer steps (and once before the first step, and at the end) the model samples fixed
prompts with fixed seeds, so two frames differ only because the weights did. No checkpoint is written for a frame.
Per prompt, under ``<run dir>/progress/``:

- ``frames/<slug>/step-NNNNNN.png``: each frame, labelled with the step (a resumed run adds to them);
- ``<slug>.gif``: every frame in order; ``<slug>_strip.png``: up to ``strip_frames`` frames side by side, evenly
  picked from first to last;
- ``prompts.json``: ``{slug: prompt}``.

The prompts default to the validation prompts (``TextOnly``). Frames also go to TensorBoard and W&B when those
loggers are on. The denoising GIF of a finished model is ``scripts/make_gifs.py denoise --ckpt <run dir>``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pytorch_lightning as pl
from PIL import Image
from pytorch_lightning.utilities import rank_zero_only

from ldm.callbacks.image_logger import ImageLogger
from ldm.inference import to_uint8
from ldm.outputs import captioned, save_gif, slug
from ldm.util import atomic_path

log_to_loggers = ImageLogger._to_loggers


def validation_prompts(trainer) -> list[str]:
    """The captions of the DataModule's text-only validation prompts, or none."""
    from ldm.data.text_only import TextOnly

    dataset = (getattr(trainer.datamodule, "datasets", {}) or {}).get("validation")
    return list(dataset.captions) if isinstance(dataset, TextOnly) else []


class ProgressFrames(pl.Callback):
    def __init__(self, logdir: str, every_n_steps: int = 0, prompts: Sequence[str] | None = None, seed: int = 0,
                 size: int | Sequence[int] | None = None, sampler: str = "ddim", steps: int = 25,
                 guidance_scale: float = 3.0, strip_frames: int = 10, frame_ms: int = 300) -> None:
        super().__init__()
        self.folder = Path(logdir) / "progress"
        self.every, self.prompts, self.seed = int(every_n_steps), list(prompts or []), int(seed)
        self.sample_kwargs = {"size": tuple(size) if isinstance(size, (list, tuple)) else size, "sampler": sampler,
                              "steps": steps, "guidance_scale": guidance_scale}
        self.strip_frames, self.frame_ms = int(strip_frames), int(frame_ms)
        self._last = -1

    def _prompts(self, trainer) -> list[str]:
        if not self.prompts:
            self.prompts = validation_prompts(trainer)
        return self.prompts

    def on_train_start(self, trainer, pl_module) -> None:
        if self.every > 0:
            self.frame(trainer, pl_module)  # the model before its first step (or where a resumed run is)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every > 0 and step % self.every == 0 and step != self._last:
            self.frame(trainer, pl_module)

    def on_train_end(self, trainer, pl_module) -> None:
        if self.every > 0 and trainer.global_step != self._last:
            self.frame(trainer, pl_module)

    @rank_zero_only
    def frame(self, trainer, pl_module) -> None:
        step = self._last = int(trainer.global_step)
        prompts = self._prompts(trainer)
        if not prompts or pl_module.cond_stage_model.kind != "text":  # image conditioners take pictures
            return
        seeds = [self.seed + i for i in range(len(prompts))]
        with trainer.precision_plugin.forward_context():
            images = to_uint8(pl_module.generate(prompts, seeds, **self.sample_kwargs))
        names = {}
        for prompt, image in zip(prompts, images):
            name = f"{len(names):02d}-{slug(prompt)}"
            names[name] = prompt
            frames = self.folder / "frames" / name
            frames.mkdir(parents=True, exist_ok=True)
            with atomic_path(frames / f"step-{step:06d}.png") as tmp:
                captioned(image, f"step {step}").save(tmp, format="PNG")
            self._rebuild(name, sorted(frames.glob("step-*.png")))
        with atomic_path(self.folder / "prompts.json") as tmp:
            tmp.write_text(json.dumps(names, indent=1))
        grid = np.concatenate([np.asarray(captioned(i, f"step {step}")) for i in images], axis=1)
        log_to_loggers(trainer, "progress/frames", grid, step, None)

    def _rebuild(self, name: str, paths: list[Path]) -> None:
        frames = [Image.open(p).convert("RGB") for p in paths]
        with atomic_path(self.folder / f"{name}.gif") as tmp:
            save_gif(frames, tmp, self.frame_ms)
        picks = sorted({round(i * (len(frames) - 1) / max(1, self.strip_frames - 1)) for i in range(self.strip_frames)})
        chosen = [frames[i] for i in picks if i < len(frames)]
        strip = Image.new("RGB", (sum(f.width for f in chosen), max(f.height for f in chosen)), "white")
        x = 0
        for f in chosen:
            strip.paste(f, (x, 0))
            x += f.width
        with atomic_path(self.folder / f"{name}_strip.png") as tmp:
            strip.save(tmp, format="PNG")
