"""InvokeAI recognises this project's exports the way it does when a user adds a model (slow: ``make test-all``
or ``pytest -m slow``).

Files (tests/other_tools.py): a full-size SD 1.x with random weights as original-layout single files (fp32, fp16)
and as a diffusers folder (fp32), and LoRA adapters of the recipe's shape (text encoder's included, random weights)
with alpha twice the rank (strength 2), in the kohya and diffusers layouts. ``invokeai`` runs in a venv of its own,
built once from PyPI and cached under ``~/.cache/sd-finetune/invokeai-venv`` (``SD_FINETUNE_INVOKEAI_VENV`` to move
it). In a subprocess of that venv the model manager is set up as the app sets it up
(``ModelManagerService.build_model_manager`` on an in-memory database, a fresh ``INVOKEAI_ROOT``, default settings)
and each file is added with ``install.register_path``, what an in-place install runs: it identifies the file
(``ModelConfigFactory.from_model_on_disk``) and stores the config it found. Each single file must come back as an SD
1 main model (base ``sd-1``, type ``main``, format ``checkpoint``, variant ``normal``, epsilon prediction) and the
kohya file as an SD 1 LoRA (type ``lora``, base ``sd-1``, format ``lycoris``, InvokeAI's name for kohya/LyCORIS
files). Then InvokeAI's own loader reads the kohya file and the diffusers folder's UNet and text encoder, and
``LayerPatcher.apply_smart_model_patches`` puts the LoRA on them as the denoise (``lora_unet_``) and prompt
(``lora_te_``) invocations do: every LoRA layer must be patched onto a module, and the patched networks must give
our adapted model's outputs (same context for a prompt, same noise prediction for a fixed 8x8 latent).

Known gap, kept as a strict xfail: InvokeAI 6.14.2 does not identify the diffusers-layout file, neither on its own
("model does not match LyCORIS LoRA heuristics") nor as ``pytorch_lora_weights.safetensors`` in a folder, its
diffusers LoRA format ("unrecognized token vector length None": it tells SD 1 from SD 2/XL by kohya names only);
it registers both as type ``unknown``. The kohya file is the one for InvokeAI. The xfail turns into a failure if a
later InvokeAI reads them.

Not covered: generating with the single files. InvokeAI loads those with diffusers' ``from_single_file`` without
a config, which fetches the base model's configs from the Hub once; offline it stops with
``LocalEntryNotFoundError``, so the loading and patching run on the diffusers folder.

Runtime on 2 shared CPU cores (measured): the venv's first build 2 minutes (116 s; 7.2 GB: invokeai pins
diffusers 0.40.0 and transformers 5.5.4 and takes torch 2.14.1 with its CUDA wheels from PyPI; skipped with pip's
last lines when it cannot be installed), then 1.5-2 minutes a run (91 s, 129 s): 64-80 s for the model, its three
exports (~10.7 GB in the temp dir, deleted afterwards), the LoRA files and our outputs, 23-41 s for InvokeAI
(start, add six files, load the LoRA and the folder's UNet and text encoder, patch, two forward passes each).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch

from tests.other_tools import (CACHE, add_recipe_lora, cached_venv, random_sd1, recipe_lora, run_script,
                               write_lora_files, write_single_files)

INVOKEAI = "invokeai==6.14.2"
VENV = Path(os.environ.get("SD_FINETUNE_INVOKEAI_VENV", CACHE / "invokeai-venv"))
PROMPT = ["a photo of a rocket"]
TOLERANCE = 1e-4  # fp32 on both sides; measured: 0 for the text encoder, 1.3e-6 for the UNet

pytestmark = pytest.mark.slow

# Runs in the InvokeAI venv: adds each file to a model manager, then patches the LoRA onto the folder's networks.
RUNNER = r'''
import json, logging, sys, time
from unittest import mock

spec = json.loads(sys.argv[1])
# First, as `invokeai-web` does: importing the model config classes before this trips a circular import in
# InvokeAI 6.14.2 (patches.layers.utils) that makes some of their checks raise ImportError.
import invokeai.app.invocations.baseinvocation  # noqa: F401
import torch
from safetensors.torch import load_file
from invokeai.app.services.config.config_default import InvokeAIAppConfig
from invokeai.app.services.download import DownloadQueueService
from invokeai.app.services.events.events_base import EventServiceBase
from invokeai.app.services.image_files.image_files_base import ImageFileStorageBase
from invokeai.app.services.model_manager.model_manager_default import ModelManagerService
from invokeai.app.services.model_records import ModelRecordServiceSQL
from invokeai.app.services.shared.sqlite.sqlite_util import init_db
from invokeai.backend.model_manager.configs.factory import ModelConfigFactory
from invokeai.backend.model_manager.taxonomy import SubModelType
from invokeai.backend.patches.layer_patcher import LayerPatcher
from invokeai.backend.util.logging import InvokeAILogger

class Warnings(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []
    def emit(self, record):
        self.lines.append(record.getMessage())

config = InvokeAIAppConfig(use_memory_db=True)  # INVOKEAI_ROOT names the root
logger = InvokeAILogger.get_logger(config=config)
db = init_db(config=config, logger=logger, image_files=mock.Mock(spec=ImageFileStorageBase))
mm = ModelManagerService.build_model_manager(
    app_config=config, model_record_service=ModelRecordServiceSQL(db=db, logger=logger),
    download_queue=DownloadQueueService(app_config=config), events=EventServiceBase())
report, keys = {"probe": {}}, {}
for name, path in spec["probe"].items():
    start = time.time()
    keys[name] = mm.install.register_path(path)
    found = mm.store.get_model(keys[name])
    row = {"class": type(found).__name__, "seconds": round(time.time() - start, 1)}
    for field in ("type", "base", "format", "variant", "prediction_type"):
        row[field] = getattr(getattr(found, field, None), "value", None)
    if row["type"] == "unknown":  # why the Stable Diffusion LoRA configs turned it down
        details = ModelConfigFactory.from_model_on_disk(path).details
        row["why"] = {k: str(v) for k, v in details.items() if k.startswith("LoRA_") and "_SD1_" in k}
    report["probe"][name] = row

warnings = Warnings()
InvokeAILogger.get_logger(LayerPatcher.__name__).addHandler(warnings)
ref = load_file(spec["reference"])
lora = mm.load.load_model(mm.store.get_model(keys[spec["lora"]]))
report["lora_layers"] = {p: sum(k.startswith(p) for k in lora.model.layers) for p in ("lora_te_", "lora_unet_")}
report["networks"] = {}
main = mm.store.get_model(keys[spec["model"]])
for sub, prefix, want in ((SubModelType.TextEncoder, "lora_te_", "context"), (SubModelType.UNet, "lora_unet_", "eps")):
    def run(net):
        if sub is SubModelType.TextEncoder:
            return net(ref["ids"])[0]
        return net(ref["latents"], ref["timestep"], encoder_hidden_states=ref["context"]).sample
    loaded = mm.load.load_model(main, sub)
    with torch.no_grad(), loaded.model_on_device() as (cached, net):
        base = run(net)
        with LayerPatcher.apply_smart_model_patches(model=net, patches=[(lora.model, 1.0, lora.model_in_ram())],
                                                     prefix=prefix, dtype=net.dtype, cached_weights=cached):
            patched = [n for n, m in net.named_modules() if getattr(m, "get_num_patches", lambda: 0)() > 0]
            out = run(net)
        after = run(net)
    report["networks"][prefix] = {
        "patched_modules": len(patched), "dtype": str(net.dtype),
        "patched_vs_ours": (out - ref[want]).abs().max().item(),
        "unpatched_vs_ours": (base - ref[want]).abs().max().item(), "restored": (after - base).abs().max().item()}
report["patch_warnings"] = warnings.lines
print("@@@ " + json.dumps(report))
'''


def write_files(out: Path) -> dict:
    """The exports to add, our adapted model's outputs (``reference.safetensors``) and our LoRA layers per prefix."""
    from safetensors.torch import save_file

    from ldm.weights import export_diffusers
    from ldm.weights.export import Exportable
    from ldm.weights.files import read_safetensors

    model = random_sd1()
    probe = {name: str(path) for name, path in write_single_files(model, out).items()}
    export_diffusers(Exportable(model.state_dict(), model, {"config": {}}), out / "sd-v1-diffusers", progress=False)
    probe["diffusers_folder"] = str(out / "sd-v1-diffusers")
    add_recipe_lora(model, alpha=2 * recipe_lora()["rank"])  # strength 2: a reader that ignored alpha shows
    for name in write_lora_files(model, out / "lora"):
        probe[name] = str(out / "lora" / f"{name}.safetensors")
    folder = out / "diffusers-lora"  # InvokeAI's diffusers LoRA format: a folder holding diffusers' file name
    folder.mkdir()
    shutil.copy(probe["ours_diffusers"], folder / "pytorch_lora_weights.safetensors")
    probe["ours_diffusers_folder"] = str(folder)

    ids = model.cond_stage_model.tokenize(PROMPT)
    latents, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        context = model.cond_stage_model.transformer(ids)[0]
        eps = model.unet(latents, t, encoder_hidden_states=context).sample
    save_file({"ids": ids, "latents": latents, "timestep": t, "context": context.contiguous(), "eps": eps.contiguous()},
              out / "reference.safetensors")
    keys = read_safetensors(Path(probe["ours_kohya"]))[0]
    ours = {p: sum(k.startswith(p) and k.endswith(".lora_down.weight") for k in keys)
            for p in ("lora_te_", "lora_unet_")}
    return {"probe": probe, "reference": str(out / "reference.safetensors"), "lora": "ours_kohya",
            "model": "diffusers_folder", "ours": ours}


