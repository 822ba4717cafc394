#!/usr/bin/env python
"""Write a randomly initialised, SD-v1-shaped Stable Diffusion pipeline folder (diffusers layout).

The folder is what ``StableDiffusionPipeline.save_pretrained`` writes: unet/, vae/, text_encoder/, tokenizer/,
scheduler/ and model_index.json (no safety checker, no feature extractor). Real weights cannot be downloaded
everywhere; a folder with the same layout and classes lets every code path that reads weights run offline:

    python scripts/make_tiny_sd.py --out models/tiny-sd
    python main.py -t --base configs/tiny/tiny-sd.yaml configs/tiny/tiny-train.yaml \\
        model.params.pretrained=models/tiny-sd data.params.train.params.root=<image folder>
    python main.py -t --base ... --finetune_from models/tiny-sd

The networks are built by the project's own LatentDiffusion from a config's ``model`` section (the same
classes and architecture that training uses), then saved with diffusers/transformers ``save_pretrained``.
So ``model.params.pretrained=<out>`` with that config loads the folder back, and
``StableDiffusionPipeline.from_pretrained(<out>)`` loads it too. The tokenizer is OpenAI CLIP's, rebuilt
offline (ldm/models/tokenizer.py); the scheduler is PNDM with SD v1's published settings.

``--full-size`` uses configs/architectures/sd-v1.yaml instead: real SD v1 shapes (about 1.07 billion
parameters, 4.3 GB on disk), random weights.

``--sdxl`` writes a tiny SDXL-shaped ``StableDiffusionXLPipeline`` folder instead (configs/tiny/tiny-sdxl.yaml:
unet/ with text_time added embeddings, vae/, text_encoder/ + tokenizer/, text_encoder_2/ + tokenizer_2/, and
SDXL's published Euler scheduler); ``--sdxl --full-size`` uses configs/architectures/sdxl.yaml (3.5 billion
parameters, 14 GB).
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python scripts/make_tiny_sd.py` from anywhere: import this project's ldm
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the Hub

from ldm.util import ConfigError, run_cli  # noqa: E402

TINY_CONFIG = ROOT / "configs" / "tiny" / "tiny-sd.yaml"
FULL_CONFIG = ROOT / "configs" / "architectures" / "sd-v1.yaml"
TINY_SDXL_CONFIG = ROOT / "configs" / "tiny" / "tiny-sdxl.yaml"
FULL_SDXL_CONFIG = ROOT / "configs" / "architectures" / "sdxl.yaml"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="make_tiny_sd.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write (e.g. models/tiny-sd)")
    architecture = p.add_mutually_exclusive_group()
    architecture.add_argument("--config", default=None, metavar="YAML", help="config whose model section gives "
                              f"the architecture (default: {TINY_CONFIG.relative_to(ROOT)})")
    architecture.add_argument("--full-size", action="store_true",
                              help=f"use {FULL_CONFIG.relative_to(ROOT)}'s SD v1 architecture (4.3 GB written)")
    p.add_argument("--sdxl", action="store_true", help="an SDXL-shaped StableDiffusionXLPipeline folder "
                   f"({TINY_SDXL_CONFIG.relative_to(ROOT)}, or {FULL_SDXL_CONFIG.relative_to(ROOT)} with --full-size)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random initialisation (default: 0)")
    p.add_argument("--force", action="store_true", help="write into --out even if it already holds files")
    return p


def model_config(path: Path) -> dict:
    """The ``model`` section of ``path`` with ``pretrained`` cleared: the architecture alone."""
    from ldm.config import load_yaml, to_container

    cfg = load_yaml(path)
    if "model" not in cfg:
        raise ConfigError(f"config {str(path)!r} has no 'model' section")
    model = to_container(cfg.model)
    model.setdefault("params", {})["pretrained"] = None
    model["params"]["use_ema"] = False  # the folder holds no EMA; skip its copy of the UNet (3.4 GB at SD v1 size)
    for block in ("unet_config", "first_stage_config", "cond_stage_config"):
        if (model["params"].get(block) or {}).get("params", {}).get("pretrained"):
            raise ConfigError(f"{block} in {str(path)!r} names its own pretrained folder; give an architecture-only config")
    return model


def make_pipeline_folder(config: Path, out: Path, seed: int = 0, force: bool = False) -> Path:
    """Build ``config``'s LatentDiffusion with random weights and save it as a StableDiffusionPipeline folder."""
    import torch
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    from ldm.models.tokenizer import write_clip_vocab
    from ldm.util import instantiate_from_config

    if out.exists() and any(out.iterdir()) and not force:
        raise ConfigError(f"{str(out)!r} already holds files; pass --force to overwrite them")
    cfg = model_config(config)
    print(f"building the model section of {config} with seed {seed} ...", flush=True)
    start = time.time()
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg)
    print(f"  {model.summary()} ({time.time() - start:.1f} s)")
    if not model.first_stage_model.has_vae or model.cond_stage_model.kind != "text":
        raise ConfigError("a StableDiffusionPipeline needs a VAE first stage and a text conditioner, not "
                          f"{type(model.first_stage_model).__name__} and {type(model.cond_stage_model).__name__}")
    modules = {row.diffusers: row.module for row in model.weight_components()}
    # The pipeline reads the latent scale from the VAE config; keep it equal to the YAML's scale_factor.
    modules["vae"].register_to_config(scaling_factor=model.first_stage_model.scale_factor)
    # Built and saved by diffusers itself, so the folder is what diffusers writes (its scheduler_config.json keeps
    # the scheduler's own keys only), a reference independent of our export.
    pipe = _sdxl_pipeline(model, modules) if "text_encoder_2" in modules else StableDiffusionPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=model.cond_stage_model.tokenizer,
        unet=model.unet,
        # SD v1 ships PNDM (PLMS) with its schedule: steps_offset 1, set_alpha_to_one false, skip_prk_steps. Built
        # from PNDM's own keys, as diffusers writes such a folder: no clip_sample, so DDIM swapped in clips (True).
        scheduler=PNDMScheduler(**model.schedule.scheduler_config(), steps_offset=1, set_alpha_to_one=False,
                                skip_prk_steps=True),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    print(f"writing {out} ...", flush=True)
    pipe.save_pretrained(str(out), safe_serialization=True)
    # transformers 5 saves only tokenizer.json; SD folders also carry the BPE files that older loaders read.
    for name in ("tokenizer", "tokenizer_2"):
        if (out / name).is_dir():
            write_clip_vocab(out / name)
    for sub in sorted(p for p in out.iterdir() if p.is_dir()):
        size = sum(f.stat().st_size for f in sub.rglob("*") if f.is_file())
        print(f"  {sub.name + '/':16s}{size / 2**20:10.1f} MiB")
    print(f"done in {time.time() - start:.1f} s; load it with model.params.pretrained={out} "
          f"(and --base {config}) or {type(pipe).__name__}.from_pretrained({str(out)!r})")
    return out


def _sdxl_pipeline(model, modules):
    """SDXL base's pipeline: Euler with its published settings (scaled_linear 0.00085-0.012, steps_offset 1,
    leading spacing), no watermarker (an optional package), empty negative prompts as zeros (SDXL's default)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    cond = model.cond_stage_model
    scheduler = EulerDiscreteScheduler(**model.schedule.scheduler_config(), steps_offset=1,
                                       timestep_spacing="leading", interpolation_type="linear")
    return StableDiffusionXLPipeline(vae=modules["vae"], text_encoder=modules["text_encoder"],
                                     text_encoder_2=modules["text_encoder_2"], tokenizer=cond.tokenizer,
                                     tokenizer_2=cond.tokenizer_2, unet=model.unet, scheduler=scheduler,
                                     force_zeros_for_empty_prompt=True, add_watermarker=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.sdxl:
        config = Path(args.config) if args.config else FULL_SDXL_CONFIG if args.full_size else TINY_SDXL_CONFIG
    else:
        config = Path(args.config) if args.config else FULL_CONFIG if args.full_size else TINY_CONFIG
    return run_cli(make_pipeline_folder, config, Path(args.out), args.seed, args.force)


if __name__ == "__main__":
    sys.exit(main())
