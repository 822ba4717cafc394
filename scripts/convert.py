#!/usr/bin/env python
"""Export trained weights for other tools: a diffusers pipeline folder and/or an original-layout single file.

SOURCE is a run dir (logs/<run>, meaning its checkpoints/last.ckpt), a training checkpoint (.ckpt), or any
weights this project loads (a diffusers folder, an original SD v1/2.x .ckpt/.safetensors, an earlier export).

  # both formats from the last checkpoint of a run, EMA weights, fp16 (a full SD v1 single file is ~2 GB)
  python scripts/convert.py logs/2024-05-01T12-00-00_pokemon --diffusers out/pokemon --single-file out/pokemon.safetensors --half

  # raw (non-EMA) weights of one epoch, fp32, single file only
  python scripts/convert.py logs/<run>/checkpoints/epoch=000024.ckpt --no-ema --single-file out/e24.safetensors

  # an original SD 2.x file to a diffusers folder (the file holds no architecture: name its config)
  python scripts/convert.py v2-1_768-ema-pruned.safetensors --config configs/sd-v2-768-v.yaml --diffusers out/sd21

Outputs hold weights only (no optimizer state, one UNet):
  --diffusers DIR     unet/ vae/ text_encoder/ tokenizer/ scheduler/ model_index.json, loadable offline with
                      StableDiffusionPipeline.from_pretrained(DIR); sd_finetune.json records the provenance.
  --single-file FILE  one .safetensors in the original CompVis layout (model.diffusion_model.*,
                      first_stage_model.*, cond_stage_model.transformer.text_model.* for SD v1 or
                      cond_stage_model.model.* for SD 2.x) for AUTOMATIC1111, ComfyUI and diffusers'
                      from_single_file(FILE, config=<a diffusers folder of the same model>).
  --hub DIR           a folder ready for the Hugging Face Hub: the diffusers pipeline in fp32 plus the fp16 variant
                      (from_pretrained(DIR, variant="fp16")), the single file (fp16), a LoRA run's adapter in the
                      kohya / A1111 and diffusers layouts, and a README.md model card (base model, licence, tags,
                      trigger prompt, training settings from the run's config, the run's newest sample grids).
                      --push USER/MODEL uploads it (one huggingface_hub call); otherwise it prints the command.
Both record the source, training step, EMA choice and the model config in their safetensors metadata
(keys sd_finetune.*); load_model(FILE) in this project reads the architecture back from there.

  # a DreamBooth LoRA run, ready to upload (then: hf upload me/sks-dog out/sks-dog)
  python scripts/convert.py logs/<run> --hub out/sks-dog [--push me/sks-dog]
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python scripts/convert.py` from anywhere: import this project's ldm
if "--push" not in sys.argv:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the Hub

from ldm.util import ConfigError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="convert.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", metavar="SOURCE", help="run dir, training .ckpt, diffusers folder or original single file")
    p.add_argument("--diffusers", metavar="DIR", help="write a diffusers StableDiffusionPipeline folder here")
    p.add_argument("--single-file", metavar="FILE", help="write an original-layout .safetensors here")
    p.add_argument("--hub", metavar="DIR", help="write a Hub-ready folder here (pipeline fp32 + fp16, single file, "
                                                "LoRA files of a LoRA run, model card)")
    p.add_argument("--push", metavar="REPO_ID", help="with --hub: upload the folder to this Hub model repo")
    p.add_argument("--name", help="file names in --hub (default: the run's name)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="--ema: the EMA UNet weights (an error if SOURCE has none); --no-ema: the raw training "
                        "weights; default: EMA when SOURCE has it, else raw")
    p.add_argument("--half", action="store_true", help="store floating-point tensors as fp16 (half the size)")
    p.add_argument("--config", metavar="YAML|DIR",
                   help="architecture for sources that hold none (original SD 2.x files): a YAML with a model "
                        "section (configs/sd-v2.yaml, configs/sd-v2-768-v.yaml) or a diffusers folder")
    p.add_argument("--force", action="store_true", help="replace an existing --diffusers or --hub folder")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def size(path: Path) -> int:
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def convert(args) -> None:
    if args.hub:
        return hub(args)
    if args.push:
        raise ConfigError("--push uploads a --hub folder; give --hub DIR too")
    if not args.diffusers and not args.single_file:
        raise ConfigError("nothing to write: give --diffusers DIR and/or --single-file FILE.safetensors, or --hub DIR")
    if args.single_file and not args.single_file.endswith(".safetensors"):
        raise ConfigError(f"--single-file {args.single_file}: the file name must end in .safetensors")
    from ldm.weights import export_diffusers, export_single_file, prepare

    start = time.time()
    item = prepare(args.source, ema=args.ema, config=args.config)
    info = item.info
    print(f"source {info['source']} ({info['kind']}), step {info['step'] or '-'}, "
          f"{'EMA' if info['ema'] == 'true' else 'raw'} weights, {'fp16' if args.half else 'fp32'}")
    written = []
    if args.single_file:
        written.append(export_single_file(item, args.single_file, half=args.half, progress=not args.quiet))
    if args.diffusers:
        written.append(export_diffusers(item, args.diffusers, half=args.half, progress=not args.quiet,
                                        force=args.force))
    for path in written:
        print(f"wrote {path} ({size(path) / 2**20:,.1f} MiB)")
    print(f"done in {time.time() - start:.1f} s")


def hub(args) -> None:
    from ldm.hub import export_hub, push, upload_hint

    if args.diffusers or args.single_file or args.half:
        raise ConfigError("--hub writes its own pipeline folder (fp32 and fp16) and single file; "
                          "drop --diffusers/--single-file/--half")
    start = time.time()
    written = export_hub(args.source, args.hub, ema=args.ema, config=args.config, name=args.name, force=args.force,
                         progress=not args.quiet)
    for role, path in written.items():
        print(f"wrote {path} ({role}, {size(path) / 2**20:,.1f} MiB)")
    print(f"done in {time.time() - start:.1f} s")
    print(f"uploaded: {push(Path(args.hub), args.push)}" if args.push else upload_hint(Path(args.hub), None))


def main(argv: list[str] | None = None) -> int:
    return run_cli(convert, build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
