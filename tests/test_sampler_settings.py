"""The one sampling path's seed rule and scheduler settings: LatentDiffusion.generate (every callback) gives each
image its own generator, as diffusers does with a list of them; a diffusers folder's scheduler config is honoured;
sampler_config defaults, overrides and travels in checkpoints and on the command line."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

from ldm import inference
from tests.test_sampling import (REPO, SCALE, STEPS, cli, folder, gen, mad, maxdiff, model, pipes,  # noqa: F401
                                 png, reference_scheduler, script)


@pytest.mark.parametrize("sampler", ["euler_a", "ddpm", "ddim"])
def test_generate_gives_each_image_its_own_seed_in_any_batch(model, pipes, sampler):
    """LatentDiffusion.generate (every callback) is txt2img with one generator per image: the same prompt and seed
    draw the same image alone or beside others, with stochastic samplers too (DDIM with eta 1), and equal
    diffusers' pipeline given the same list of generators."""
    eta = 1.0 if sampler == "ddim" else 0.0
    kwargs = dict(size=16, sampler=sampler, steps=STEPS, guidance_scale=SCALE, eta=eta)
    batch = inference.to_uint8(model.generate(["a red dog", "a photo of a cat", "a tree"], [11, 12, 13], **kwargs))
    alone = inference.to_uint8(model.generate(["a photo of a cat"], [12], **kwargs))
    assert maxdiff(batch[1], alone[0]) == 0
    other_mates = inference.to_uint8(model.generate(["a photo of a cat", "a boat"], [12, 99], **kwargs))
    assert maxdiff(other_mates[0], alone[0]) == 0
    pipe = pipes[0]
    pipe.scheduler = reference_scheduler(pipe, sampler)
    theirs = np.stack(pipe(["a red dog", "a photo of a cat", "a tree"], height=16, width=16, num_inference_steps=STEPS,
                           guidance_scale=SCALE, eta=eta, generator=[gen(11), gen(12), gen(13)]).images)
    assert maxdiff(batch, theirs) <= 1
    assert mad(batch[0], batch[1]) > 10.0


def test_a_folders_scheduler_settings_are_honoured(folder, pipes):
    """The folder diffusers wrote says timestep_spacing 'leading' and has no clip_sample key: DPM++ then steps
    [901, 811, ...] and DDIM clips x0, in diffusers and here alike."""
    from ldm.sampling import make_scheduler

    config = pipes[0].folder_scheduler.config
    assert config.timestep_spacing == "leading" and "clip_sample" not in config
    dpm = make_scheduler("dpm++", model_sampler := inference.load(str(folder)).sampler_config)
    dpm.set_timesteps(10)
    assert dpm.timesteps.tolist()[:2] == [901, 811] and dpm.timesteps.tolist()[-1] == 91
    assert make_scheduler("ddim", model_sampler).config.clip_sample is True


def test_sampler_config_defaults_override_and_travel_in_checkpoints(tmp_path):
    """Models trained here sample with clip_sample off (pixel space too: it cost the digits demo 57 points), and
    model.params.sampler_config overrides any key; the resolved settings travel in checkpoints."""
    from ldm.sampling import make_scheduler
    from ldm.util import instantiate_from_config
    from ldm.weights.load import load_model

    section = digits_section()
    pixel = instantiate_from_config(section)
    assert make_scheduler("ddim", pixel.sampler_config).config.clip_sample is False
    assert make_scheduler("dpm++", pixel.sampler_config).config.steps_offset == 1
    make_tiny_sd = script("make_tiny_sd")
    latent = instantiate_from_config(make_tiny_sd.model_config(make_tiny_sd.TINY_CONFIG))
    assert make_scheduler("ddim", latent.sampler_config).config.clip_sample is False
    section["params"]["sampler_config"] = {"clip_sample": True, "timestep_spacing": "trailing"}
    override = instantiate_from_config(section)
    assert make_scheduler("ddim", override.sampler_config).config.clip_sample is True
    assert override.sampler_config["steps_offset"] == 1  # a YAML sampler_config changes only the keys it names
    ckpt = tmp_path / "m.ckpt"
    torch.save({"state_dict": override.state_dict(), "config": {"model": digits_section()},
                "sampler_config": override.sampler_config}, ckpt)
    loaded = load_model(ckpt)
    assert loaded.sampler_config["timestep_spacing"] == "trailing" and loaded.sampler_config["clip_sample"] is True


def digits_section() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(REPO / "configs" / "demo" / "digits.yaml").model, resolve=True)


def test_sampler_config_on_the_command_line_changes_the_sampler_and_redraws(folder, pipes, tmp_path):
    """--sampler_config clip_sample=false overrides the folder's (diffusers' DDIM default True) and is recorded in the
    PNG, so --from-png draws the same image; diffusers with the same setting draws it too."""
    out = tmp_path / "o"
    args = ["--ckpt", folder, "--prompt", "a cat", "--n_samples", 1, "--n_iter", 1, "--seed", 3, "--ddim_steps", STEPS,
            "--scale", SCALE, "--outdir", out, "--skip_grid"]
    assert cli([*args, "--sampler_config", "clip_sample=false"]) == 0
    assert cli([*args, "--outdir", tmp_path / "clipped"]) == 0
    unclipped, clipped = png(out / "samples" / "00000.png"), png(tmp_path / "clipped" / "samples" / "00000.png")
    pipe = pipes[0]
    pipe.scheduler = DDIMScheduler.from_config(pipe.folder_scheduler.config, clip_sample=False)
    theirs = pipe(["a cat"], height=16, width=16, num_inference_steps=STEPS, guidance_scale=SCALE,
                  generator=gen(3)).images[0]
    assert maxdiff(unclipped, theirs) <= 1 and mad(unclipped, clipped) > 1.0
    assert cli(["--from-png", out / "samples" / "00000.png", "--outdir", tmp_path / "again"]) == 0
    assert maxdiff(png(tmp_path / "again" / "samples" / "00000.png"), unclipped) == 0


def test_a_sampler_setting_no_sampler_takes_is_one_clear_error():
    from ldm.sampling import resolve_sampler_config
    from ldm.util import ConfigError

    with pytest.raises(ConfigError, match="'clip_sampel' is not a setting of any sampler.*did you mean clip_sample"):
        resolve_sampler_config({"clip_sampel": True}, {})
    # A diffusers folder's config is taken whole, keys of newer diffusers versions included.
    assert resolve_sampler_config({"_class_name": "PNDMScheduler", "new_key": 1}, {})["new_key"] == 1
