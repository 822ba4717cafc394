"""The command lines of scripts/txt2img.py and scripts/img2img.py (CompVis's flags plus a few), and the flags
the guidance sweep, GIF and image-variations scripts share with them.

Seeds: batch ``k`` (counting over ``--n_iter`` and the batches of a ``--from-file``) is drawn from
``torch.Generator("cpu").manual_seed(seed + k)``, which draws its whole ``(n_samples, 4, h, w)`` start noise at
once, as diffusers does with that generator and ``num_images_per_prompt=n_samples``. ``--fixed_code`` gives
every batch ``seed`` itself, so every batch starts from the same noise. Each PNG records its batch's seed, the
batch size and its index in the batch; ``--from-png`` redraws that batch and keeps that image.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ldm.util import ConfigError, run_cli

SAMPLER_HELP = "ddim, plms/pndm, dpm++ (DPM-Solver++ 2M), euler, euler_a (Euler ancestral), ddpm"


def add_weights_args(p: argparse.ArgumentParser) -> None:
    """Which weights to sample with and where: ``--ckpt``, ``--config``, ``--device``, ``--no_ema``."""
    p.add_argument("--ckpt", default=None,
                   help="a run dir, training .ckpt, diffusers folder or single .ckpt/.safetensors")
    p.add_argument("--config", default=None, help="model YAML (or diffusers folder) for a single file without one")
    p.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cuda, cuda:1, mps, cpu")
    p.add_argument("--no_ema", action="store_true", help="sample with the raw weights, not the EMA copy")


def add_model_args(p: argparse.ArgumentParser) -> None:
    """``add_weights_args``, plus ``--precision`` and a LoRA adapter (``--lora``, ``--lora_scale``)."""
    add_weights_args(p)
    p.add_argument("--precision", default=None, help="auto (fp16 on CUDA, fp32 elsewhere; CompVis's 'autocast'), "
                   "full/fp32, fp16, bf16 (default: auto)")
    p.add_argument("--lora", default=None, metavar="FILE",
                   help="a LoRA adapter .safetensors, kohya / A1111 or diffusers layout (e.g. <run>/lora/<name>.safetensors)")
    p.add_argument("--lora_scale", type=float, default=1.0, help="strength of the --lora adapter (default: 1.0)")


def add_steps_args(p: argparse.ArgumentParser, scale: float = 7.5) -> None:
    """How to sample: ``--sampler`` (or ``--plms``), ``--ddim_steps``, ``--ddim_eta``, ``--scale``."""
    p.add_argument("--sampler", default="ddim", help=f"{SAMPLER_HELP} (default: ddim)")
    p.add_argument("--plms", action="store_true", help="same as --sampler plms")
    p.add_argument("--dpm_solver", action="store_true", help="same as --sampler dpm++ (CompVis's DPM-Solver++ 2M)")
    p.add_argument("--ddim_steps", type=int, default=50, help="number of sampling steps, for any sampler (default: 50)")
    p.add_argument("--ddim_eta", type=float, default=0.0, help="DDIM eta; 0 = deterministic (default: 0)")
    p.add_argument("--scale", type=float, default=scale,
                   help=f"guidance scale; <= 1 turns guidance off (default: {scale})")
    p.add_argument("--sampler_config", nargs="+", default=[], type=sampler_setting, metavar="KEY=VALUE",
                   help="diffusers scheduler settings over the model's own (model.params.sampler_config), e.g. "
                        "clip_sample=true timestep_spacing=trailing rescale_betas_zero_snr=true")


def sampler_setting(item: str) -> tuple[str, object]:
    """``KEY=VALUE`` with a YAML value (true, 1, 0.5, trailing)."""
    import yaml

    key, sep, value = item.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{item!r} is not KEY=VALUE (e.g. clip_sample=true)")
    return key, yaml.safe_load(value)


def apply_sampler_config(model, args) -> None:
    """``--sampler_config`` over the model's recorded settings, for every sampler the script builds."""
    from ldm.sampling import check_sampler_keys

    given = dict(getattr(args, "sampler_config", None) or [])
    check_sampler_keys(given, "--sampler_config")
    model.sampler_config = {**model.sampler_config, **given}


