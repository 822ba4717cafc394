#!/usr/bin/env python
"""Progress GIFs: how one image forms through the denoising steps, and how prompts change over a training run.

    python scripts/make_gifs.py denoise --ckpt logs/<run> --prompt "a photo of a cat" --seed 3 --every 2
    python scripts/make_gifs.py checkpoints logs/<run> --prompt "a photo of a cat" --prompt "a red car" --seed 0

``denoise`` writes one GIF, a frame after every ``--every``-th step and after the last (ceil(steps / every)
frames), each the decoded current latents labelled with the step and timestep; sigma-based samplers (euler,
euler_a) are shown at unit variance (see ``ldm.inference.decode_frame``). The last frame is the image
``txt2img.py --n_samples 1`` draws with the same flags.

``checkpoints`` samples every prompt from every checkpoint in ``RUN_DIR/checkpoints`` (oldest first; last.ckpt
only when no epoch checkpoint has its step) with the same seed (prompt i uses ``--seed`` + i), and writes one
GIF per prompt to ``--outdir`` (default ``RUN_DIR/gifs``), a frame per checkpoint labelled with its step and epoch.
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

    p = argparse.ArgumentParser(prog="make_gifs.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("denoise", help="one sample, a frame per step (or every k steps)")
    d.add_argument("--prompt", required=True)
    d.add_argument("--seed", type=int, default=42)
    d.add_argument("--every", type=int, default=1, help="a frame every k steps, and after the last (default: 1)")
    d.add_argument("--out", default=None, help="the GIF (default: outputs/gifs/denoise-<prompt>-<seed>.gif)")
    add_model_args(d)
    c = sub.add_parser("checkpoints", help="the same prompts and seeds from every checkpoint of a run")
    c.add_argument("run_dir", help="a run directory (logs/<time>_<name>) with checkpoints/*.ckpt")
    c.add_argument("--prompt", action="append", default=None, help="a prompt; repeat for more")
    c.add_argument("--from-file", "--from_file", dest="from_file", default=None, help="prompts, one a line")
    c.add_argument("--seed", type=int, default=42, help="seed of the first prompt; prompt i uses seed + i")
    c.add_argument("--outdir", default=None, help="where the GIFs go (default: RUN_DIR/gifs)")
    for q in (d, c):
        add_sampler_args(q)
        q.add_argument("--duration", type=int, default=120, help="milliseconds per frame (default: 120)")
    c.add_argument("--precision", default=None, help="auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16, bf16")
    c.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps, cpu")
    c.add_argument("--no_ema", action="store_true", help="sample with the raw weights, not the EMA copy")
    return p


def denoise_gif(args) -> Path:
    import torch
    from tqdm.auto import tqdm

    from ldm import inference, outputs
    from ldm.sampling import make_scheduler
    from ldm.sampling_cli import apply_sampler_config, check_sampler_args

    check_sampler_args(args)
    if args.every < 1:
        raise ConfigError(f"--every must be at least 1, got {args.every}")
    device = inference.pick_device(args.device)
    model = inference.load(args.ckpt, args.config, device, inference.pick_dtype(args.precision or "auto", device),
                           ema=not args.no_ema, lora=args.lora, lora_scale=args.lora_scale)
    apply_sampler_config(model, args)
    height, width = args.H or model.default_image_size(), args.W or model.default_image_size()
    inference.warn(inference.truncation_warnings(model, [args.prompt]))
    scheduler = make_scheduler(args.sampler, model.sampler_config)
    frames, bar = [], tqdm(total=args.ddim_steps, unit="step", desc="denoise")

    def on_step(i, t, latents):
        bar.update()
        if (i + 1) % args.every == 0 or i + 1 == len(scheduler.timesteps):
            image = inference.to_uint8(inference.decode_frame(model, scheduler, latents))[0]
            frames.append(outputs.captioned(image, f"step {i + 1}/{len(scheduler.timesteps)}  t={int(t)}"))

    generator = torch.Generator("cpu").manual_seed(args.seed)
    inference.txt2img(model, [args.prompt], height, width, args.negative_prompt, generator, args.sampler,
                      args.ddim_steps, args.scale, args.ddim_eta, on_step=on_step, scheduler=scheduler)
    bar.close()
    out = Path(args.out or f"outputs/gifs/denoise-{outputs.slug(args.prompt)}-{args.seed}.gif")
    out.parent.mkdir(parents=True, exist_ok=True)
    outputs.save_gif(frames, out, args.duration)
    print(f"wrote {out} ({len(frames)} frames, {args.sampler}, {args.ddim_steps} steps, seed {args.seed})")
    return out


def run_checkpoints(run_dir: Path) -> list[tuple[Path, int, int]]:
    """``(path, global_step, epoch)`` of a run's checkpoints by step, one per step (an epoch file over last.ckpt)."""
    import torch

    paths = sorted((run_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.name == "last.ckpt")
    if not paths:
        raise ConfigError(f"{str(run_dir)!r} has no checkpoints/*.ckpt (give a run dir under logs/)")
    found = {}
    for path in paths:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)  # reads the two numbers only
        found.setdefault(int(ckpt["global_step"]), (path, int(ckpt["global_step"]), int(ckpt["epoch"])))
    return [found[s] for s in sorted(found)]


def checkpoint_gifs(args) -> list[Path]:
    import torch
    from tqdm.auto import tqdm

    from ldm import inference, outputs
    from ldm.sampling_cli import apply_sampler_config, check_sampler_args
    from ldm.weights.load import load_weights

    run_dir = Path(args.run_dir)
    args.ckpt = str(run_dir)
    check_sampler_args(args)
    prompts = args.prompt or []
    if args.from_file:
        prompts += outputs.read_prompts(None, args.from_file)
    if not prompts:
        raise ConfigError("give the prompts to follow: --prompt TEXT (repeatable) or --from-file FILE")
    ckpts = run_checkpoints(run_dir)
    device = inference.pick_device(args.device)
    dtype = inference.pick_dtype(args.precision or "auto", device)
    frames, model = [[] for _ in prompts], None
    for path, step, epoch in tqdm(ckpts, unit="ckpt", desc="checkpoints"):
        if model is None:
            model = inference.load(str(path), None, device, dtype, ema=not args.no_ema)
            apply_sampler_config(model, args)
            height, width = args.H or model.default_image_size(), args.W or model.default_image_size()
            inference.warn(inference.truncation_warnings(model, prompts))
        else:  # same run, same architecture: swap the weights in rather than rebuilding the model
            load_weights(model, path, ema=not args.no_ema)
        for i, prompt in enumerate(prompts):
            images = inference.txt2img(model, [prompt], height, width, args.negative_prompt,
                                       torch.Generator("cpu").manual_seed(args.seed + i), args.sampler,
                                       args.ddim_steps, args.scale, args.ddim_eta)
            frames[i].append(outputs.captioned(inference.to_uint8(images)[0], f"step {step}  epoch {epoch}"))
    outdir = Path(args.outdir or run_dir / "gifs")
    outdir.mkdir(parents=True, exist_ok=True)
    written = [outputs.save_gif(f, outdir / f"{i:02}-{outputs.slug(p)}.gif", args.duration)
               for i, (p, f) in enumerate(zip(prompts, frames))]
    print(f"wrote {len(written)} GIFs to {outdir}/ ({len(ckpts)} checkpoints, steps {ckpts[0][1]}..{ckpts[-1][1]})")
    return written


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(denoise_gif if args.command == "denoise" else checkpoint_gifs, args)


if __name__ == "__main__":
    sys.exit(main())
