#!/usr/bin/env python
"""Train or fine-tune a latent diffusion model from YAML configs.

    python main.py -t --base configs/pokemon.yaml --gpus 0,1
    python main.py -t --base configs/demo/digits.yaml lightning.trainer.max_steps=200
    python main.py -r logs/2026-01-01T00-00-00_pokemon        # continue where it stopped

Configs (``--base``, merged left to right) have three sections: ``model`` and ``data`` (``target`` + ``params``
blocks) and ``lightning`` (``trainer``, ``callbacks``, ``logger``, ``modelcheckpoint``). Trailing ``a.b.c=value``
arguments override any key; a key that does not exist is refused unless written ``+a.b.c=value``.
"""
from __future__ import annotations

import argparse
import datetime
import os
import re
import sys
from pathlib import Path

from ldm.util import ConfigError, run_cli

RUN_DIR_ENV = "SD_FINETUNE_RUN_DIR"  # shared with DDP worker processes, which re-run this script
RESUME_ENV = "SD_FINETUNE_RESUME_CKPT"  # the checkpoint rank 0 chose, for the same processes


def str2bool(v: str) -> bool:
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean, got {v!r}")


def build_parser() -> argparse.ArgumentParser:
    # exit_on_error=False: a bad flag value becomes one error line (parse_args), not argparse's usage block.
    p = argparse.ArgumentParser(prog="main.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                exit_on_error=False)
    p.add_argument("-t", "--train", action="store_true", help="train (without it, only validate/test the model)")
    p.add_argument("-b", "--base", nargs="*", metavar="config.yaml", default=[],
                   help="YAML configs, merged left to right; later files win")
    p.add_argument("-n", "--name", default="", help="run name suffix (default: the last config's file name)")
    p.add_argument("-r", "--resume", default="", metavar="RUN_DIR|CKPT",
                   help="continue a run (implies -t): global step, epoch, optimizer, LR schedule and EMA are restored")
    p.add_argument("--finetune_from", default="", metavar="PATH",
                   help="initialise weights (only) from a checkpoint or diffusers folder; missing/unexpected keys are summarised")
    p.add_argument("--finetune_ema", action="store_true",
                   help="with --finetune_from: start the UNet from the file's EMA weights when it has them (default: raw)")
    p.add_argument("-l", "--logdir", default="logs", help="where run directories are created (default: logs)")
    p.add_argument("-s", "--seed", type=int, default=23, help="global seed (default: 23)")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=False,
                   help="lr = accumulate x devices x nodes x batch x base_lr, as in CompVis (default: false)")
    p.add_argument("--no-test", dest="no_test", action="store_true", help="skip testing after training")
    p.add_argument("-d", "--debug", action="store_true", help="runs go to <logdir>/debug_runs; drop into pdb on error")
    p.add_argument("--gpus", default=None, help="GPU ids, e.g. '0,1' (DDP over those GPUs) or '0'")
    p.add_argument("--num_nodes", type=int, default=1, help="number of machines (DDP across nodes)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. lightning.trainer.max_steps=100")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    try:
        args, unknown = parser.parse_known_args(argv)
    except argparse.ArgumentError as err:
        raise ConfigError(f"{err} (see python main.py --help)") from None
    override = re.compile(r"^\+?[A-Za-z_][\w\-]*(\.[\w\-]+)*=")
    for item in unknown:
        if not override.match(item):
            raise ConfigError(f"unknown argument {item!r} (see python main.py --help)")
        args.overrides.append(item)
    # argparse may have taken overrides as --base files when they follow it.
    args.overrides = [o for o in args.base if "=" in o] + args.overrides
    args.base = [b for b in args.base if "=" not in b]
    return args


