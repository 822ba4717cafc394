"""The published image-variations layouts: a diffusers folder with image_encoder/ and feature_extractor/ that
StableDiffusionImageVariationPipeline loads, and the original single file with OpenAI CLIP's image tower under
cond_stage_model.model.visual; both exported from a training checkpoint and loaded back bit-exactly."""
from __future__ import annotations

import json

import pytest
import torch

from ldm.util import ConfigError
from ldm.weights import export_diffusers, export_single_file, load_model, prepare
from ldm.weights.original import VISUAL, describe, project_to_original
from tests.test_variations import TINY_VAR, images, save_training_ckpt, tiny_section


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("varexport")
    cfg = tiny_section()
    cfg["params"]["cond_stage_config"]["params"]["interpolation"] = "bilinear"
    save_training_ckpt(root / "a.ckpt", cfg, seed=2)
    out = export_diffusers(prepare(root / "a.ckpt"), root / "folder", progress=False)
    return root / "a.ckpt", out


def test_folder_has_the_pipeline_layout_and_diffusers_loads_it(exported):
    from diffusers import StableDiffusionImageVariationPipeline

    ckpt, folder = exported
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["feature_extractor", "image_encoder",
                                                                      "scheduler", "unet", "vae"]
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionImageVariationPipeline" and "text_encoder" not in index
    prep = json.loads((folder / "feature_extractor" / "preprocessor_config.json").read_text())
    assert prep["resample"] == 2 and prep["crop_size"] == {"height": 16, "width": 16}
    pipe = StableDiffusionImageVariationPipeline.from_pretrained(folder, safety_checker=None)
    ours = load_model(ckpt)
    for name, value in pipe.image_encoder.state_dict().items():
        assert torch.equal(value, ours.cond_stage_model.encoder.state_dict()[name]), name


def test_folder_loads_back_bit_exact_with_its_preprocessing(exported):
    ckpt, folder = exported
    a, b = load_model(ckpt), load_model(folder)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    cond = b.cond_stage_model
    assert (cond.interpolation, cond.antialias, cond.image_size) == ("bilinear", True, 16)
    assert b.cond_stage_key == "image"
    x = images()
    assert torch.equal(a.cond_stage_model(x), cond(x))
    assert "image-variations" in b.weights_summary or "diffusers" in b.weights_summary


def test_single_file_round_trip_keeps_weights_and_preprocessing(exported, tmp_path):
    ckpt = exported[0]
    out = export_single_file(prepare(ckpt), tmp_path / "var.safetensors", progress=False)
    from ldm.weights.files import read_safetensors

    tensors, _ = read_safetensors(out)
    assert any(k.startswith(VISUAL + "transformer.resblocks.") for k in tensors)
    assert VISUAL + "proj" in tensors and not any(k.startswith("cond_stage_model.encoder.") for k in tensors)
    assert describe(tensors).startswith("image-variations-shaped (CLIP image encoder, 32-d context")
    a, b = load_model(ckpt), load_model(out)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert b.cond_stage_model.interpolation == "bilinear"  # the config travels in the file's metadata


def open_clip_model(seed: int = 3):
    """A tiny OpenAI-style CLIP from open_clip (the layout original variations checkpoints hold), shaped like
    configs/tiny/tiny-variations.yaml's image encoder."""
    import open_clip

    torch.manual_seed(seed)
    vision = dict(image_size=16, patch_size=4, width=32, head_width=8, layers=2, mlp_ratio=2.0)
    text = dict(context_length=8, vocab_size=100, width=32, heads=4, layers=1)
    return open_clip.model.CLIP(embed_dim=32, vision_cfg=vision, text_cfg=text, quick_gelu=True).eval()


def test_original_variations_checkpoint_loads_with_the_same_image_embedding(tmp_path):
    """A CompVis-style variations .ckpt (UNet, VAE, and a whole OpenAI CLIP model of which only the image tower
    is used) loads into the variations model, and the conditioner embeds images exactly as OpenAI CLIP does."""
    clip = open_clip_model()
    base = save_training_ckpt(tmp_path / "base.ckpt", tiny_section(), seed=4)
    state = {k: v for k, v in project_to_original(base.state_dict(), base.weight_components()).items() if not k.startswith(VISUAL)}
    state.update({"cond_stage_model.model." + k: v for k, v in clip.state_dict().items()})
    torch.save({"state_dict": state, "global_step": 7}, tmp_path / "original.ckpt")
    with pytest.raises(ConfigError, match="image-variations-shaped"):
        load_model(tmp_path / "original.ckpt")  # not SD v1's size: its architecture must be given
    model = load_model(tmp_path / "original.ckpt", config=TINY_VAR)
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.cond_stage_model.encoder(pixel_values=pixels).image_embeds
        theirs = clip.encode_image(pixels)
    assert torch.allclose(ours, theirs, atol=1e-5), (ours - theirs).abs().max()
    for name, value in base.unet.state_dict().items():
        assert torch.equal(model.unet.state_dict()[name], value), name


def test_sd_sized_variations_file_gets_the_recipe_architecture(tmp_path):
    """A full-size original variations file needs no config: it is recognised and built as
    configs/image-variations.yaml's model (checked on the meta device: no memory, no download)."""
    from ldm.util import instantiate_from_config
    from ldm.weights.load import for_inference, resolve_config
    from ldm.weights.source import Source

    key = "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k.weight"
    state = {key: torch.zeros(320, 768), VISUAL + "proj": torch.zeros(1024, 768)}
    section, origin = resolve_config(Source(tmp_path / "sd-image-variations.ckpt", "original", state))
    assert "image-variations.yaml" in origin and "SD image variations" in origin
    with torch.device("meta"):
        model = instantiate_from_config(for_inference(section))
    assert model.cond_stage_key == "image" and model.cond_stage_model.encoder.config.hidden_size == 1024
    assert model.unet.config.cross_attention_dim == 768
