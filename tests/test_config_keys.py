"""Keys a config sets do something: TextOnly's output_size is the validation sample size, model.params.monitor is
the metric top-k checkpoints are kept by, and the checkpoint callback has one key (lightning.modelcheckpoint)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.text_only import TextOnly
from ldm.launch import build_callbacks, default_callbacks
from ldm.util import ConfigError
from tests.test_model import tiny_model


def test_output_size_is_the_size_validation_prompts_are_sampled_at():
    batch = next(iter(DataLoader(TextOnly(["a cat", "a dog"], output_size=[16, 24]), batch_size=2)))
    model = tiny_model()
    images = model.log_images(batch, n=2, steps=1)
    assert images["samples_cfg3"].shape == (2, 3, 16, 24)
    default = next(iter(DataLoader(TextOnly(["a cat"]), batch_size=1)))
    assert "height" not in default  # without output_size the model's own size
    with pytest.raises(ConfigError, match="output_size must be a multiple of 8"):
        TextOnly(["a cat"], output_size=30)


def test_validation_prompts_and_the_image_logger_sample_at_several_sizes():
    prompts = TextOnly(["a cat", "a dog"], output_size=[[16, 16], [16, 24], [24, 16]])
    assert len(prompts) == 6
    assert [prompts[i]["seed"] for i in range(3)] == [0, 0, 0]  # every size of a prompt with its seed
    batch = next(iter(DataLoader(prompts, batch_size=6)))
    images = tiny_model().log_images(batch, n=6, steps=1)
    assert {k: tuple(v.shape) for k, v in images.items()} == {
        "samples_cfg3_16x16": (2, 3, 16, 16), "samples_cfg3_24x16": (2, 3, 16, 24), "samples_cfg3_16x24": (2, 3, 24, 16)}
    one = next(iter(DataLoader(TextOnly(["a cat"]), batch_size=1)))
    logged = tiny_model().log_images(one, n=1, steps=1, sizes=[[16, 24], [24, 16]])
    assert sorted(logged) == ["samples_cfg3_16x24", "samples_cfg3_24x16"]
    with pytest.raises(ConfigError, match="image_logger.sizes"):
        from ldm.callbacks.image_logger import ImageLogger
        ImageLogger("/tmp", sizes=[[30, 16]])


def test_monitor_is_the_metric_top_k_checkpoints_are_kept_by(tmp_path):
    config = {"model": {"params": {"monitor": "val/loss_ema"}}}
    keep = {"modelcheckpoint": {"params": {"save_top_k": 2}}}
    blocks = default_callbacks(tmp_path, "now", config, keep, False)
    assert blocks["checkpoint"]["params"]["monitor"] == "val/loss_ema"
    every = default_callbacks(tmp_path, "now", config, {}, False)
    assert "monitor" not in every["checkpoint"]["params"]  # keeping every epoch needs no metric


def test_the_checkpoint_callback_is_configured_under_one_key(tmp_path):
    defaults = default_callbacks(Path(tmp_path), "now", {}, {}, False)
    with pytest.raises(ConfigError, match="lightning.modelcheckpoint.params"):
        build_callbacks({"callbacks": {"checkpoint": {"params": {"every_n_epochs": 5}}}}, defaults)


def test_recipes_include_their_named_architecture_and_loading_never_reads_a_recipe(tmp_path):
    """configs/architectures/*.yaml is the one place an architecture is written out: the recipes include it with
    `base:`, and ldm.weights resolves an unlabelled SD v1 file to it, so editing configs/pokemon.yaml changes how
    that recipe trains, never how other files load."""
    from ldm.config import load_yaml
    from ldm.weights import load as weights_load

    repo = Path(__file__).resolve().parents[1]
    arch = load_yaml(repo / "configs" / "architectures" / "sd-v1.yaml").model.params
    for recipe in ("pokemon", "simpsons", "dreambooth"):
        params = load_yaml(repo / "configs" / f"{recipe}.yaml").model.params
        for block in ("unet_config", "first_stage_config", "cond_stage_config"):
            assert params[block].params.config == arch[block].params.config, (recipe, block)
        text = (repo / "configs" / f"{recipe}.yaml").read_text()
        assert not re.search(r"^\s+config:", text, re.M)  # no architecture written out in the recipe
    assert weights_load.SD_V1_CONFIG.parent.name == "architectures"
    assert weights_load.VARIATIONS_CONFIG.parent.name == "architectures"
    loop = tmp_path / "a.yaml"
    loop.write_text("base: [a.yaml]\nmodel: {}\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_yaml(loop)
