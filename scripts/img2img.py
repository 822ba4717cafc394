#!/usr/bin/env python
"""Redraw an image guided by text: a sketch → a picture → an oil painting of it.

    python scripts/img2img.py --ckpt logs/<run> --init-img sketch.png --prompt "a castle on a hill" --strength 0.7
    python scripts/img2img.py --ckpt logs/<run> --init-img outputs/img2img-samples/samples/00000.png \\
        --prompt "an oil painting of a castle" --strength 0.5 --n_samples 1 --n_iter 1

Any size and mode of image is taken: EXIF rotation applied, transparency put on white, converted to RGB and
resized (Lanczos, no crop) to --H x --W, or with one of them to keep the aspect ratio, or by default each side
rounded down to a multiple of 8. ``--strength`` 0..1 is the part of the ``--ddim_steps`` schedule that runs:
1 starts from the image noised to the first timestep (nearly pure noise), ~0 returns it through the VAE.
Outputs are PNGs of the same size and can be fed back as the next --init-img. With the same weights and seed
the images are those of diffusers' StableDiffusionImg2ImgPipeline with
``generator=torch.Generator("cpu").manual_seed(seed)``.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import this project's ldm from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local; never wait on the Hub

from ldm import sampling_cli  # noqa: E402


def main(argv=None) -> int:
    return sampling_cli.main(argv, img2img=True)


if __name__ == "__main__":
    sys.exit(main())
