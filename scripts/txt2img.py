#!/usr/bin/env python
"""Sample images from text with a checkpoint of this project, a diffusers folder or a single-file checkpoint.

    python scripts/txt2img.py --ckpt logs/<run> --prompt "a photo of a cat" --n_samples 4 --n_iter 1
    python scripts/txt2img.py --ckpt models/sd-v1-5 --prompt "an oil painting" --negative_prompt "blurry" \\
        --sampler dpm++ --ddim_steps 25 --scale 7 --seed 1 --H 512 --W 768
    python scripts/txt2img.py --from-png outputs/txt2img-samples/samples/00003.png   # redraw an image

Writes ``outdir/samples/NNNNN.png`` (each carrying its prompt, negative prompt, seed, batch size and index, steps,
scale, sampler, size and model as PNG text) and ``outdir/grid-NNNN.png``. With the same weights and seed the
images are those of diffusers' StableDiffusionPipeline with ``generator=torch.Generator("cpu").manual_seed(seed)``.
"""
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import this project's ldm from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local; never wait on the Hub

from ldm import sampling_cli  # noqa: E402


def main(argv=None) -> int:
    return sampling_cli.main(argv, img2img=False)


if __name__ == "__main__":
    sys.exit(main())
