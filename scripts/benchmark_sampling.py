#!/usr/bin/env python
"""Time this project's txt2img against diffusers' StableDiffusionPipeline on the same weights, in one process.

Both load the same diffusers folder (default: a tiny random SD-v1-shaped one written to a temporary folder) and
sample the same prompts with the same scheduler settings, steps, guidance scale, batch, size, seed and
precision, end to end: prompt encoding, the denoising loop, VAE decoding and conversion to PIL images. The
pipeline's progress bar is off and so is ours. The two alternate, ``--repeats`` times each after one untimed
warm-up; the medians of wall time and of process CPU time (which other processes on a shared machine disturb
far less; use ``--threads 1`` there) are printed with the ratios, each the median of the per-pair ratios (a pair
runs back to back, so a change in the machine's load hits both), target <= 1.0, and the maximum absolute
difference of the images.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/benchmark_sampling.py --steps 20 --batch 2 --repeats 5
    .venv/bin/python scripts/benchmark_sampling.py --ckpt models/sd-v1-5 --size 512 --precision fp16   # on a GPU
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # import this project's ldm from anywhere
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # every model is local; never wait on the Hub

from ldm.util import ConfigError, run_cli  # noqa: E402

TARGET = 1.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark_sampling.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default=None, help="a diffusers folder (default: a tiny random one, built on the fly)")
    p.add_argument("--steps", type=int, default=20, help="sampling steps (default: 20)")
    p.add_argument("--batch", type=int, default=2, help="images per call (default: 2)")
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: the model's)")
    p.add_argument("--sampler", default="ddim", help="ddim, plms, pndm, dpm++, euler, euler_a, ddpm (default: ddim)")
    p.add_argument("--scale", type=float, default=7.5, help="guidance scale (default: 7.5)")
    p.add_argument("--repeats", type=int, default=5, help="timed calls per side (default: 5)")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, mps, cpu")
    p.add_argument("--precision", default="auto", help="auto (fp16 on CUDA, fp32 elsewhere), fp32, fp16, bf16")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return p


def timed(fn, device) -> tuple[tuple[float, float], object]:
    """(wall seconds, process CPU seconds) of one call, and what it returned."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - wall, time.process_time() - cpu), out


def report(ours: list[tuple[float, float]], theirs: list[tuple[float, float]], diff: float) -> str:
    """Median wall and CPU milliseconds per call of each side and the median per-pair ratios ours / theirs."""
    (a, ac), (b, bc) = [[statistics.median(x) * 1e3 for x in zip(*side)] for side in (ours, theirs)]
    ratio, cpu_ratio = [statistics.median(o[i] / t[i] for o, t in zip(ours, theirs)) for i in (0, 1)]
    return (f"this project: {a:9.1f} ms per call (CPU {ac:.1f} ms), median of {len(ours)}\n"
            f"diffusers:    {b:9.1f} ms per call (CPU {bc:.1f} ms), median of {len(theirs)}\n"
            f"ratio {ratio:.3f} (this project / diffusers; target <= {TARGET:.1f}; CPU time {cpu_ratio:.3f})\n"
            f"images: maximum absolute difference {diff:.0f}/255")


def benchmark(args, folder: Path) -> str:
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from ldm import inference
    from ldm.sampling import SAMPLERS

    if args.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if args.steps < 1 or args.batch < 1 or args.repeats < 1:
        raise ConfigError("--steps, --batch and --repeats must be at least 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = inference.pick_device(args.device)
    dtype = inference.pick_dtype(args.precision, device)
    model = inference.load(str(folder), None, device, dtype)
    size = args.size or model.default_image_size()
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), dtype=dtype, safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    # The sampler swapped in as diffusers documents: built from the folder's own scheduler config.
    cls, extra = SAMPLERS[args.sampler]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **extra)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"a photo of a cat number {i}" for i in range(args.batch)]
    negative = ["blurry"] * args.batch

    def ours():
        images = inference.txt2img(model, prompts, size, size, "blurry", torch.Generator("cpu").manual_seed(0),
                                   args.sampler, args.steps, args.scale)
        return [Image.fromarray(a) for a in inference.to_uint8(images)]

    def theirs():
        return pipe(prompts, height=size, width=size, num_inference_steps=args.steps, guidance_scale=args.scale,
                    negative_prompt=negative, generator=torch.Generator("cpu").manual_seed(0)).images

    times, images = {ours: [], theirs: []}, {}
    for fn in (ours, theirs):
        fn()  # warm-up: kernels, allocator, caches
    for _ in range(args.repeats):
        for fn in (ours, theirs):
            seconds, images[fn] = timed(fn, device)
            times[fn].append(seconds)
    diff = float(max(np.abs(np.asarray(a, float) - np.asarray(b, float)).max()
                     for a, b in zip(images[ours], images[theirs])))
    head = (f"txt2img benchmark: {folder}, {args.sampler} {args.steps} steps, batch {args.batch}, {size}x{size}, "
            f"scale {args.scale:g}, {inference.precision_name(dtype)} on {device.type}, "
            f"{torch.get_num_threads()} threads")
    return head + "\n" + report(times[ours], times[theirs], diff)


def run(args) -> None:
    if args.ckpt:
        print(benchmark(args, Path(args.ckpt)))
        return
    sys.path.insert(0, str(REPO / "scripts"))
    from make_tiny_sd import TINY_CONFIG, make_pipeline_folder

    with tempfile.TemporaryDirectory() as tmp:
        make_pipeline_folder(TINY_CONFIG, Path(tmp) / "tiny-sd")
        print(benchmark(args, Path(tmp) / "tiny-sd"))


def main(argv=None) -> int:
    return run_cli(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
