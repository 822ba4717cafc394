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


def result(median_ms, cpu_ms, rss, built=800.0, cuda=None):
    return {"device": "cuda" if cuda else "cpu", "threads": 1, "median_ms": median_ms, "cpu_ms": cpu_ms,
            "peak_rss_mb": rss, "rss_built_mb": built, "cuda_peak_mb": cuda}


def test_report_prints_both_variants_and_the_ratios(bench):
    text = bench.report(result(110.0, 55.0, 1100.0), result(100.0, 50.0, 1000.0), ema=False)
    assert "framework: 110.0 ms/step (CPU 55.0 ms/step), peak RSS 1100 MB" in text
    assert "plain loop: 100.0 ms/step (CPU 50.0 ms/step), peak RSS 1000 MB" in text
    assert "framework 300 MB, plain loop 200 MB" in text  # growth over the built model
    assert "ratio time 1.10x (target <= 1.05; CPU time 1.10x), memory 1.10x (target <= 1.10)" in text
    assert "EMA off in both" in text
    cuda = bench.report(result(10.0, 9.0, 5000.0, cuda=300.0), result(10.0, 9.0, 4000.0, cuda=200.0), ema=True)
    assert "peak CUDA alloc 300 MB" in cuda and "memory 1.50x" in cuda and "RSS growth" not in cuda
    assert "EMA on in both" in cuda


def test_best_of_keeps_the_fastest_round_and_the_least_cpu(bench):
    rounds = [result(120.0, 40.0, 900.0), result(100.0, 45.0, 950.0)]
    best = bench.best_of(rounds)
    assert (best["median_ms"], best["cpu_ms"], best["peak_rss_mb"]) == (100.0, 40.0, 950.0)


@pytest.mark.parametrize("argv, message", [(["--steps", "0"], "--steps"), (["--warmup", "-1"], "--warmup")])
def test_bad_arguments_are_refused(bench, argv, message):
    with pytest.raises(SystemExit, match=message):
        bench.main(argv)


def test_help_reads_like_docs():
    out = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--steps", "--warmup", "--batch-size", "--size", "--config", "--device", "--precision", "--ema"):
        assert flag in out
    assert "train_text_to_image" in out and "ru_maxrss" in out


def test_tiny_run_prints_both_variants_and_the_ratio_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--steps", "2", "--warmup", "1", "--batch-size", "1",
                           "--size", "16", "--threads", "1"], capture_output=True, text=True, cwd=tmp_path, env=env,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert re.search(r"^framework: \d+\.\d ms/step \(CPU \d+\.\d ms/step\), peak RSS \d+ MB$", out, re.M), out
    assert re.search(r"^plain loop: \d+\.\d ms/step \(CPU \d+\.\d ms/step\), peak RSS \d+ MB$", out, re.M), out
    assert re.search(r"^ratio time \d+\.\d\dx \(target <= 1\.05; CPU time \d+\.\d\dx\), memory \d+\.\d\dx "
                     r"\(target <= 1\.10\)$", out, re.M), out
    assert not any(tmp_path.iterdir())  # run dirs, checkpoints and metrics went to a temporary folder