def resolve_resume(resume: str) -> tuple[Path, Path, list[Path]]:
    """A run dir or a checkpoint inside one → (run dir, checkpoint, its saved configs).

    A run dir resumes from ``checkpoints/last.ckpt``, or, when that is missing, truncated or corrupt, from the
    newest checkpoint of the run that reads whole and is a training checkpoint, saying so; a named checkpoint file
    must be one itself."""
    from ldm.callbacks.checkpoint_io import newest_readable, not_resumable_reason

    chosen = os.environ.get(RESUME_ENV)
    if chosen and os.environ.get("LOCAL_RANK", "0") != "0":
        # A DDP rank that rank 0 started: rank 0 has read and checked the checkpoint (every byte) already.
        return Path(chosen).parent.parent, Path(chosen), sorted((Path(chosen).parent.parent / "configs").glob("*.yaml"))
    path = Path(resume)
    if not path.exists():
        raise ConfigError(f"--resume: {resume!r} does not exist (give a run dir under logs/ or a .ckpt in one)")
    if path.is_file():
        logdir, ckpt = path.parent.parent, path
        problem = not_resumable_reason(ckpt)
        if problem:
            other = newest_readable(ckpt.parent, exclude=(ckpt,))
            hint = f"; the newest readable checkpoint of the run is {other}" if other else ""
            raise ConfigError(f"--resume: {ckpt} cannot be resumed from: {problem}{hint}")
    else:
        logdir, ckpt = path, path / "checkpoints" / "last.ckpt"
        problem = not_resumable_reason(ckpt) if ckpt.exists() else "it does not exist"
        if problem:
            fallback = newest_readable(ckpt.parent, exclude=(ckpt,)) if ckpt.parent.is_dir() else None
            if fallback is None:
                raise ConfigError(f"--resume: {ckpt} cannot be resumed from ({problem}) and the run has no other "
                                  f"readable checkpoint in {ckpt.parent}; nothing to continue from in {resume!r}")
            if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP's other processes re-run this script: say it once
                print(f"--resume: {ckpt} cannot be resumed from ({problem}); resuming from {fallback}, the newest "
                      "readable checkpoint of the run", file=sys.stderr)
            ckpt = fallback
    configs = sorted((logdir / "configs").glob("*.yaml"))
    if not configs:
        raise ConfigError(f"--resume: no saved configs in {str(logdir / 'configs')!r}")
    return logdir, ckpt, configs


def run(argv: list[str]) -> int:
    args = parse_args(argv)
    from ldm.config import check_targets, merge_configs  # heavy imports after --help and argument errors

    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    ckpt = None
    if args.resume:
        if args.finetune_from:
            raise ConfigError("--resume and --finetune_from exclude each other: resume continues a run, "
                              "finetune_from starts a new one from weights")
        logdir, ckpt, saved = resolve_resume(args.resume)
        os.environ[RESUME_ENV] = str(ckpt)  # for the DDP ranks, which re-run this script
        args.train = True  # a run is resumed to go on training; to only evaluate weights use --finetune_from
        base = saved + [Path(b) for b in args.base]
    else:
        if not args.base:
            raise ConfigError("no config given: pass --base configs/<name>.yaml (or -r <run dir> to continue a run)")
        base = [Path(b) for b in args.base]
        name = args.name or base[-1].stem
        root = Path(args.logdir) / ("debug_runs" if args.debug else "")
        logdir = Path(os.environ.get(RUN_DIR_ENV) or root / f"{now}_{name}")
    os.environ[RUN_DIR_ENV] = str(logdir)
    config = merge_configs(base, args.overrides)
    from ldm.compvis import translate_for_run  # CompVis/fork configs → this project's classes; others unchanged

    config = translate_for_run(config, weights_given=bool(args.finetune_from or args.resume), logdir=logdir)
    check_targets(config)

    from ldm.launch import train

    return train(config, args, logdir, now, ckpt)


def main() -> None:
    argv = sys.argv[1:]
    if "-d" not in argv and "--debug" not in argv:
        sys.exit(run_cli(run, argv))
    try:
        sys.exit(run(argv))
    except ConfigError:
        raise  # a mistake in the input: its traceback shows where it was found; no debugger needed
    except Exception:
        import pdb
        import traceback

        traceback.print_exc()
        pdb.post_mortem()
        sys.exit(1)


if __name__ == "__main__":
    main()
