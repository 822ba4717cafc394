"""The parts talk through declared interfaces (ldm.models.parts): outside ldm/models nothing reaches into the
library objects a conditioner or first stage wraps, and LoRA on an image-variations model works end to end
instead of failing after training."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.parts import Conditioner, FirstStage
from ldm.util import ConfigError, instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
TINY_VAR = REPO / "configs" / "tiny" / "tiny-variations.yaml"
# The wrapped objects' attribute names, by the part that holds them: CLIP text (transformer, tokenize), CLIP image
# (encoder), the VAE (vae), the EMA's private name table.
WRAPPED = {"cond_stage_model": {"transformer", "encoder", "tokenize"}, "first_stage_model": {"vae"},
           "model_ema": {"names"}}


def wrapped_reads(source: str) -> list[int]:
    """Lines with ``<x>.cond_stage_model.transformer``-like attribute reads, or ``hasattr(<x>.<part>, ...)``."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and \
                node.attr in WRAPPED.get(node.value.attr, ()):
            lines.append(node.lineno)
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("hasattr", "getattr") and node.args and \
                isinstance(node.args[0], ast.Attribute) and node.args[0].attr in WRAPPED:
            lines.append(node.lineno)
    return sorted(set(lines))


def test_nothing_outside_the_models_reads_the_wrapped_objects():
    offenders = []
    for path in sorted([*REPO.glob("ldm/**/*.py"), *REPO.glob("scripts/*.py"), REPO / "main.py"]):
        rel = path.relative_to(REPO).as_posix()
        if rel.startswith("ldm/models/"):
            continue
        source = path.read_text()
        offenders += [f"{rel}:{n}: {source.splitlines()[n - 1].strip()}" for n in wrapped_reads(source)]
    assert offenders == []


def test_the_check_finds_what_it_looks_for():
    assert wrapped_reads("t = model.cond_stage_model.transformer.config\nok = model.cond_stage_model.kind") == [1]
    assert wrapped_reads("if hasattr(model.cond_stage_model, 'preprocess'): pass") == [1]
    assert wrapped_reads('"""cond_stage_model.transformer.text_model.*"""') == []


def variations_model(**params):
    cfg = OmegaConf.load(TINY_VAR).model
    for key, value in params.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    return instantiate_from_config(OmegaConf.to_container(cfg, resolve=True))


def test_parts_declare_what_they_offer():
    model = variations_model()
    assert isinstance(model.cond_stage_model, Conditioner) and isinstance(model.first_stage_model, FirstStage)
    assert model.cond_stage_model.kind == "image" and model.cond_stage_model.lora_modules() == {}
    rows = {row.diffusers: row for row in model.weight_components()}
    assert set(rows) == {"unet", "vae", "image_encoder"}
    state = model.state_dict()
    for row in rows.values():  # every declared prefix holds exactly its module's tensors
        assert {k[len(row.prefix):] for k in state if k.startswith(row.prefix)} == set(row.module.state_dict())
    with pytest.raises(ConfigError, match="conditioned on images, not text"):
        model.cond_stage_model.negative("blurry", 1)


def test_a_part_that_is_not_the_interface_is_refused_with_one_line():
    with pytest.raises(ConfigError, match="cond_stage_config: .* is not a ldm.models.parts.Conditioner"):
        variations_model(**{"params.cond_stage_config": {"target": "torch.nn.Identity"}})


def test_lora_on_an_image_variations_model_saves_and_loads(tmp_path):
    """Defect: SaveLora.on_train_end raised AttributeError 'CLIPImageConditioner' has no 'transformer' after the
    whole run. Now the UNet's adapters are saved and load back onto the base to the same outputs."""
    from ldm.lora import SaveLora, load_lora

    model = variations_model(**{"params.lora": {"rank": 4, "alpha": 4}})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    trainer = type("T", (), {"default_root_dir": str(tmp_path)})()
    SaveLora().on_train_end(trainer, model.eval())
    path = tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    assert path.is_file()
    base = variations_model()
    base.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.state_dict().items()
                          if ".lora_" not in k}, strict=False)
    load_lora(base.eval(), path)
    image = torch.rand(2, 3, 16, 16) * 2 - 1
    a = model.generate(image, [1, 2], size=16, steps=2)
    b = base.generate(image, [1, 2], size=16, steps=2)
    assert torch.allclose(a, b, atol=1e-5)


def test_text_encoder_lora_on_an_image_model_is_refused_at_start():
    with pytest.raises(ConfigError, match="lora.text_encoder: true, but the conditioner CLIP image encoder"):
        variations_model(**{"params.lora": {"rank": 4, "text_encoder": True}})


def test_a_pixel_space_model_has_no_diffusers_folder_and_says_so_in_one_line(tmp_path):
    """A first stage without a VAE declares no weight component; the folder export refuses before writing."""
    from ldm.weights import export_diffusers, prepare

    section = OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "demo" / "digits.yaml").model, resolve=True)
    model = instantiate_from_config(section)
    assert not model.first_stage_model.has_vae and model.first_stage_model.image_channels == 1
    torch.save({"state_dict": model.state_dict(), "config": {"model": section}, "global_step": 1}, tmp_path / "m.ckpt")
    with pytest.raises(ConfigError, match="pixel-space model .no VAE."):
        export_diffusers(prepare(tmp_path / "m.ckpt"), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
