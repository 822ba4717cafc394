"""scripts/benchmark_train.py: the step window and report arithmetic, argument checks, and one tiny end-to-end run
(both variants in their own subprocesses). No timing is asserted: figures on a shared CPU are noise."""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.flops import StepFlops

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "benchmark_train.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("benchmark_train", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_window_times_only_the_steps_after_warmup(bench):
    clock = bench.StepClock(torch.device("cpu"))
    # Batch starts at wall 0, 10, 11, 13, 16, 100 s (the first step is a slow warm-up), CPU time 1 s per step.
    clock.stamps = [(t, float(i)) for i, t in enumerate((0.0, 10.0, 11.0, 13.0, 16.0, 100.0))]
    wall, cpu = clock.window(warmup=1, steps=3)
    assert wall == [1.0, 2.0, 3.0]  # steps 1..3: neither the warm-up step nor the step after the window
    assert cpu == 1.0


def result(median_ms, cpu_ms, rss, built=800.0, cuda=None, cache_s=0.0, batch=4):
    return {"device": "cuda" if cuda else "cpu", "device_name": "NVIDIA A100-SXM4-80GB" if cuda else "cpu",
            "threads": 1, "precision": "bf16-mixed" if cuda else "32", "attention": ["AttnProcessor2_0"],
            "median_ms": median_ms, "cpu_ms": cpu_ms, "images_per_s": batch / (median_ms / 1000),
            "peak_rss_mb": rss, "rss_built_mb": built, "cuda_peak_mb": cuda, "cache_s": cache_s}


# Per step of 4 images: VAE 4 GFLOP, text 0.1, UNet 8; so 12.1 GFLOP online and 8 cached.
FLOPS = StepFlops(batch_size=4, vae_encode=4_000_000_000, text_encode=100_000_000, unet_train=8_000_000_000)


def test_report_prints_both_variants_and_the_ratios(bench):
    args = bench.parse_args(["--size", "128", "--steps", "30", "--warmup", "5"])
    text = bench.report({"framework": result(110.0, 55.0, 1100.0), "plain": result(100.0, 50.0, 1000.0)}, args, FLOPS)
    assert "framework: 110.0 ms/step (CPU 55.0 ms/step), 36.4 img/s, 110 GFLOP/s, peak RSS 1100 MB" in text
    assert "plain loop: 100.0 ms/step (CPU 50.0 ms/step), 40.0 img/s, 121 GFLOP/s, peak RSS 1000 MB" in text
    assert "framework 300 MB, plain loop 200 MB" in text  # growth over the built model
    assert "uncached / plain: time 1.10x (target <= 1.05: NOT met; CPU time 1.10x), " \
           "memory 1.10x (target <= 1.10: met)" in text
    assert "EMA off, gradient checkpointing off, channels-last off, compile off" in text
    assert "FLOPs per image: VAE encoder 1 GFLOP, text encoder 0.025 GFLOP, UNet forward+backward 2 GFLOP; " \
           "encoder:UNet 0.500 (SD v1 at 512 px: 0.464)" in text
    assert "MFU" not in text and "cache (" not in text  # no peak for a CPU; no cached run asked for


def test_report_of_a_cached_run_on_cuda_prints_the_cache_cost_mfu_and_both_targets(bench):
    args = bench.parse_args(["--size", "128", "--steps", "30", "--warmup", "5", "--cache", "--channels-last"])
    runs = {"framework": result(100.0, 90.0, 9000.0, cuda=3000.0),
            "cached": result(60.0, 55.0, 9500.0, cuda=2500.0, cache_s=2.0),
            "plain": result(100.0, 95.0, 9000.0, cuda=3000.0)}
    gpu = StepFlops(4, *(1000 * n for n in (FLOPS.vae_encode, FLOPS.text_encode, FLOPS.unet_train)))
    text = bench.report(runs, args, gpu, peak=312.0)
    # 12.1 TFLOP in 0.1 s = 121 TFLOP/s = 38.8% of 312; cached: the UNet's 8 TFLOP in 0.06 s = 42.7%.
    assert "framework: 100.0 ms/step (CPU 90.0 ms/step), 40.0 img/s, 121 TFLOP/s = 38.8% MFU of 312, " \
           "peak CUDA alloc 3000 MB" in text
    assert "framework, cached: 60.0 ms/step (CPU 55.0 ms/step), 66.7 img/s, 133 TFLOP/s = 42.7% MFU of 312" in text
    # 2 s of caching, 40 ms saved per step: 50 steps of 4 images, out of 4 * 36 images cached.
    assert "cache (memory): 2.00 s to encode 144 images and their captions once, before training (not in the " \
           "timed window); pays back after 50 steps (40.0 ms saved per step over the uncached framework; 1.39 " \
           "epochs of these images)" in text
    assert "cached / plain: time 0.60x (target <= 0.75: met; CPU time 0.58x), " \
           "memory 0.83x (target <= 1.00: met)" in text
    assert "uncached / plain: time 1.00x (target <= 1.05: met" in text
    assert "channels-last on" in text and "RSS growth" not in text
    slower = dict(runs, cached=result(120.0, 110.0, 9500.0, cuda=3500.0, cache_s=2.0))
    text = bench.report(slower, args, gpu)
    assert "never pays back here" in text and "memory 1.17x (target <= 1.00: NOT met)" in text
    assert "MFU: no peak known for NVIDIA A100-SXM4-80GB; give --peak-tflops" in text


