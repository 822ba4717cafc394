"""The Hub folder (scripts/convert.py --hub) of a DreamBooth LoRA run: diffusers loads it with variant="fp16", its
LoRA files are the run's adapter, and its model card has the run's trigger and settings and links images that
exist. Nothing touches the network."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from tests.test_lora import tiny_folder  # noqa: F401 (fixture)
from tests.test_lora_files import PROMPT, adapted_model, outputs, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

LORA = {"rank": 4, "alpha": 8, "text_encoder": True}


def lora_run(folder: Path, root: Path) -> Path:
    """A run dir as main.py leaves it after a DreamBooth LoRA run: resolved configs, last.ckpt, sample grids."""
    from omegaconf import OmegaConf

    from tests.test_model import TINY

    model = adapted_model(folder, LORA)
    cfg = OmegaConf.to_container(OmegaConf.load(TINY), resolve=True)
    cfg["model"]["params"].update(pretrained=str(folder), use_ema=False, lora=LORA)
    data = {"params": {"batch_size": 1, "train": {"target": "ldm.data.dreambooth.DreamBoothDataset", "params": {
        "instance_prompt": "a photo of sks dog", "class_prompt": "a photo of a dog", "with_prior_preservation": True}}}}
    project = {"model": cfg["model"], "data": data}
    lightning = {"lightning": {"trainer": {"max_steps": 3, "precision": "32-true"}}}
    run = root / "2024-05-01T12-00-00_sks-dog"
    (run / "configs").mkdir(parents=True)
    (run / "configs" / "2024-05-01T12-00-00-project.yaml").write_text(yaml.safe_dump(project))
    (run / "configs" / "2024-05-01T12-00-00-lightning.yaml").write_text(yaml.safe_dump(lightning))
    (run / "checkpoints").mkdir()
    torch.save({"state_dict": model.state_dict(), "config": project, "global_step": 3,
                "sampler_config": dict(model.sampler_config)}, run / "checkpoints" / "last.ckpt")
    for step in (1, 3):
        (run / "images" / "train").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (step * 40, 0, 0)).save(run / "images" / "train" / f"dreambooth_gs-{step:06}.png")
    return run


def test_hub_folder_loads_in_fp16_with_the_adapter_merged_and_a_card_that_renders_its_images(tiny_folder, tmp_path,
                                                                                           capsys):
    from convert import main as convert
    from safetensors.torch import load_file

    run = lora_run(tiny_folder, tmp_path / "logs")
    out = tmp_path / "hub"
    assert convert([str(run), "--hub", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "hf upload <user>/<model>" in printed and printed.count("tensors applied") == 2
    # diffusers reads the fp16 variant (and the fp32 files), and it samples as the run's adapted model does.
    for sub in ("unet", "vae", "text_encoder"):
        assert len(list((out / sub).glob("*.fp16.safetensors"))) == 1
    from diffusers import StableDiffusionPipeline

    fp16 = StableDiffusionPipeline.from_pretrained(str(out), variant="fp16", torch_dtype=torch.float16,
                                                   safety_checker=None, requires_safety_checker=False)
    assert fp16.unet.dtype == fp16.text_encoder.dtype == torch.float16
    model = adapted_model(tiny_folder, LORA)
    ids = model.cond_stage_model.tokenize(PROMPT)
    ours = outputs(model.unet, model.cond_stage_model.transformer, ids)
    fp32 = pipeline(out)
    assert torch.allclose(outputs(fp32.unet, fp32.text_encoder, ids)[1], ours[1], atol=1e-4)
    # The run's adapter in both layouts, on the base model, gives the same.
    assert {"sks-dog.safetensors", "sks-dog-lora.safetensors", "pytorch_lora_weights.safetensors"} <= \
        {p.name for p in out.iterdir()}
    assert any(k.endswith(".alpha") for k in load_file(out / "sks-dog-lora.safetensors"))
    base = pipeline(tiny_folder)
    base.load_lora_weights(str(out))  # finds pytorch_lora_weights.safetensors by diffusers' default name
    assert torch.allclose(outputs(base.unet, base.text_encoder, ids)[1], ours[1], atol=1e-5)
    # The model card: front matter, trigger, settings, and images that exist beside it.
    card = (out / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["instance_prompt"] == "a photo of sks dog" and front["license"] == "unknown"
    assert {"stable-diffusion", "text-to-image", "diffusers", "lora", "dreambooth"} <= set(front["tags"])
    assert "| learning rate (model.base_learning_rate) | 0.0001 |" in card and "| LoRA rank / alpha | 4 / 8 |" in card
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", card)
    assert links == ["images/train-dreambooth_gs-000003.png"] and all((out / link).is_file() for link in links)


def test_push_with_the_hub_offline_says_what_to_run(tiny_folder, tmp_path, capsys):
    from convert import main as convert

    run = lora_run(tiny_folder, tmp_path / "logs")
    assert convert([str(run), "--hub", str(tmp_path / "hub"), "--push", "me/sks-dog", "--quiet"]) == 2
    assert "HF_HUB_OFFLINE is set" in capsys.readouterr().err
    assert convert([str(run), "--push", "me/x", "--single-file", str(tmp_path / "x.safetensors")]) == 2


@pytest.mark.parametrize("pretrained, expected", [
    ("runwayml/stable-diffusion-v1-5", ("runwayml/stable-diffusion-v1-5", "creativeml-openrail-m")),
    ("/cache/models--stabilityai--stable-diffusion-2-1/snapshots/abc", ("stabilityai/stable-diffusion-2-1", "openrail++")),
    (None, (None, "unknown"))])
def test_base_model_and_licence_from_the_config(pretrained, expected):
    from ldm.hub import base_model

    assert base_model(pretrained) == expected
