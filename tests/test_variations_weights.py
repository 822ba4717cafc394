"""The published image-variations layout: a diffusers folder with image_encoder/ and feature_extractor/ that
StableDiffusionImageVariationPipeline loads, exported from a training checkpoint and loaded back bit-exactly."""
from __future__ import annotations

import json

import pytest
import torch

from ldm.util import ConfigError
from ldm.weights import export_diffusers, export_single_file, load_model, prepare
from tests.test_variations import images, save_training_ckpt, tiny_section


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


def test_single_file_export_is_refused_in_one_line(exported, tmp_path):
    with pytest.raises(ConfigError, match="diffusers folder"):
        export_single_file(prepare(exported[0]), tmp_path / "x.safetensors", progress=False)