def test_best_of_keeps_the_fastest_round_and_the_least_cpu(bench):
    rounds = [result(120.0, 40.0, 900.0), result(100.0, 45.0, 950.0)]
    best = bench.best_of(rounds)
    assert (best["median_ms"], best["cpu_ms"], best["peak_rss_mb"]) == (100.0, 40.0, 950.0)


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps"), (["--warmup", "-1"], "--warmup")])
def test_bad_arguments_are_refused(bench, argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(argv)


def test_a_preset_sets_defaults_that_flags_override(bench):
    args = bench.parse_args(["--preset", "sd-v1-512"])
    assert (Path(args.config).name, args.size, args.batch_size, args.cache) == ("sd-v1.yaml", 512, 8, "memory")
    assert bench.parse_args(["--preset", "sd-v1-256", "--batch-size", "2"]).batch_size == 2
    assert bench.parse_args([]).size is None  # then the config's own: bench-sd.yaml is made for 128 px


def test_the_presets_build_full_size_sd_v1_with_the_speed_settings_asked_for(bench):
    args = bench.parse_args(["--preset", "sd-v1-256", "--gradient-checkpointing", "--channels-last"])
    cfg = bench._model_config(args)
    assert cfg["params"]["unet_config"]["params"] | {"config": None} == \
        {"config": None, "gradient_checkpointing": True, "channels_last": True, "compile": False}
    assert bench.native_size(cfg) == 512  # built on the meta device; the preset's --size 256 is what runs
    assert bench.native_size(bench._model_config(bench.parse_args([]))) == 128


def test_precision_auto_is_full_precision_on_the_cpu(bench):
    assert bench.resolve_precision("auto", torch.device("cpu")) == "32"
    assert bench.resolve_precision("bf16-mixed", torch.device("cpu")) == "bf16-mixed"


def test_help_reads_like_docs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--steps", "--warmup", "--batch-size", "--size", "--config", "--device", "--precision", "--ema",
                 "--cache", "--preset", "--gradient-checkpointing", "--channels-last", "--compile", "--peak-tflops"):
        assert flag in out
    assert "train_text_to_image" in out and "ru_maxrss" in out and "MFU" in out and "bench-sd.yaml" in out


def test_tiny_run_prints_all_three_variants_and_the_ratio_lines(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    # The benchmark model at half its size; the two CPU-capable speed settings ride along to be exercised.
    proc = subprocess.run([sys.executable, str(SCRIPT), "--cache", "--steps", "2", "--warmup", "1", "--batch-size", "1",
                           "--size", "64", "--threads", "1", "--gradient-checkpointing", "--channels-last"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    step = r"\d+\.\d ms/step \(CPU \d+\.\d ms/step\), \d+\.\d img/s, [\d.]+ GFLOP/s, peak RSS \d+ MB$"
    for label in ("framework", "framework, cached", "plain loop"):
        assert re.search(f"^{label}: " + step, out, re.M), out
    met = r"(met|NOT met)"
    for label, time_target, memory_target in (("uncached", "1.05", "1.10"), ("cached", "0.75", "1.00")):
        assert re.search(rf"^{label} / plain: time \d+\.\d\dx \(target <= {time_target}: {met}; CPU time \d+\.\d\dx\), "
                         rf"memory \d+\.\d\dx \(target <= {memory_target}: {met}\)$", out, re.M), out
    cache = re.search(r"^cache \(memory\): (\d+\.\d\d) s to encode 4 images and their captions once", out, re.M)
    assert cache and float(cache[1]) > 0, out  # the fill was timed where it happens
    assert "gradient checkpointing on, channels-last on" in out and "model bench-sd.yaml at 64 px, batch 1" in out
    assert not any(tmp_path.iterdir())  # run dirs, checkpoints and metrics went to a temporary folder