def add_sampler_args(p: argparse.ArgumentParser, scale: float = 7.5) -> None:
    """``add_steps_args`` for text prompts: with ``--negative_prompt`` and the image size ``--H``/``--W``."""
    p.add_argument("--negative_prompt", default="", help="what guidance steers away from (default: '')")
    add_steps_args(p, scale)
    p.add_argument("--H", type=int, default=None, help="image height, a multiple of 8 (default: the model's size)")
    p.add_argument("--W", type=int, default=None, help="image width, a multiple of 8 (default: the model's size)")
    # CompVis's latent shape flags: the model already knows both, so they are only checked against it.
    p.add_argument("--C", type=int, default=None, help="latent channels (CompVis's flag; checked against the model)")
    p.add_argument("--f", type=int, default=None, help="downsampling factor (CompVis's flag; checked against the model)")
    p.add_argument("--laion400m", action="store_true", help=argparse.SUPPRESS)  # CompVis's LDM model: refused


def build_parser(img2img: bool) -> argparse.ArgumentParser:
    name = "img2img" if img2img else "txt2img"
    p = argparse.ArgumentParser(prog=f"{name}.py", description=sys.modules[__name__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompt", default=None, help="the prompt; '' samples unconditionally")
    p.add_argument("--from-file", "--from_file", dest="from_file", default=None,
                   help="prompts, one a line, sampled in batches of --n_samples")
    p.add_argument("--outdir", default=f"outputs/{name}-samples", help="writes samples/NNNNN.png and grid-NNNN.png")
    p.add_argument("--n_samples", type=int, default=3, help="batch size (default: 3)")
    p.add_argument("--n_iter", type=int, default=2, help="number of batches per prompt (default: 2)")
    p.add_argument("--n_rows", type=int, default=0, help="images per grid row (default: --n_samples)")
    p.add_argument("--seed", type=int, default=42, help="seed of the first batch; batch k uses seed + k (default: 42)")
    p.add_argument("--fixed_code", action="store_true", help="every batch starts from the same noise (seed)")
    p.add_argument("--skip_grid", action="store_true", help="do not write the grid")
    p.add_argument("--skip_save", action="store_true", help="do not write the single samples")
    p.add_argument("--from-png", "--from_png", dest="from_png", default=None, metavar="PNG",
                   help="redraw the image PNG (a sample of these scripts) from the settings it carries")
    add_model_args(p)
    add_sampler_args(p, scale=5.0 if img2img else 7.5)
    if img2img:
        p.add_argument("--init-img", "--init_img", dest="init_img", default=None, help="the image to start from")
        p.add_argument("--strength", type=float, default=0.75,
                       help="how much to change the image, 0..1; 1 starts from (nearly) pure noise (default: 0.75)")
    return p


def check_steps_args(args) -> None:
    """``add_steps_args``' one-line refusals (``--plms`` becomes ``--sampler plms``, ``--dpm_solver`` dpm++)."""
    from ldm.sampling import SAMPLERS

    if args.plms:
        args.sampler = "plms"
    if getattr(args, "dpm_solver", False):
        args.sampler = "dpm++"
    if args.sampler not in SAMPLERS:
        raise ConfigError(f"unknown sampler {args.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if args.ddim_steps < 1:
        raise ConfigError(f"--ddim_steps must be at least 1, got {args.ddim_steps}")


def check_sampler_args(args) -> None:
    """The one-line refusals that need no model."""
    from ldm.outputs import check_size

    check_steps_args(args)
    check_size(args.H, args.W)
    if getattr(args, "laion400m", False):
        raise ConfigError("--laion400m: CompVis's LAION-400M LDM model is not a Stable Diffusion checkpoint; "
                          "give --ckpt and --config of the model to sample")
    if args.ckpt is None:
        raise ConfigError("give the model to sample with: --ckpt RUN_DIR|CKPT|DIFFUSERS_FOLDER")


def apply_png(args, img2img: bool) -> int:
    """Fill ``args`` from ``--from-png``'s settings (model, precision and init image only where not given) and
    return the image's index in its batch."""
    from ldm.outputs import file_sha256, read_png_meta

    meta = read_png_meta(args.from_png)
    kind = "img2img" if img2img else "txt2img"
    if meta.get("kind") == "grid":
        raise ConfigError(f"{args.from_png!r} is a grid; --from-png takes one of the samples/NNNNN.png")
    if meta.get("kind") != kind:
        raise ConfigError(f"{args.from_png!r} is a {meta.get('kind')} sample; redraw it with {meta.get('kind')}.py")
    args.prompt, args.from_file, args.negative_prompt = meta["prompt"], None, meta["negative_prompt"]
    args.seed, args.n_samples, args.n_iter, args.fixed_code = meta["seed"], meta["batch_size"], 1, False
    args.H, args.W, args.scale, args.sampler = meta["height"], meta["width"], meta["scale"], meta["sampler"]
    args.plms = args.dpm_solver = False
    args.ddim_steps, args.ddim_eta, args.skip_grid, args.skip_save = meta["steps"], meta["eta"], True, False
    args.ckpt, args.config = args.ckpt or meta["model"], args.config or meta.get("config")
    args.precision, args.no_ema = args.precision or meta["precision"], not meta["ema"]
    args.lora, args.lora_scale = args.lora or meta.get("lora"), meta.get("lora_scale", args.lora_scale)
    args.sampler_config = list((meta.get("sampler_config") or {}).items()) or args.sampler_config
    if img2img:
        args.strength = meta["strength"]
        if args.init_img is None:
            args.init_img = meta["init_image"]
            if Path(args.init_img).is_file() and file_sha256(args.init_img) != meta["init_image_sha256"]:
                print(f"warning: {args.init_img} changed since {args.from_png} was made; the image will differ",
                      file=sys.stderr)
    return meta["batch_index"]


def compvis_config(args):
    """``--config`` as the model loader takes it: a YAML written for CompVis (v1-inference.yaml) translated to this
    project's model section (``ldm.compvis``), anything else as given. CompVis samples inside the model's EMA
    scope, so its ``use_ema: False`` means the raw weights, as ``--no_ema`` does here."""
    if not args.config:
        return args.config
    from ldm.compvis import model_section_of

    section, done = model_section_of(args.config)
    if section is None:
        return args.config
    print("\n".join(done.lines()), file=sys.stderr)
    if not section["params"]["use_ema"] and not args.no_ema:
        args.no_ema = True
        print(f"compvis: {args.config} sets use_ema: False: sampling with the raw weights", file=sys.stderr)
    return section


def check_latent_flags(model, args) -> None:
    """CompVis's ``--C`` (latent channels) and ``--f`` (downsampling factor) must be the model's own."""
    first = model.first_stage_model
    for flag, given, own in (("--C", getattr(args, "C", None), first.latent_channels),
                             ("--f", getattr(args, "f", None), first.downsample)):
        if given is not None and given != own:
            raise ConfigError(f"{flag} {given}: the model's is {own} (drop the flag; the model knows it)")


def sample_settings(args, kind: str, height: int, width: int, dtype, device) -> dict:
    """What a sample's PNG records besides its prompt and seed: everything needed to draw it again."""
    from ldm.inference import precision_name

    settings = {"kind": kind, "negative_prompt": args.negative_prompt, "steps": args.ddim_steps, "scale": args.scale,
                "sampler": args.sampler, "eta": args.ddim_eta, "size": f"{width}x{height}", "height": height,
                "width": width, "model": str(Path(args.ckpt).resolve()), "ema": not args.no_ema,
                "precision": precision_name(dtype), "device": device.type}
    if args.config:
        settings["config"] = str(Path(args.config).resolve())
    if args.lora:
        settings.update(lora=str(Path(args.lora).resolve()), lora_scale=args.lora_scale)
    if args.sampler_config:
        settings["sampler_config"] = dict(args.sampler_config)
    return settings


def run(args, img2img: bool) -> list[Path]:
    """Sample as the flags say; returns the paths written."""
    import torch
    from tqdm.auto import tqdm

    from ldm import inference, outputs

    keep = apply_png(args, img2img) if args.from_png else None
    check_sampler_args(args)
    prompts = outputs.read_prompts(args.prompt, args.from_file)
    if img2img:
        if args.init_img is None:
            raise ConfigError("give the image to start from: --init-img PATH")
        if not 0.0 <= args.strength <= 1.0:
            raise ConfigError(f"--strength must be between 0 and 1, got {args.strength}")
        init = outputs.load_init_image(args.init_img, args.H, args.W)
    if args.n_samples < 1 or args.n_iter < 1:
        raise ConfigError("--n_samples and --n_iter must be at least 1")
    device = inference.pick_device(args.device)
    dtype = inference.pick_dtype(args.precision or "auto", device)
    model = inference.load(args.ckpt, compvis_config(args), device, dtype, ema=not args.no_ema, lora=args.lora,
                           lora_scale=args.lora_scale)
    check_latent_flags(model, args)
    apply_sampler_config(model, args)
    if img2img:
        width, height = init.size
        init_x = outputs.image_to_tensor(init, inference.image_channels(model))
    else:
        height, width = args.H or model.default_image_size(), args.W or model.default_image_size()
    inference.warn(inference.truncation_warnings(model, prompts))
    n = args.n_samples
    batches = [prompts * n] if args.from_file is None else [prompts[i:i + n] for i in range(0, len(prompts), n)]
    settings = sample_settings(args, "img2img" if img2img else "txt2img", height, width, dtype, device)
    if img2img:
        settings.update(init_image=str(Path(args.init_img).resolve()), strength=args.strength,
                        init_image_sha256=outputs.file_sha256(args.init_img))
    outdir, written, cells = Path(args.outdir), [], []
    samples = outdir / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    number = outputs.next_number(samples, r"(\d{5})\.png")
    total = args.n_iter * len(batches)
    bar = tqdm(total=args.n_iter * len(prompts) * (n if args.from_file is None else 1), unit="img",
               desc=settings["kind"])
    n_steps = min(int(args.ddim_steps * args.strength), args.ddim_steps) if img2img else args.ddim_steps
    for k in range(total):
        batch, seed = batches[k % len(batches)], args.seed if args.fixed_code else args.seed + k
        steps_bar = tqdm(total=n_steps, unit="step", leave=False)
        common = dict(negative_prompt=args.negative_prompt, generator=torch.Generator("cpu").manual_seed(seed),
                      sampler=args.sampler, steps=args.ddim_steps, scale=args.scale, eta=args.ddim_eta,
                      on_step=lambda *_: steps_bar.update())
        if img2img:
            images = inference.img2img(model, init_x, batch, args.strength, **common)
        else:
            images = inference.txt2img(model, batch, height, width, **common)
        steps_bar.close()
        for j, image in enumerate(inference.to_uint8(images)):
            bar.update()
            if keep is not None and j != keep:
                continue
            cells.append(image)
            if not args.skip_save:
                meta = {"prompt": batch[j], **settings, "seed": seed, "batch_size": len(batch), "batch_index": j}
                written.append(outputs.write_png(samples / f"{number:05}.png", image, meta))
                number += 1
    bar.close()
    if not args.skip_grid:
        g = outdir / "grid-{:04}.png".format(outputs.next_number(outdir, r"grid-(\d{4})\.png"))
        meta = {"prompt": " | ".join(dict.fromkeys(prompts)), "prompts": prompts, **settings, "kind": "grid",
                "seed": args.seed, "seeds": [args.seed if args.fixed_code else args.seed + k for k in range(total)],
                "n_samples": n, "n_iter": args.n_iter, "fixed_code": args.fixed_code}
        written.append(outputs.write_png(g, outputs.image_grid(cells, args.n_rows or n), meta))
    print(f"wrote {len(written)} images to {outdir}/ ({settings['size']}, {args.sampler}, {args.ddim_steps} steps, "
          f"scale {args.scale:g}, seed {args.seed}, {settings['precision']} on {device.type})")
    return written


def main(argv: list[str] | None, img2img: bool) -> int:
    return run_cli(run, build_parser(img2img).parse_args(argv), img2img)
