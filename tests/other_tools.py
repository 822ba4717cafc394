"""What the slow checks of our exports in other tools share (tests/test_sdcpp.py, tests/test_invokeai.py): the
tool in a cached venv of its own (the project's venv is untouched), a script run in a subprocess of that venv,
and the files to hand it: a full-size SD 1.x with random weights (configs/architectures/sd-v1.yaml, seed 0) and
LoRA adapters of the recipe's shape (configs/dreambooth-lora.yaml's ``model.params.lora`` plus the text
encoder's adapters, random weights) in the kohya and diffusers layouts."""
from __future__ import annotations

import json
import os
import subprocess
import time
import venv
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "sd-finetune"
LORA_FILES = {"ours_kohya": "kohya", "ours_diffusers": "diffusers"}  # file stem -> layout


def cached_venv(path: Path, requirement: str, env: dict | None = None) -> Path:
    """The python of a venv at ``path`` with ``requirement`` (``name==version``) installed, built once; the test
    skips with pip's last lines when it cannot be installed here."""
    python = path / "bin" / "python"
    name, version = requirement.split("==")
    probe = [str(python), "-c", f"import importlib.metadata as m; print(m.version({name!r}))"]
    if python.exists() and subprocess.run(probe, capture_output=True, text=True).stdout.strip() == version:
        return python
    path.parent.mkdir(parents=True, exist_ok=True)
    venv.EnvBuilder(with_pip=True, clear=True).create(path)
    start = time.time()
    build = subprocess.run([str(python), "-m", "pip", "install", "--no-cache-dir", requirement], capture_output=True,
                           text=True, env={**os.environ, **(env or {})})
    if build.returncode != 0:
        tail = (build.stdout + build.stderr).strip().splitlines()[-15:]
        pytest.skip(f"{requirement} could not be installed in {path}: " + " | ".join(tail))
    print(f"built {requirement} in {time.time() - start:.0f} s")
    return python


def run_script(python: Path, script: str, spec: dict, timeout: int = 1200, env: dict | None = None) -> str:
    """Run ``script`` in the tool's venv with ``spec`` as its JSON argument; its stdout and stderr together."""
    done = subprocess.run([str(python), "-c", script, json.dumps(spec)], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": "", **(env or {})})
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    return log


def random_sd1():
    """Full-size SD 1.x with random weights (seed 0, no EMA copy), in eval mode."""
    from ldm.config import load_yaml, to_container
    from ldm.util import instantiate_from_config

    cfg = to_container(load_yaml(ROOT / "configs/architectures/sd-v1.yaml").model)
    cfg["params"]["use_ema"] = False
    torch.manual_seed(0)
    return instantiate_from_config(cfg).eval()


def write_single_files(model, out: Path) -> dict[str, Path]:
    """The model as original-layout single files: ``{"fp32": path, "fp16": path}`` in ``out``."""
    from ldm.weights import export_single_file
    from ldm.weights.export import Exportable

    item = Exportable(model.state_dict(), model, {"config": {}})
    return {"fp32": export_single_file(item, out / "sd-v1-fp32.safetensors", progress=False),
            "fp16": export_single_file(item, out / "sd-v1-fp16.safetensors", half=True, progress=False)}


def recipe_lora() -> dict:
    """The recipe's adapters (configs/dreambooth-lora.yaml's model.params.lora), the text encoder's included."""
    from ldm.config import load_yaml, to_container

    return {**to_container(load_yaml(ROOT / "configs/dreambooth-lora.yaml").model.params.lora), "text_encoder": True}


def add_recipe_lora(model, **overrides) -> None:
    """The recipe's adapters (what model.params.lora adds in LatentDiffusion.__init__), ``overrides`` replacing its
    settings, with random up weights: they start at zero, and random values make every adapter count."""
    from ldm.lora import add_lora

    add_lora(model, **{**recipe_lora(), **overrides})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))


def write_lora_files(model, folder: Path) -> dict[str, str]:
    """The model's adapters as ``folder/<stem>.safetensors`` in each layout; ``{stem: layout}``."""
    from ldm.lora import save_lora

    for name, layout in LORA_FILES.items():
        save_lora(model, folder / f"{name}.safetensors", layout=layout, check=False)
    return dict(LORA_FILES)
