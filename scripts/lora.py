#!/usr/bin/env python
"""LoRA adapters after training: fold one into a full Stable Diffusion folder, or extract one from a checkpoint.

    # the adapter a LoRA run writes to <run dir>/lora/ (either file), merged into its base model for export:
    python scripts/lora.py merge --base models/stable-diffusion-v1-5 \\
        --lora logs/<run>/lora/sks-dog.safetensors --out models/sd15-sks-dog [--scale 1.0]
    # a LoRA training checkpoint -> out/sks-dog.safetensors (kohya layout) + out/pytorch_lora_weights.safetensors:
    python scripts/lora.py extract --ckpt logs/<run>/checkpoints/last.ckpt --out out/sks-dog.safetensors

``merge`` uses diffusers itself (``load_lora_weights`` + ``fuse_lora`` + ``unload_lora_weights``), so the merged
folder samples exactly like the base folder with the adapter loaded at ``--scale``. It takes both layouts: ours,
or one downloaded from Civitai or the Hub (kohya / A1111 names are converted by diffusers).
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local; never wait on the Hub

from ldm.lora_files import for_another_model  # noqa: E402
from ldm.util import ConfigError, run_cli  # noqa: E402


def merge(base: Path, lora: Path, out: Path, scale: float = 1.0) -> Path:
    from diffusers import StableDiffusionPipeline

    if not lora.is_file():
        raise ConfigError(f"LoRA file {str(lora)!r} does not exist")
    pipe = StableDiffusionPipeline.from_pretrained(str(base), safety_checker=None, requires_safety_checker=False)
    try:
        pipe.load_lora_weights(str(lora.parent), weight_name=lora.name, adapter_name="lora")
    except RuntimeError as err:
        raise for_another_model(err, lora, f"the base is {base}") from None
    pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=scale)
    pipe.unload_lora_weights()
    pipe.save_pretrained(str(out), safe_serialization=True)
    return out


def extract(ckpt: Path, out: Path) -> dict[str, Path]:
    """Rebuild the checkpoint's model from the run's config (``<run>/configs/*-project.yaml``), then save its adapter
    in both layouts: ``out`` (``NAME.safetensors``: kohya layout, beside diffusers' file) or into the folder ``out``
    (named after the run)."""
    from ldm.config import load_yaml, to_container
    from ldm.lora import has_lora, run_name, save_lora_files
    from ldm.weights.files import read_pickle
    from ldm.util import instantiate_from_config

    configs = sorted((ckpt.parent.parent / "configs").glob("*-project.yaml"))
    if not configs:
        raise ConfigError(f"no <run>/configs/*-project.yaml next to {str(ckpt)!r}; is it a run dir checkpoint?")
    cfg = to_container(load_yaml(configs[-1]).model)
    model = instantiate_from_config(cfg)
    if not has_lora(model.unet):
        raise ConfigError(f"{str(configs[-1])!r} trains no LoRA (model.params.lora is not set)")
    model.load_state_dict(read_pickle(ckpt)["state_dict"])  # weights_only: no code in a checkpoint ever runs
    if out.suffix == ".safetensors":
        return save_lora_files(model, out.parent, out.stem)
    return save_lora_files(model, out, run_name(ckpt.parent.parent))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("merge", help="fold an adapter into a diffusers folder")
    m.add_argument("--base", type=Path, required=True, help="diffusers Stable Diffusion folder the adapter was trained on")
    m.add_argument("--lora", type=Path, required=True, help="adapter .safetensors (kohya / A1111 or diffusers layout)")
    m.add_argument("--out", type=Path, required=True, help="folder for the merged pipeline")
    m.add_argument("--scale", type=float, default=1.0, help="adapter strength folded in (1.0: as trained)")
    e = sub.add_parser("extract", help="write the adapter of a LoRA training checkpoint")
    e.add_argument("--ckpt", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True,
                   help="NAME.safetensors (kohya layout; diffusers' pytorch_lora_weights.safetensors goes beside it) "
                        "or a folder for both")
    args = p.parse_args(argv)
    if args.command == "merge":
        return run_cli(lambda: print(f"merged into {merge(args.base, args.lora, args.out, args.scale)}"))
    return run_cli(lambda: print("\n".join(f"wrote {path} ({layout} layout)"
                                           for layout, path in extract(args.ckpt, args.out).items())))


if __name__ == "__main__":
    sys.exit(main())
