"""stable-diffusion.cpp reads this project's exports (slow: ``make test-all`` or ``pytest -m slow``).

A full-size SD 1.x with random weights (configs/architectures/sd-v1.yaml, seed 0) is written as an original-layout
single file in fp32 and fp16, and LoRA adapters of the recipe's shape (configs/dreambooth-lora.yaml's
``model.params.lora``, plus the text encoder's adapters; random weights) in the kohya and diffusers layouts.
stable-diffusion-cpp-python runs in a venv of its own, built once for the CPU and cached under
``~/.cache/sd-finetune/sdcpp-venv`` (``SD_FINETUNE_SDCPP_VENV`` to move it); the project's venv is untouched.
In a subprocess of that venv sd.cpp loads each model file and each LoRA (``<lora:name:1>`` in the prompt, from
``lora_model_dir``); its log must show no tensor left aside: no ``unknown tensor '...' in model file`` line for
the model (every tensor in the file was read into the network) and ``(n / n) LoRA tensors have been applied``
with no ``unused lora tensor`` line for each LoRA file. Last, a 64 px image from sd.cpp (Euler, 4 steps,
``rng_type="cpu"``: torch's CPU generator, so both start from the same noise) matches diffusers'
StableDiffusionPipeline on the same weights within 1/255 mean.

Known gap, kept as a strict xfail: the diffusers-layout file's text-encoder adapters
(``...self_attn.q_proj.lora_linear_layer.down.weight``, the names diffusers' ``convert_state_dict_to_diffusers``
gives) are not read by sd.cpp 0.4.7 (256 of 352 tensors applied, the 96 text-encoder ones unused); its UNet
adapters and the whole kohya file (528 / 528) apply. Renaming them to peft's ``lora_A``/``lora_B`` does not help:
sd.cpp then reads the names but has no mapping for diffusers' ``text_encoder.`` prefix
(``lora.text.encoder.text_model...`` unused), so the kohya file is the one for sd.cpp. The xfail turns into a
failure if a later sd.cpp reads them.

Runtime on 2 shared CPU cores (measured): the venv's first build 4-6 minutes (download and compile; 244 s while
another test suite ran; skipped with pip's last lines when it cannot be installed, e.g. no compiler), then 2-3
minutes a run (134 s): 95 s to build the random model, write its two files (~6.4 GB in the temp dir) and the LoRA
files and sample diffusers' image, ~30 s per sd.cpp subprocess (load and three 64 px images).
"""
from __future__ import annotations

import gc
import os
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.other_tools import (CACHE, add_recipe_lora, cached_venv, random_sd1, run_script, write_lora_files,
                               write_single_files)

SDCPP = "stable-diffusion-cpp-python==0.4.7"
VENV = Path(os.environ.get("SD_FINETUNE_SDCPP_VENV", CACHE / "sdcpp-venv"))
SEED, STEPS, CFG, PROMPT = 42, 4, 3.0, "a photo of a rocket"  # 999 / (STEPS - 1) whole: sd.cpp's and diffusers'
# discrete sigmas then fall on the same training timesteps (999, 666, 333, 0), with no interpolation to differ in

pytestmark = pytest.mark.slow

# Runs in the sd.cpp venv: loads one model file, samples without LoRA, then with each LoRA in turn.
RUNNER = r'''
import json, sys
from stable_diffusion_cpp import StableDiffusion

spec = json.loads(sys.argv[1])
def mark(text):
    print(f"@@@ {text}", file=sys.stderr, flush=True)
mark("load")
sd = StableDiffusion(model_path=spec["model"], lora_model_dir=spec["lora_dir"], rng_type="cpu",
                     sampler_rng_type="cpu", vae_decode_only=False, verbose=True)
for name, lora in spec["runs"]:
    mark(f"generate {name}")
    prompt = spec["prompt"] + (f" <lora:{lora}:1>" if lora else "")
    image = sd.generate_image(prompt=prompt, negative_prompt="", width=64, height=64, cfg_scale=spec["cfg"],
                              sample_method="euler", scheduler="discrete", sample_steps=spec["steps"],
                              seed=spec["seed"])[0]
    image.convert("RGB").save(f"{spec['out']}/{name}.png")
mark("done")
'''