@pytest.fixture(scope="module")
def invokeai(tmp_path_factory):
    """Everything run once: the venv, the files and the InvokeAI subprocess; the files are deleted afterwards."""
    tmp = tmp_path_factory.mktemp("invokeai")
    try:
        start = time.time()
        python = cached_venv(VENV, INVOKEAI)
        timings = {"venv": time.time() - start}
        start = time.time()
        spec = write_files(tmp)
        timings["files + our outputs"] = time.time() - start
        start = time.time()
        log = run_script(python, RUNNER, spec, env={"INVOKEAI_ROOT": str(tmp / "invokeai-root"), "HF_HUB_OFFLINE": "1"})
        timings[f"InvokeAI (add {len(spec['probe'])} files, load, patch)"] = time.time() - start
        print("\n" + ", ".join(f"{k}: {v:.0f} s" for k, v in timings.items()))
        lines = re.findall(r"^@@@ (.+)$", log, flags=re.M)
        assert lines, log[-4000:]
        yield {**json.loads(lines[-1]), "ours": spec["ours"]}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def describe(row: dict) -> str:
    return ", ".join(f"{k} {row[k]}" for k in ("class", "type", "base", "format", "variant", "prediction_type"))


@pytest.mark.parametrize("name", ["fp32", "fp16"])
def test_invokeai_adds_our_single_file_as_an_sd1_main_checkpoint(invokeai, name):
    row = invokeai["probe"][name]
    print(f"\n{name}: {describe(row)} ({row['seconds']} s)")
    assert (row["type"], row["base"], row["format"], row["variant"], row["prediction_type"]) == \
        ("main", "sd-1", "checkpoint", "normal", "epsilon"), row


