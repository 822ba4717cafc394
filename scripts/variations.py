#!/usr/bin/env python
"""Sample variations of input images with an image-variations model (CLIP image embedding as the condition).

--ckpt is anything ``ldm.weights.load_model`` reads: a run dir (its checkpoints/last.ckpt), a training
checkpoint, or a diffusers image-variations folder (unet/ vae/ image_encoder/ ...). The image encoder's
preprocessing (resize filter, antialias, mean/std) comes from the weights' stored config, so inputs are embedded
exactly as training embedded its images. The weight and sampler flags (--ckpt, --config, --device, --no_ema,
--lora, --lora_scale, --sampler, --ddim_steps, --ddim_eta, --scale, --sampler_config) are those of txt2img.py.

  python scripts/variations.py --ckpt logs/<run> photo.jpg other.png -n 4 --scale 3 --seed 0 --ddim_steps 50

The script's earlier spellings still work: the weights as the first argument instead of --ckpt
(``variations.py logs/<run> photo.jpg``), --steps, --eta and --no-ema.

For each input, ``<outdir>/<stem>-variations.png`` is a row with the input first and its N variations after it,
and ``<outdir>/<stem>-NN.png`` each variation alone. Variation i uses seed ``seed + i``, so any one of them can
be reproduced alone.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # weights are local; never reach for the Hub
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402

from ldm.outputs import image_grid  # noqa: E402
from ldm.sampling_cli import add_steps_args, add_weights_args, apply_sampler_config, check_steps_args  # noqa: E402
from ldm.util import ConfigError, run_cli  # noqa: E402


def load_image(path: str | Path, channels: int = 3) -> torch.Tensor:
    """(1, channels, H, W) in [-1, 1] at the file's own size (the conditioner does CLIP's resize itself)."""
    from ldm.data.images import load_rgb

    img = load_rgb(str(path))
    if channels == 1:
        img = img.convert("L")
    x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()) / 127.5 - 1
    return (x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)).unsqueeze(0)


def make_variations(model, image: torch.Tensor, n: int = 4, seed: int = 0, guidance_scale: float = 3.0,
                    steps: int = 50, sampler: str = "ddim", size: int | None = None, eta: float = 0.0) -> torch.Tensor:
    """``n`` variations of one (1,C,H,W) image in [-1, 1]; variation i is sampled with seed ``seed + i``."""
    conds = image.expand(n, -1, -1, -1).to(model.device)
    return model.generate(conds, [seed + i for i in range(n)], size=size, sampler=sampler, steps=steps,
                          guidance_scale=guidance_scale, eta=eta)


def grid_row(image: torch.Tensor, variations: torch.Tensor) -> Image.Image:
    """The input (resized and centre-cropped to the variations' size) followed by the variations, in one row."""
    h, w = variations.shape[-2:]
    scale = max(h / image.shape[-2], w / image.shape[-1])
    x = F.interpolate(image.float(), scale_factor=scale, mode="bicubic", antialias=True, align_corners=False)
    top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
    x = x[..., top:top + h, left:left + w]
    return image_grid(torch.cat([x.cpu(), variations.float().cpu()]), nrow=len(variations) + 1)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="variations.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="IMAGE",
                   help="input image files (without --ckpt, the weights come first: the earlier spelling)")
    p.add_argument("-n", "--n", type=int, default=4, help="variations per input (default: 4)")
    p.add_argument("--seed", type=int, default=0, help="variation i uses seed + i (default: 0)")
    p.add_argument("--size", type=int, default=None, help="output side in pixels (default: the model's)")
    p.add_argument("-o", "--outdir", default="outputs/variations",
                   help="writes <stem>-variations.png and <stem>-NN.png (default: outputs/variations)")
    add_weights_args(p)
    p.add_argument("--lora", default=None, metavar="FILE",
                   help="a UNet LoRA adapter trained on this model (<run>/lora/<name>.safetensors, either layout)")
    p.add_argument("--lora_scale", type=float, default=1.0, help="strength of the --lora adapter (default: 1.0)")
    add_steps_args(p, scale=3.0)
    # No defaults of their own (SUPPRESS): the flags above set those; these only store what is given.
    old = p.add_argument_group("earlier spellings, still accepted")
    old.add_argument("--steps", dest="ddim_steps", type=int, metavar="N", default=argparse.SUPPRESS,
                     help="same as --ddim_steps")
    old.add_argument("--eta", dest="ddim_eta", type=float, metavar="ETA", default=argparse.SUPPRESS,
                     help="same as --ddim_eta")
    old.add_argument("--no-ema", dest="no_ema", action="store_true", default=argparse.SUPPRESS, help="same as --no_ema")
    return p


def weights_and_images(args) -> tuple[str, list[str]]:
    """``--ckpt`` and the positional images, or (the earlier spelling) the first positional as the weights."""
    if args.ckpt is not None:
        return args.ckpt, args.inputs
    if len(args.inputs) < 2:
        raise ConfigError("give the model to sample with and then the images: --ckpt RUN_DIR|CKPT|DIFFUSERS_FOLDER "
                          "IMAGE [IMAGE ...]")
    return args.inputs[0], args.inputs[1:]


def main(argv=None) -> int:
    from ldm.data.images import BadImage
    from ldm.inference import load, pick_device

    args = build_parser().parse_args(argv)

    def work() -> None:
        args.weights, args.images = weights_and_images(args)
        check_steps_args(args)
        device = pick_device(args.device)
        model = load(args.weights, args.config, device, ema=not args.no_ema, lora=args.lora, lora_scale=args.lora_scale)
        print(model.weights_summary)
        if model.cond_stage_model.kind != "image":
            raise ConfigError(f"{args.weights!r} is not an image-variations model (its conditioner is "
                              f"{type(model.cond_stage_model).__name__}); use a text-to-image script")
        apply_sampler_config(model, args)
        channels = model.cond_stage_model.input_channels()
        outdir = Path(args.outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        for path in args.images:
            image = load_image(path, channels)
            out = make_variations(model, image, args.n, args.seed, args.scale, args.ddim_steps, args.sampler,
                                  args.size, args.ddim_eta)
            stem = Path(path).stem
            grid_row(image, out).save(outdir / f"{stem}-variations.png")
            for i, v in enumerate(out):
                pixels = ((v.float().cpu() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).squeeze(-1)
                Image.fromarray(pixels.numpy()).save(outdir / f"{stem}-{i:02}.png")
            print(f"{path}: {args.n} variations (seeds {args.seed}..{args.seed + args.n - 1}) -> "
                  f"{outdir / f'{stem}-variations.png'}")

    return run_cli(work, errors=(BadImage,))


if __name__ == "__main__":
    sys.exit(main())