def sdcpp_python() -> Path:
    """The cached venv's python with stable-diffusion-cpp-python (built from source) in it."""
    return cached_venv(VENV, SDCPP, env={"CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)})


def write_files(out: Path) -> tuple[dict[str, Path], dict[str, str], np.ndarray]:
    """Model files (fp32, fp16), LoRA files ({name: layout}, in ``out/lora``) and diffusers' image (H, W, 3 uint8)."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    model = random_sd1()
    models = write_single_files(model, out)

    modules = {row.diffusers: row.module for row in model.weight_components()}
    modules["vae"].register_to_config(scaling_factor=model.first_stage_model.scale_factor)
    pipe = StableDiffusionPipeline(
        vae=modules["vae"], text_encoder=modules["text_encoder"], tokenizer=model.cond_stage_model.tokenizer,
        unet=model.unet, scheduler=EulerDiscreteScheduler(**{**model.schedule.scheduler_config(), "steps_offset": 1,
                                                             "timestep_spacing": "linspace"}),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(SEED))  # what rng_type="cpu" draws
    with torch.no_grad():
        image = pipe(PROMPT, negative_prompt="", height=64, width=64, num_inference_steps=STEPS, guidance_scale=CFG,
                     latents=latents, output_type="np").images[0]
    theirs = (image * 255).round().clip(0, 255).astype(np.uint8)
    del pipe, modules

    add_recipe_lora(model)
    loras = write_lora_files(model, out / "lora")
    del model
    gc.collect()
    return models, loras, theirs


def run_sdcpp(python: Path, model: Path, lora_dir: Path, loras: dict[str, str], out: Path) -> str:
    spec = {"model": str(model), "lora_dir": str(lora_dir), "out": str(out), "prompt": PROMPT, "cfg": CFG,
            "steps": STEPS, "seed": SEED, "runs": [["base", None]] + [[name, name] for name in loras]}
    return run_script(python, RUNNER, spec)


def sections(log: str) -> dict[str, str]:
    """The sd.cpp log split at the runner's ``@@@`` marks: {"load": ..., "generate base": ..., ...}."""
    parts = re.split(r"^@@@ (.+)$", log, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def lora_report(text: str) -> dict[Path, tuple[set, list]]:
    """Per LoRA file sd.cpp loaded in ``text``: its ``(applied, total)`` counts and its unused tensors."""
    parts = re.split(r"loading LoRA from '([^']+)'", text)
    found: dict[Path, tuple[set, list]] = {}
    for i in range(1, len(parts) - 1, 2):
        counts, unused = found.setdefault(Path(parts[i]).resolve(), (set(), []))
        counts.update((int(a), int(b)) for a, b in re.findall(r"\((\d+) / (\d+)\) LoRA tensors have been applied",
                                                             parts[i + 1]))
        unused.extend(re.findall(r"unused lora tensor \|([^|]*)\|", parts[i + 1]))
    return found


@pytest.fixture(scope="module")
def sdcpp(tmp_path_factory):
    """Everything run once: the venv, the files, diffusers' image and sd.cpp on each model file."""
    tmp = tmp_path_factory.mktemp("sdcpp")
    start = time.time()
    python = sdcpp_python()
    timings = {"venv": time.time() - start}
    start = time.time()
    models, loras, theirs = write_files(tmp)
    timings["files + diffusers image"] = time.time() - start
    runs = {}
    for precision, path in models.items():
        out = tmp / precision
        out.mkdir()
        start = time.time()
        log = run_sdcpp(python, path, tmp / "lora", loras, out)
        timings[f"sd.cpp {precision} (load, 3 images)"] = time.time() - start
        (tmp / f"sdcpp-{precision}.log").write_text(log)
        parts = sections(log)
        assert "done" in parts, log[-4000:]
        runs[precision] = (path, parts, out)
    print("\n" + ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()))
    return {"runs": runs, "lora_dir": tmp / "lora", "loras": loras, "theirs": theirs}


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sdcpp_reads_every_tensor_of_our_single_file(sdcpp, precision):
    from ldm.weights.files import read_safetensors

    path, parts, _ = sdcpp["runs"][precision]
    unknown = re.findall(r"unknown tensor '([^']*)", parts["load"])
    stat = re.search(r"Weight type stat:\s+(.+)", parts["load"])
    print(f"\n{precision}: {len(read_safetensors(path)[0])} tensors in the file; sd.cpp: SD 1.x: "
          f"{'Version: SD 1.x' in parts['load']}, weights {stat and stat.group(1).strip()}, {len(unknown)} unknown")
    assert "Version: SD 1.x" in parts["load"]
    assert not unknown, f"{precision}: sd.cpp left {len(unknown)} tensors of the file unused: {unknown[:5]}"
    assert "not in model file" not in parts["load"]


DIFFUSERS_TE = pytest.mark.xfail(strict=True, reason=(
    "sd.cpp 0.4.7 reads diffusers-layout adapters named .lora.down/.lora_A/.lora_down, not the text encoder's "
    "'...q_proj.lora_linear_layer.down.weight' that ldm.lora_files.diffusers_layout writes "
    "(diffusers' convert_state_dict_to_diffusers): 96 of 352 tensors unused"))


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
@pytest.mark.parametrize("name", ["ours_kohya", pytest.param("ours_diffusers", marks=DIFFUSERS_TE)])
def test_sdcpp_applies_every_tensor_of_our_lora(sdcpp, precision, name):
    from ldm.weights.files import read_safetensors

    _, parts, out = sdcpp["runs"][precision]
    file = sdcpp["lora_dir"] / f"{name}.safetensors"
    counts, unused = lora_report(parts[f"generate {name}"]).get(file.resolve(), (set(), []))
    print(f"\n{precision} + {sdcpp['loras'][name]} LoRA ({len(read_safetensors(file)[0])} tensors): "
          f"sd.cpp applied {sorted(counts)}, {len(unused)} unused")
    assert counts, f"sd.cpp printed no applied-tensor count for {file}:\n{parts[f'generate {name}'][-3000:]}"
    assert not unused, f"{len(unused)} LoRA tensors unused by sd.cpp: {unused[:5]}"
    assert all(a == b for a, b in counts), counts
    image, base = (np.asarray(Image.open(out / f"{n}.png")) for n in (name, "base"))
    assert not np.array_equal(image, base)  # the adapters changed the weights sd.cpp sampled with


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_sdcpp_samples_the_image_diffusers_samples(sdcpp, precision):
    _, _, out = sdcpp["runs"][precision]
    ours, theirs = np.asarray(Image.open(out / "base.png")).astype(np.float64), sdcpp["theirs"].astype(np.float64)
    assert ours.shape == theirs.shape == (64, 64, 3)
    assert theirs.std() > 10  # a picture with structure (std 39 measured), not a flat field that any noise gives
    diff = np.abs(ours - theirs).mean()
    print(f"\n{precision}: sd.cpp vs diffusers (fp32) 64 px image, mean abs difference {diff:.3f}/255, "
          f"max {np.abs(ours - theirs).max():.0f}/255")
    assert diff < 1.0, f"mean abs difference {diff:.3f}/255"