def test_invokeai_adds_our_diffusers_folder_as_an_sd1_main_model(invokeai):
    row = invokeai["probe"]["diffusers_folder"]
    print(f"\n{describe(row)}")
    assert (row["type"], row["base"], row["format"], row["variant"]) == ("main", "sd-1", "diffusers", "normal"), row


DIFFUSERS_LORA = pytest.mark.xfail(strict=True, raises=AssertionError, reason=(  # not a setup error
    "InvokeAI 6.14.2 tells an SD 1 LoRA by kohya names (lora_unet_..._attn2_to_k, lora_te_..._self_attn_) only: the "
    "diffusers-layout file is type unknown on its own and as pytorch_lora_weights.safetensors in a folder"))


@pytest.mark.parametrize("name, expected_format", [
    ("ours_kohya", "lycoris"),
    pytest.param("ours_diffusers", "lycoris", marks=DIFFUSERS_LORA),
    pytest.param("ours_diffusers_folder", "diffusers", marks=DIFFUSERS_LORA)])
def test_invokeai_adds_our_lora_as_an_sd1_lora(invokeai, name, expected_format):
    row = invokeai["probe"][name]
    print(f"\n{name}: {describe(row)}" + "".join(f"\n  {k}: {v}" for k, v in row.get("why", {}).items()))
    assert (row["type"], row["base"], row["format"]) == ("lora", "sd-1", expected_format), row


def test_invokeai_patches_every_layer_of_our_lora_at_our_strength(invokeai):
    layers, networks = invokeai["lora_layers"], invokeai["networks"]
    print(f"\nour kohya file: {invokeai['ours']} LoRA layers; InvokeAI read {layers}")
    for prefix, row in networks.items():
        print(f"{prefix}: {row['patched_modules']} modules patched ({row['dtype']}), max |patched - ours| "
              f"{row['patched_vs_ours']:.2e}, unpatched {row['unpatched_vs_ours']:.2e}, after unpatching "
              f"{row['restored']:.2e}")
    assert layers == invokeai["ours"] and all(layers.values())
    assert not invokeai["patch_warnings"], invokeai["patch_warnings"][:5]  # e.g. "Failed to find module for ..."
    for prefix, row in networks.items():
        assert row["patched_modules"] == layers[prefix], (prefix, row)
        assert row["patched_vs_ours"] < TOLERANCE, (prefix, row)  # our alpha / rank strength, on the right layers
        assert row["unpatched_vs_ours"] > 100 * TOLERANCE, (prefix, row)  # the adapters change the outputs
        assert row["restored"] == 0, (prefix, row)
