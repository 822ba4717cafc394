#!/usr/bin/env python
"""Compare guidance scales: one prompt drawn at every scale (rows) with every seed (columns), in a labelled grid.

    python scripts/guidance_sweep.py --ckpt logs/<run> --prompt "a photo of a cat" --scales 1.1 3 7 14 --seeds 0 1 2 3

Every cell is exactly ``txt2img.py --n_samples 1 --seed <seed> --scale <scale>`` with the other flags alike, and
is also written to ``outdir/samples/NNNNN.png`` with its settings (``txt2img.py --from-png`` redraws it). The
grid goes to ``outdir/sweep-NNNN.png``. A scale <= 1 samples without guidance.
"""
import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # import this project's ldm from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local; never wait on the Hub

from ldm.util import ConfigError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    from ldm.sampling_cli import add_model_args, add_sampler_args

    p = argparse.ArgumentParser(prog="guidance_sweep.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", required=True, help="the prompt ('' for unconditional samples)")
    p.add_argument("--scales", type=float, nargs="+", default=[1.1, 3.0, 7.0, 14.0], help="rows (default: 1.1 3 7 14)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3], help="columns (default: 0 1 2 3)")
    p.add_argument("--outdir", default="outputs/guidance-sweep", help="writes sweep-NNNN.png and samples/NNNNN.png")
    add_model_args(p)
    add_sampler_args(p)
    p.set_defaults(scale=None)  # the scales come from --scales
    for action in p._actions:  # txt2img's --scale means nothing here: hide it from --help (it is refused if given)
        if action.dest == "scale":
            action.help = argparse.SUPPRESS
    return p


def sweep(args) -> Path:
    import torch
    from tqdm.auto import tqdm

    from ldm import inference, outputs
    from ldm.sampling_cli import apply_sampler_config, check_sampler_args, sample_settings

    check_sampler_args(args)
    if args.scale is not None:
        raise ConfigError("--scale is one value; give the rows with --scales")
    device = inference.pick_device(args.device)
    dtype = inference.pick_dtype(args.precision or "auto", device)
    model = inference.load(args.ckpt, args.config, device, dtype, ema=not args.no_ema, lora=args.lora,
                           lora_scale=args.lora_scale)
    apply_sampler_config(model, args)
    height, width = args.H or model.default_image_size(), args.W or model.default_image_size()
    inference.warn(inference.truncation_warnings(model, [args.prompt]))
    outdir = Path(args.outdir)
    samples = outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    number = outputs.next_number(samples, r"(\d{5})\.png")
    rows = []
    with tqdm(total=len(args.scales) * len(args.seeds), unit="img", desc="sweep") as bar:
        for scale in args.scales:
            args.scale = scale
            settings = sample_settings(args, "txt2img", height, width, dtype, device)
            row = []
            for seed in args.seeds:
                images = inference.txt2img(model, [args.prompt], height, width, args.negative_prompt,
                                           torch.Generator("cpu").manual_seed(seed), args.sampler, args.ddim_steps,
                                           scale, args.ddim_eta)
                image = inference.to_uint8(images)[0]
                meta = {"prompt": args.prompt, **settings, "seed": seed, "batch_size": 1, "batch_index": 0}
                outputs.write_png(samples / f"{number:05}.png", image, meta)
                number += 1
                row.append(image)
                bar.update()
            rows.append(row)
    title = f"{args.prompt!r}" + (f" (negative {args.negative_prompt!r})" if args.negative_prompt else "") + \
        f", {args.sampler}, {args.ddim_steps} steps"
    image = outputs.labelled_grid(rows, [f"scale {s:g}" for s in args.scales], [f"seed {s}" for s in args.seeds], title)
    path = outdir / "sweep-{:04}.png".format(outputs.next_number(outdir, r"sweep-(\d{4})\.png"))
    meta = {"kind": "sweep", "prompt": args.prompt, **sample_settings(args, "sweep", height, width, dtype, device),
            "scales": args.scales, "seeds": args.seeds}
    meta.pop("scale")
    outputs.write_png(path, image, meta)
    print(f"wrote {path} (rows: scales {', '.join(f'{s:g}' for s in args.scales)}; columns: seeds "
          f"{', '.join(map(str, args.seeds))}) and {len(args.scales) * len(args.seeds)} samples to {samples}/")
    return path


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(sweep, args)


if __name__ == "__main__":
    sys.exit(main())
