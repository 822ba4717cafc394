"""Did DreamBooth learn the subject without losing the class? A figure at the end of training.

Samples for the instance prompt ("a photo of sks dog") and for the bare class prompt ("a photo of a dog") are
compared with the instance photos and the class images, as small gray thumbnails: the root-mean-square pixel
distance from each sample to its nearest photo, averaged (0 = identical, 2 = opposite; images are in [-1, 1]).
Learned means the instance-prompt samples sit closer to the instance photos than the class-prompt samples do;
no drift means the class-prompt samples still sit closer to the class images than to the subject.

Both are at their best when the model memorises the photos, so copying figures go beside them: how much the
samples of one prompt differ from each other (one image repeated: 0) against how much the photos differ from each
other, and how far a photo sits from the nearest *other* photo, which is where a new picture of the subject
would fall: samples much nearer than that to a photo are copies of it. The same two figures are given for the
class prompt against the class images.

Pixel distance only sees layout, tone and colour. It is the whole story for the digits demo
(configs/demo/digits-dreambooth.yaml) and a rough one for photos, where the grids of
``ldm.callbacks.dreambooth.DreamBoothSamples`` are what to look at.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from ldm.callbacks.digit_eval import _num, diversity, leave_one_out_distance, nearest_distance, thumbnails
from ldm.callbacks.dreambooth import dreambooth_datasets
from ldm.callbacks.image_logger import MIN_TILE
from ldm.outputs import image_grid


class DreamBoothScore(pl.Callback):
    """At the end of training: sample ``n`` images per prompt (seeds ``seed + i``), print and save the closeness
    figure to ``<run dir>/dreambooth_score.json`` and the samples, instance-prompt row first, as
    ``<run dir>/dreambooth_score.png`` (the instance photos form the top row).

    Args:
        n: samples per prompt. ``thumb``: thumbnail side for the comparison. ``max_class_images``: how many class
        images to compare with. The sampling settings are those of the sampling scripts.
    """

    def __init__(self, n: int = 16, seed: int = 1000, thumb: int = 32, max_class_images: int = 200,
                 sampler: str = "ddim", steps: int = 50, guidance_scale: float = 7.5):
        super().__init__()
        self.n, self.seed, self.thumb, self.max_class_images = n, seed, thumb, max_class_images
        self.sample_kwargs = {"sampler": sampler, "steps": steps, "guidance_scale": guidance_scale}
        self.result: dict | None = None

    @torch.no_grad()
    def score(self, pl_module, dataset) -> tuple[dict, torch.Tensor]:
        instance = torch.stack([dataset.instance[i]["image"] for i in range(len(dataset.instance))])
        n_class = min(len(dataset.classes), self.max_class_images)
        classes = torch.stack([dataset.classes[i]["image"] for i in range(n_class)]) if n_class else None
        seeds = [self.seed + i for i in range(self.n)]
        size = tuple(instance.shape[-2:])
        prompts = {"instance": dataset.instance_prompt, "class": dataset.class_prompt}
        samples = {which: pl_module.generate([prompt] * self.n, seeds, size=size, **self.sample_kwargs)
                   for which, prompt in prompts.items() if prompt}  # no class prompt without prior preservation
        refs = {"instance": thumbnails(instance, self.thumb)}
        if classes is not None:
            refs["class"] = thumbnails(classes, self.thumb)
        result = {"instance_prompt": dataset.instance_prompt, "class_prompt": dataset.class_prompt or None,
                  "samples_per_prompt": self.n, "thumbnail": min(self.thumb, size[-1])}
        for which, images in samples.items():
            thumbs = thumbnails(images, self.thumb)
            for ref, ref_thumbs in refs.items():
                result[f"{which}_prompt_to_{ref}_images"] = nearest_distance(thumbs, ref_thumbs)
            result[f"{which}_prompt_diversity"] = diversity(thumbs)
        for ref, ref_thumbs in refs.items():  # what real pictures of the subject (or class) look like to these figures
            result[f"{ref}_images_diversity"] = diversity(ref_thumbs)
            result[f"{ref}_images_nearest_other"] = leave_one_out_distance(ref_thumbs)
        # One picture: the photos, then the instance-prompt samples, then the class-prompt samples.
        photos = instance[: self.n].to(samples["instance"].device)
        if photos.shape[1] != samples["instance"].shape[1]:
            photos = photos.mean(dim=1, keepdim=True).expand(-1, samples["instance"].shape[1], -1, -1)
        pad = torch.ones(self.n - len(photos), *photos.shape[1:], device=photos.device)
        grid = torch.cat([photos, pad, *samples.values()])
        return result, grid

    def figure(self, r: dict) -> str:
        lines = [f"DreamBooth closeness (RMS pixel distance to the nearest image at {r['thumbnail']} px, lower = "
                 f"closer, {r['samples_per_prompt']} samples per prompt):"]
        for which in ("instance", "class") if r["class_prompt"] else ("instance",):
            parts = [f"{r[f'{which}_prompt_to_{ref}_images']:.3f} from the {ref} images"
                     for ref in ("instance", "class") if f"{which}_prompt_to_{ref}_images" in r]
            lines.append(f"  {r[f'{which}_prompt']!r:<32} samples: " + ", ".join(parts))
        lines.append("learning or copying (samples much nearer to an image than the images are to each other are "
                     "copies):")
        for which in ("instance", "class") if r["class_prompt"] else ("instance",):
            if f"{which}_images_diversity" not in r:
                continue
            lines.append(f"  {r[f'{which}_prompt']!r:<32} samples differ from each other by "
                         f"{_num(r[f'{which}_prompt_diversity'])} (the {which} images: "
                         f"{_num(r[f'{which}_images_diversity'])}); {'an' if which == 'instance' else 'a'} {which} "
                         f"image is {_num(r[f'{which}_images_nearest_other'])} from the nearest other one")
        return "\n".join(lines)

    @rank_zero_only
    def on_train_end(self, trainer, pl_module):
        datasets = dreambooth_datasets(trainer)
        if not datasets:
            return
        with trainer.precision_plugin.forward_context():
            self.result, grid = self.score(pl_module, datasets[0])
        self.result["step"] = trainer.global_step
        folder = Path(trainer.default_root_dir)
        (folder / "dreambooth_score.json").write_text(json.dumps(self.result, indent=2) + "\n")
        image_grid(grid, self.n, min_tile=MIN_TILE).save(folder / "dreambooth_score.png")
        print(f"step {trainer.global_step}: {self.figure(self.result)}\n  photos / instance prompt / class prompt: "
              f"{folder / 'dreambooth_score.png'}", flush=True)
