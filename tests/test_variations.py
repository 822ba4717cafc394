"""Image variations: the CLIP image conditioner, train/sample preprocessing parity, and the two-stage recipe
(stage 1 trains cross-attention only, stage 2 the whole UNet from stage 1's weights) through main.py."""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.config import load_yaml
from ldm.models.conditioners import CLIPImageConditioner
from ldm.util import ConfigError, instantiate_from_config
from ldm.weights import load_model
from tests.conftest import main_py, run_dirs, write_train_yaml

REPO = Path(__file__).resolve().parents[1]
TINY_VAR = REPO / "configs" / "tiny" / "tiny-variations.yaml"
STAGE1 = REPO / "configs" / "image-variations.yaml"
STAGE2 = REPO / "configs" / "image-variations-stage2.yaml"


def tiny_section() -> dict:
    return OmegaConf.to_container(OmegaConf.load(TINY_VAR).model, resolve=True)


def save_training_ckpt(path: Path, cfg: dict, seed: int = 0):
    """A checkpoint shaped like main.py's (state_dict + the config it was built from)."""
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg)
    torch.save({"state_dict": model.state_dict(), "config": {"model": cfg, "data": {}}, "global_step": 0}, path)
    return model


def images(seed: int = 0, h: int = 48, w: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, h, w, generator=g) * 2 - 1


def sampled_context(model, x: torch.Tensor) -> torch.Tensor:
    """The cross-attention context the UNet actually receives while ``generate`` samples variations of ``x``."""
    seen = []
    forward = model.unet.forward

    def spy(*args, **kwargs):
        seen.append(kwargs["encoder_hidden_states"].clone())
        return forward(*args, **kwargs)

    model.unet.forward = spy
    model.generate(x, seeds=[0, 1], size=16, steps=1, guidance_scale=1.0)
    model.unet.forward = forward
    return seen[0]


def test_conditioner_shapes_unconditional_and_drop():
    cond = instantiate_from_config(tiny_section()["params"]["cond_stage_config"])
    x = images()
    emb = cond(x)
    assert emb.shape == (2, 1, 32) and not emb.requires_grad
    assert torch.equal(cond.unconditional(3), torch.zeros(3, 1, 32))
    dropped = cond(x, drop=torch.tensor([True, False]))
    assert torch.equal(dropped[0], torch.zeros(1, 32)) and torch.equal(dropped[1], emb[1])
    assert not any(p.requires_grad for p in cond.parameters())
    cond.train()
    assert not cond.encoder.training  # frozen stays in eval mode (no dropout) under Lightning's .train()
    with pytest.raises(ConfigError, match="interpolation"):
        CLIPImageConditioner(config={"image_size": 16, "patch_size": 4}, interpolation="lanczos")


def test_no_text_encoder_is_built():
    model = instantiate_from_config(tiny_section())
    names = {type(m).__name__ for m in model.modules()}
    assert "CLIPVisionModelWithProjection" in names and not {"CLIPTextModel", "CLIPTextTransformer"} & names


def test_negative_prompt_on_an_image_model_is_one_clear_error():
    torch.manual_seed(0)
    model = instantiate_from_config(tiny_section()).eval()
    with pytest.raises(ConfigError, match="negative prompt 'blurry'.*conditioned on images, not text"):
        model.generate(images(), seeds=[0, 1], size=16, steps=1, guidance_scale=3.0, negative_prompt="blurry")


def test_embedding_is_identical_at_train_and_sample_time(tmp_path):
    """The checkpoint carries the preprocessing settings; a model loaded for sampling embeds the same image into
    the very same context that training conditioned on, and a different antialias setting changes it."""
    cfg = tiny_section()
    model = save_training_ckpt(tmp_path / "a.ckpt", cfg)
    x = images()
    train_context = model.conditioning({"image": x})
    loaded = load_model(tmp_path / "a.ckpt")
    params = loaded.weights_config["params"]["cond_stage_config"]["params"]
    assert (params["interpolation"], params["antialias"]) == ("bicubic", True)
    assert torch.equal(sampled_context(loaded, x), train_context)

    other = copy.deepcopy(cfg)
    other["params"]["cond_stage_config"]["params"]["antialias"] = False
    save_training_ckpt(tmp_path / "b.ckpt", other)
    no_aa = load_model(tmp_path / "b.ckpt")
    assert no_aa.cond_stage_model.antialias is False
    diff = (sampled_context(no_aa, x) - train_context).abs().max()
    assert diff > 1e-3, "antialias must change the embedding of a downsized image"


