#!/usr/bin/env python
"""Print, as a markdown table, the accelerator memory that a config's model needs for its weights, gradients,
optimizer state and EMA with each optimizer option, by exact arithmetic from its parameter shapes.

    python scripts/memory_table.py                                  # SD v1 (configs/architectures/sd-v1.yaml)
    python scripts/memory_table.py --config configs/pokemon.yaml model.params.trainable=attn2

The model is built on PyTorch's meta device (shapes only: no weights read, no memory used). Counted, all fp32 as
this project keeps them under bf16/fp16 mixed precision: every weight (UNet, first stage, conditioner), a
gradient per trained weight, the optimizer's state tensors, and one EMA copy of the trained weights. Not counted:
activations, which depend on batch size, resolution and gradient checkpointing, and the bf16 copies autocast makes
on the fly. These figures do not depend on the image size.

Optimizer state per trained tensor of n values: AdamW two fp32 moments (8n bytes) and a 4-byte step;
bitsandbytes' AdamW8bit two uint8 states and one fp32 absmax per 256 values each (2n + 8*ceil(n/256)), fp32
moments for tensors under 4096 values, and two shared 256-entry maps; Adafactor (no first moment, as
transformers' default) a row and a column fp32 average for tensors of 2 or more dimensions (over the last two
dimensions, so a 3x3 convolution keeps 2/3 of a full one) and a full one otherwise, and a 4-byte RMS; Prodigy four fp32 tensors (16n: two moments, s and the starting weights p0).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python scripts/memory_table.py` from anywhere: import this project's ldm
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from ldm.util import ConfigError, run_cli  # noqa: E402

SD_V1 = ROOT / "configs" / "architectures" / "sd-v1.yaml"
UNITS = {"GiB": 2 ** 30, "MiB": 2 ** 20, "B": 1}
OPTIMIZERS = ("AdamW", "AdamW8bit", "Adafactor", "Prodigy")
FP32 = 4


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="memory_table.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(SD_V1), metavar="YAML",
                   help=f"config whose model section is counted (default: {SD_V1.relative_to(ROOT)})")
    p.add_argument("--unit", choices=list(UNITS), default="GiB", help="unit of the table (default: GiB)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, as for main.py")
    return p


def optimizer_state_bytes(name: str, shapes: list[tuple[int, ...]]) -> int:
    """Bytes of the state tensors ``name`` keeps for parameters of these shapes (see the module docstring)."""
    total = 0
    for shape in shapes:
        n = math.prod(shape)
        if name == "AdamW":
            total += 2 * FP32 * n + FP32
        elif name == "AdamW8bit":
            total += 2 * FP32 * n if n < 4096 else 2 * n + 2 * FP32 * math.ceil(n / 256)
        elif name == "Adafactor":
            factored = len(shape) >= 2
            total += FP32 * (math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1] if factored else n) + FP32
        elif name == "Prodigy":
            total += 4 * FP32 * n
        else:
            raise ValueError(f"unknown optimizer {name!r}")
    if name == "AdamW8bit" and any(math.prod(s) >= 4096 for s in shapes):
        total += 2 * 256 * FP32  # the signed and unsigned quantization maps, shared by every tensor
    return total


def count(model) -> dict:
    parts = {"UNet": model.unet, "text encoder": model.cond_stage_model, "first stage": model.first_stage_model}
    sizes = {name: sum(p.numel() for p in part.parameters()) for name, part in parts.items()}
    trained = [tuple(p.shape) for p in model.parameters() if p.requires_grad]
    return {"sizes": sizes, "trained": trained}


def table(counts: dict, unit: str) -> str:
    scale = UNITS[unit]
    fmt = (lambda b: f"{b:,}") if unit == "B" else (lambda b: f"{b / scale:.2f}")
    n_all = sum(counts["sizes"].values())
    n_trained = sum(math.prod(s) for s in counts["trained"])
    weights, grads, ema = FP32 * n_all, FP32 * n_trained, FP32 * n_trained
    rows = [f"| optimizer | weights | gradients | optimizer state | EMA | total, EMA off or on the CPU | "
            f"total, EMA on the accelerator |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name in OPTIMIZERS:
        state = optimizer_state_bytes(name, counts["trained"])
        base = weights + grads + state
        rows.append(f"| {name} | {fmt(weights)} | {fmt(grads)} | {fmt(state)} | {fmt(ema)} | {fmt(base)} | "
                    f"{fmt(base + ema)} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch
    from omegaconf import OmegaConf

    from ldm.config import merge_configs
    from ldm.util import instantiate_from_config

    if not Path(args.config).is_file():
        raise ConfigError(f"--config: {args.config!r} is not a file")
    cfg = merge_configs([args.config], ["model.params.pretrained=null", *args.overrides])
    if "model" not in cfg:
        raise ConfigError(f"--config: {args.config!r} has no 'model' section")
    with torch.device("meta"):  # shapes only
        model = instantiate_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    counts = count(model)
    sizes = ", ".join(f"{name} {n:,}" for name, n in counts["sizes"].items())
    n_trained = sum(math.prod(s) for s in counts["trained"])
    shown = os.path.relpath(args.config) if Path(args.config).resolve().is_relative_to(ROOT) else args.config
    print(f"{shown}: {sizes} parameters; {n_trained:,} trained in {len(counts['trained'])} tensors ({args.unit})")
    print()
    print(table(counts, args.unit))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
