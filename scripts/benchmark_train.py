#!/usr/bin/env python
"""Time training steps of this framework against a plain PyTorch loop doing the same work.

The plain loop is diffusers' ``train_text_to_image`` loop on the very modules the framework builds: VAE
encode (``latent_dist.sample() * scale_factor``), noise, random timesteps, ``DDPMScheduler.add_noise``,
tokenizer + frozen CLIP text encoder, UNet, MSE, backward, AdamW, LR-scheduler step, ``zero_grad``, and, as
the example does every step, ``loss.item()`` into a tqdm bar. The framework side is a real ``Trainer.fit`` of
``LatentDiffusion`` on ``DataModuleFromConfig`` with the loggers and callbacks ``main.py`` installs (CSV,
setup, image logger, LR monitor, ModelCheckpoint, NaN guard, save-on-interrupt, loss curve, progress bar),
none of which writes files in the timed window. Both use the same config, seed (same initial weights), batch
size, image size, in-memory data (seeded random images with captions), DataLoader settings and caption
dropout. EMA is off in both unless ``--ema`` turns it on in both (ours vs diffusers' ``EMAModel``).

Each variant runs in its own subprocess, one after the other. A ``time.perf_counter()`` stamp is taken at
the start of every batch (in the framework by a callback's ``on_train_batch_start``; on CUDA after a sync);
steps ``warmup .. warmup+steps`` are timed and their median is reported, with the process CPU time per step,
which other processes on a shared machine disturb far less. Memory is ``torch.cuda.max_memory_allocated``
on CUDA; on CPU each subprocess's peak resident set size (``ru_maxrss``: tensors and imported libraries
alike) and its growth after the model is built. ``--rounds N`` alternates the pair, keeping each's best.

Example (CPU, about three minutes)::

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/benchmark_train.py --steps 30 --warmup 5 --threads 1 --rounds 2
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
for _path in (REPO, REPO / "scripts"):  # `ldm` imports from anywhere; the DataModule imports our dataset by name
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402

TIME_TARGET, MEMORY_TARGET = 1.05, 1.10


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmark_train.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/tiny/tiny-sd.yaml"),
                   help="model config (its `model` section is used; default: configs/tiny/tiny-sd.yaml)")
    p.add_argument("--steps", type=int, default=60, help="timed steps per variant (default: 60)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before the timed ones (default: 10)")
    p.add_argument("--batch-size", type=int, default=4, help="images per step (default: 4)")
    p.add_argument("--size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto picks cuda when a GPU is visible (default: auto)")
    p.add_argument("--precision", default="32", choices=("32", "bf16-mixed", "16-mixed"),
                   help="Lightning precision; the plain loop uses the matching autocast/GradScaler (default: 32)")
    p.add_argument("--ema", action="store_true", help="keep an EMA of the UNet in both variants (default: off in both)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads in both (default: torch's choice); 1 is steadier on a busy machine")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader workers, same in both (default: 0)")
    p.add_argument("--rounds", type=int, default=1, help="run the pair this many times, keep each one's best (default: 1)")
    p.add_argument("--seed", type=int, default=0, help="seed for weights and data (default: 0)")
    p.add_argument("--variant", choices=("framework", "plain"), help=argparse.SUPPRESS)  # run one, in this process
    p.add_argument("--result", help=argparse.SUPPRESS)  # where that run writes its JSON
    return p


class RandomCaptioned(Dataset):
    """``n`` seeded random images in [-1, 1] with captions, held in memory: no decoding cost in either variant."""

    def __init__(self, n: int, size: int, seed: int = 0):
        gen = torch.Generator().manual_seed(seed)
        self.images = torch.rand(n, 3, size, size, generator=gen) * 2 - 1
        self.captions = [f"a photo of object number {i} on a table" for i in range(n)]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "caption": self.captions[i]}


class StepClock:
    """(perf_counter, process CPU time) at the start of each batch, after a CUDA sync so prior work is done."""

    def __init__(self, device: torch.device):
        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.stamps: list[tuple[float, float]] = []
        self.built_rss_mb = 0.0  # peak RSS once the model is built, before any training

    def stamp(self) -> None:
        self.sync()
        self.stamps.append((time.perf_counter(), time.process_time()))

    def window(self, warmup: int, steps: int) -> tuple[list[float], float]:
        """Wall seconds of each timed step, and the mean CPU seconds per timed step."""
        window = self.stamps[warmup:warmup + steps + 1]
        wall = [b[0] - a[0] for a, b in zip(window, window[1:])]
        return wall, (window[-1][1] - window[0][1]) / max(1, len(wall))


def _model_config(args) -> dict:
    from ldm.config import load_yaml, to_container

    model = to_container(load_yaml(args.config).model)
    model["params"]["use_ema"] = bool(args.ema)
    return model


def _build(args, clock: StepClock):
    """Seeded model (same initial weights in both variants) and the number of batches to run."""
    import pytorch_lightning as pl
    from ldm.util import instantiate_from_config
    pl.seed_everything(args.seed, verbose=False)
    cfg = _model_config(args)
    model = instantiate_from_config(cfg)
    model.learning_rate = float(cfg.get("base_learning_rate", 1e-4))
    clock.built_rss_mb = _peak_rss_mb()
    return model, args.warmup + args.steps + 1  # one more batch: its start stamp closes the last timed step


def run_framework(args, device: torch.device, clock: StepClock) -> None:
    import pytorch_lightning as pl
    from ldm.callbacks.checkpoint_io import AtomicCheckpointIO
    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.launch import build_callbacks, build_loggers, default_callbacks

    model, total = _build(args, clock)
    data = DataModuleFromConfig(batch_size=args.batch_size, num_workers=args.num_workers,
                                train={"target": "benchmark_train.RandomCaptioned",
                                       "params": {"n": total * args.batch_size, "size": args.size, "seed": args.seed}})

    class Clock(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            clock.stamp()

    with tempfile.TemporaryDirectory() as logdir:
        # As main.py sets them up; the image logger's frequency is pushed past the run so it never samples,
        # and the epoch (= the whole run) ends after the timed window, where checkpoints are written.
        lightning_cfg = {"callbacks": {"image_logger": {"params": {"batch_frequency": total + 1}}}}
        defaults = default_callbacks(Path(logdir), "bench", {"model": _model_config(args)}, lightning_cfg, False)
        trainer = pl.Trainer(default_root_dir=logdir, logger=build_loggers({}, Path(logdir)),
                             callbacks=build_callbacks(lightning_cfg, defaults) + [Clock()],
                             plugins=[AtomicCheckpointIO()], accelerator=device.type, devices=1,
                             max_steps=total, precision=args.precision)
        trainer.fit(model, data)


def plain_step(args, device: torch.device, model) -> Callable[[dict], tuple[float, float]]:
    """One step of diffusers' train_text_to_image loop on ``model``'s modules; returns (loss, lr) like its logs."""
    import torch.nn.functional as F
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel
    from ldm.util import instantiate_from_config
    p = model.hparams
    if p.snr_gamma is not None or model.cond_stage_model.layer != "last":
        raise SystemExit("the plain loop implements snr_gamma=None and the last text-encoder layer only")
    modules = {row.diffusers: row.module for row in model.weight_components()}
    unet, vae, text_encoder = (modules[name].to(device) for name in ("unet", "vae", "text_encoder"))
    tokenizer = model.cond_stage_model.tokenizer
    scale, ucg_rate = model.first_stage_model.scale_factor, model.cond_stage_model.ucg_rate
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    unet.train()
    noise_scheduler = DDPMScheduler(**model.schedule.scheduler_config(), clip_sample=False)
    optimizer = torch.optim.AdamW([q for q in unet.parameters() if q.requires_grad], lr=model.learning_rate,
                                  betas=tuple(p.adam_betas), eps=p.adam_eps, weight_decay=p.weight_decay)
    lr_scheduler = (torch.optim.lr_scheduler.LambdaLR(optimizer, instantiate_from_config(p.scheduler_config))
                    if p.scheduler_config is not None else None)
    # diffusers' EMA without its power warm-up has our EMA's decay: min(decay, (1 + n) / (10 + n)).
    ema = EMAModel(unet.parameters(), decay=p.ema_decay, use_ema_warmup=False, foreach=True) if args.ema else None
    dtype = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype is torch.float16)

    def step(batch: dict) -> tuple[float, float]:
        pixels, captions = batch["image"].to(device, non_blocking=True), list(batch["caption"])
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            with torch.no_grad(), torch.autocast(device.type, enabled=False):  # the VAE runs in fp32
                latents = vae.encode(pixels.float()).latent_dist.sample() * scale
            if ucg_rate > 0:
                drop = torch.rand(len(captions), device=device) < ucg_rate
                captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(captions),), device=device)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids.to(device)
            with torch.no_grad():
                context = text_encoder(ids)[0]
            target = noise if p.parameterization in ("eps", "epsilon") else noise_scheduler.get_velocity(latents, noise, timesteps)
            pred = unet(noisy, timesteps, context).sample
            loss = F.mse_loss(pred.float(), target.float())
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if lr_scheduler is not None:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(unet.parameters())
        return loss.detach().item(), optimizer.param_groups[0]["lr"]

    return step


def run_plain(args, device: torch.device, clock: StepClock) -> None:
    """The plain loop, with a tqdm bar showing step loss and LR each step as the diffusers example does."""
    from tqdm import tqdm
    model, total = _build(args, clock)
    step = plain_step(args, device, model)
    loader = DataLoader(RandomCaptioned(total * args.batch_size, args.size, args.seed), batch_size=args.batch_size,
                        shuffle=True, num_workers=args.num_workers, pin_memory=device.type == "cuda",
                        persistent_workers=args.num_workers > 0)
    bar = tqdm(loader, total=total, desc="plain loop", unit="step")
    for batch in bar:
        clock.stamp()
        loss, lr = step(batch)
        bar.set_postfix(step_loss=loss, lr=lr)


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def run_variant(args) -> dict:
    """Run one variant in this process and return its timing and memory figures."""
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available()) else "cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = StepClock(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    (run_framework if args.variant == "framework" else run_plain)(args, device, clock)
    times, cpu = clock.window(args.warmup, args.steps)
    if len(times) < args.steps:
        raise RuntimeError(f"{args.variant}: only {len(times)} of {args.steps} timed steps ran")
    return {"variant": args.variant, "device": device.type, "threads": torch.get_num_threads(),
            "median_ms": 1000 * sorted(times)[len(times) // 2], "cpu_ms": 1000 * cpu,
            "peak_rss_mb": _peak_rss_mb(), "rss_built_mb": clock.built_rss_mb,
            "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else None}


def _spawn(argv: list[str], variant: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--variant", variant, "--result", str(out)]
        subprocess.run(cmd, check=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
        return json.loads(out.read_text())


def report(fw: dict, plain: dict, ema: bool) -> str:
    cuda = fw["cuda_peak_mb"] is not None
    kind, key = ("peak CUDA alloc", "cuda_peak_mb") if cuda else ("peak RSS", "peak_rss_mb")
    lines = [f"device {fw['device']}, {fw['threads']} threads; EMA {'on' if ema else 'off'} in both; ms/step = median "
             f"wall time; memory = {kind}" + ("" if cuda else " of each variant's own subprocess")]
    for name, r in (("framework", fw), ("plain loop", plain)):
        lines.append(f"{name}: {r['median_ms']:.1f} ms/step (CPU {r['cpu_ms']:.1f} ms/step), {kind} {r[key]:.0f} MB")
    if not cuda:
        lines.append(f"peak RSS growth after the model is built: framework {fw['peak_rss_mb'] - fw['rss_built_mb']:.0f} MB, "
                     f"plain loop {plain['peak_rss_mb'] - plain['rss_built_mb']:.0f} MB")
    lines.append(f"ratio time {fw['median_ms'] / plain['median_ms']:.2f}x (target <= {TIME_TARGET:.2f}; CPU time "
                 f"{fw['cpu_ms'] / plain['cpu_ms']:.2f}x), memory {fw[key] / plain[key]:.2f}x (target <= {MEMORY_TARGET:.2f})")
    return "\n".join(lines)


def best_of(rounds: list[dict]) -> dict:
    """The fastest round, with the lowest CPU time of any round: both are what other processes left alone."""
    best = dict(min(rounds, key=lambda r: r["median_ms"]))
    best["cpu_ms"] = min(r["cpu_ms"] for r in rounds)
    return best


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if min(args.steps, args.batch_size, args.size, args.rounds) < 1 or args.warmup < 0:
        raise SystemExit("error: --steps, --batch-size, --size and --rounds must be >= 1, --warmup >= 0")
    if (args.device == "cuda" or args.precision == "16-mixed") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda and --precision 16-mixed need a CUDA GPU; none is visible here")
    if args.variant:
        Path(args.result).write_text(json.dumps(run_variant(args)))
        return 0
    results: dict[str, list[dict]] = {"framework": [], "plain": []}
    for i in range(args.rounds):
        for variant in results:
            results[variant].append(_spawn(argv, variant))
        fw, plain = results["framework"][-1], results["plain"][-1]
        print(f"round {i + 1}: framework {fw['median_ms']:.1f} ms/step (CPU {fw['cpu_ms']:.1f}), "
              f"plain loop {plain['median_ms']:.1f} ms/step (CPU {plain['cpu_ms']:.1f})", flush=True)
    print(report(best_of(results["framework"]), best_of(results["plain"]), args.ema), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