def test_log_images_samples_variations_of_the_batch_images():
    model = instantiate_from_config(tiny_section()).eval()
    out = model.log_images({"image": images(h=16, w=16)}, n=2, steps=2)
    assert out["samples_cfg3"].shape == (2, 3, 16, 16) and "inputs" in out


def unet_state(ckpt: Path) -> dict[str, torch.Tensor]:
    state = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in state.items() if k.startswith("unet.")}


def test_stage1_then_stage2_recipe_end_to_end(tmp_path, image_folder):
    start = tmp_path / "start.ckpt"
    save_training_ckpt(start, tiny_section(), seed=3)
    data = write_train_yaml(tmp_path / "train.yaml", image_folder, batch_size=2, repeats=2, image_every=0,
                            trainer={"max_steps": 3, "precision": "32-true", "benchmark": False})
    overrides = ["model.base_learning_rate=1e-3"]

    r1 = main_py("-t", "--base", STAGE1, TINY_VAR, data, "-l", tmp_path / "logs", "-n", "stage1",
                 "--finetune_from", start, *overrides)
    assert r1.returncode == 0, r1.stderr[-3000:]
    run1 = run_dirs(tmp_path / "logs")[0]
    before, after = unet_state(start), unet_state(run1 / "checkpoints" / "last.ckpt")
    attn2 = [k for k in before if ".attn2." in k]
    assert attn2 and before.keys() == after.keys()
    for k in before:
        if ".attn2." in k:
            continue
        assert torch.equal(before[k], after[k]), f"{k} changed in stage 1"
    assert all(not torch.equal(before[k], after[k]) for k in attn2 if k.endswith(".weight"))
    ckpt = torch.load(run1 / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert len(ckpt["optimizer_states"][0]["state"]) == len(attn2)
    assert sum(len(g["params"]) for g in ckpt["optimizer_states"][0]["param_groups"]) == len(attn2)
    assert ckpt["config"]["model"]["params"]["cond_stage_config"]["params"]["antialias"] is True

    r2 = main_py("-t", "--base", STAGE2, TINY_VAR, data, "-l", tmp_path / "logs2", "-n", "stage2",
                 "--finetune_from", run1, *overrides)
    assert r2.returncode == 0, r2.stderr[-3000:]
    final = unet_state(run_dirs(tmp_path / "logs2")[0] / "checkpoints" / "last.ckpt")
    changed = [k for k in after if not torch.equal(after[k], final[k])]
    assert any(".attn2." not in k for k in changed) and len(changed) > len(attn2)


def test_recipe_files_say_what_the_recipe_says():
    s1, s2 = load_yaml(STAGE1), load_yaml(STAGE2)
    assert s1.model.params.trainable == "attn2" and s2.model.params.trainable == "all"
    assert s1.model.base_learning_rate == 1e-5 and s1.data.params.batch_size == 4
    assert (s1.lightning.trainer.accumulate_grad_batches, s2.lightning.trainer.accumulate_grad_batches) == (4, 5)
    assert s1.model.params.cond_stage_key == "image"
    assert s1.model.params.unet_config.params.config.cross_attention_dim == 768
    vision = s1.model.params.cond_stage_config.params.config
    assert (vision.image_size, vision.patch_size, vision.hidden_size, vision.projection_dim) == (224, 14, 1024, 768)
    a, b = OmegaConf.to_container(s1.model), OmegaConf.to_container(s2.model)
    a["params"].pop("trainable"), b["params"].pop("trainable")
    a["params"].pop("scheduler_config"), b["params"].pop("scheduler_config")
    assert a == b  # same architecture, conditioner and preprocessing in both stages


def test_full_size_recipe_is_sd_v1_unet_with_vit_l14_image_context():
    """Built on the meta device (shapes only): SD v1's UNet and VAE, ViT-L/14's vision tower + projection, no text
    encoder; a 512 px image becomes a (B, 1, 768) context the UNet takes."""
    cfg = OmegaConf.to_container(load_yaml(STAGE1).model, resolve=True)
    cfg["params"]["pretrained"] = None
    cfg["params"]["cond_stage_config"]["params"]["pretrained"] = None
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
        context = model.cond_stage_model(torch.empty(2, 3, 512, 512, device="meta"))
        out = model.unet(torch.empty(2, 4, 64, 64), torch.tensor([1, 999]), encoder_hidden_states=context).sample
    assert sum(p.numel() for p in model.unet.parameters()) == 859_520_964
    vision = model.cond_stage_model.encoder
    assert sum(p.numel() for p in vision.visual_projection.parameters()) == 1024 * 768
    assert context.shape == (2, 1, 768) and out.shape == (2, 4, 64, 64)
    assert model.trainable_names and all(".attn2." in n for n in model.trainable_names)
