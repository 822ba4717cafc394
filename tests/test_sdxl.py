"""SDXL: the two-encoder conditioner, its size micro-conditioning, the configs, and sampling held to diffusers.

SDXL weights cannot be downloaded here: the full-size architecture is built on the meta device and checked against
the published parameter counts; everything that reads weights runs on the tiny SDXL-shaped folder that
``scripts/make_tiny_sd.py --sdxl`` writes through diffusers' own ``StableDiffusionXLPipeline.save_pretrained``.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline)
from omegaconf import OmegaConf

from ldm import inference, outputs
from ldm.config import merge_configs
from ldm.models.parts import cat_conditioning, where_dropped
from ldm.util import ConfigError, count_params, instantiate_from_config

ROOT = Path(__file__).resolve().parent.parent
ARCH, RECIPE, TINY = (ROOT / "configs/architectures/sdxl.yaml", ROOT / "configs/sdxl.yaml",
                      ROOT / "configs/tiny/tiny-sdxl.yaml")
# stabilityai/stable-diffusion-xl-base-1.0 built from its unet/, text_encoder*/ and vae/ config.json files.
SDXL_COUNTS = {"unet": 2_567_463_684, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840, "vae": 83_653_863}
REFERENCE = {"euler": EulerDiscreteScheduler, "ddim": DDIMScheduler, "dpm++": DPMSolverMultistepScheduler,
             "euler_a": EulerAncestralDiscreteScheduler}
STEPS, SCALE, H, W = 4, 5.0, 32, 24


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    """The tiny SDXL pipeline folder, written by ``make_tiny_sd.py --sdxl`` (seed 0)."""
    script = load_script("make_tiny_sd")
    out = tmp_path_factory.mktemp("models") / "tiny-sdxl"
    assert script.main(["--sdxl", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def model(sdxl_folder):
    return inference.load(str(sdxl_folder))


@pytest.fixture(scope="module")
def pipe(sdxl_folder):
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    pipe.set_progress_bar_config(disable=True)
    pipe.folder_scheduler = pipe.scheduler
    return pipe


def gen(seed: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(seed)


def maxdiff(a, b) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def tiny_model(**cond_params):
    section = OmegaConf.to_container(merge_configs([TINY]).model, resolve=True)
    section["params"]["cond_stage_config"]["params"].update(cond_params)
    torch.manual_seed(0)
    return instantiate_from_config(section)


# ---- the architecture at full size ------------------------------------------------------------------------
@pytest.mark.parametrize("config", [ARCH, RECIPE])
def test_sdxl_builds_at_full_size_with_the_published_parameter_counts(config):
    cfg = merge_configs([config], ["model.params.pretrained=null"] +
                        (["data.params.train.params.root=photos"] if config == RECIPE else []))
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    cond = model.cond_stage_model
    found = {"unet": count_params(model.unet), "text_encoder": count_params(cond.transformer),
             "text_encoder_2": count_params(cond.transformer_2), "vae": count_params(model.first_stage_model)}
    assert found == SDXL_COUNTS
    assert (cond.context_dim, cond.pooled_dim) == (2048, 1280)
    assert model.unet.config.addition_embed_type == "text_time"
    assert model.first_stage_model.scale_factor == 0.13025


def test_recipe_settings():
    cfg = merge_configs([RECIPE], ["data.params.train.params.root=photos"])
    p, data, trainer = cfg.model.params, cfg.data.params, cfg.lightning.trainer
    assert p.unet_config.params.gradient_checkpointing and trainer.precision == "bf16-mixed"
    assert data.buckets.resolution == 1024 and data.cache_latents == "disk" and data.cache_text_embeddings
    assert p.cond_stage_config.params.ucg_rate == 0.1 and p.use_ema is False


# ---- the conditioner against diffusers' encode_prompt ---------------------------------------------------------
def test_conditioning_is_what_the_diffusers_pipeline_encodes(model, pipe):
    prompts = ["a photo of a cat", "an oil painting of a red dog, detailed"]
    cond = model.cond_stage_model(prompts)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, do_classifier_free_guidance=True)
    assert cond["context"].shape == (2, 77, 96) and cond["text_embeds"].shape == (2, 48)
    assert torch.equal(cond["context"], embeds) and torch.equal(cond["text_embeds"], pooled)
    uncond = model.cond_stage_model.unconditional(2)  # SDXL's force_zeros_for_empty_prompt
    assert torch.equal(uncond["context"], negative) and torch.equal(uncond["text_embeds"], negative_pooled)
    assert not negative.any()
    neg = model.cond_stage_model.negative("blurry", 2)
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(prompts, negative_prompt="blurry",
                                                                   do_classifier_free_guidance=True)
    assert torch.equal(neg["context"], negative) and torch.equal(neg["text_embeds"], negative_pooled)


def test_caption_dropout_zeroes_the_whole_text_conditioning_of_a_row(model):
    cond_stage = model.cond_stage_model
    full = cond_stage(["a cat", "a dog", "a bird"])
    dropped = cond_stage(["a cat", "a dog", "a bird"], drop=torch.tensor([True, False, True]))
    for key in ("context", "text_embeds"):
        assert not dropped[key][0].any() and not dropped[key][2].any()
        assert torch.equal(dropped[key][1], full[key][1]) and full[key][0].abs().sum() > 0
    # The cached path (ldm.data.cache) drops with the cached unconditional row: the same result.
    cached = where_dropped(torch.tensor([True, False, True]), cond_stage.unconditional(1), full)
    assert all(torch.equal(cached[k], dropped[k]) for k in ("context", "text_embeds"))


# ---- micro-conditioning ------------------------------------------------------------------------------------
def test_training_time_ids_come_from_the_buckets_or_default_to_the_image(model):
    images = torch.zeros(2, 3, 32, 24)
    bucketed = {"image": images, "caption": ["a", "b"], "original_size": torch.tensor([[300, 200], [40, 30]]),
                "crop_top_left": torch.tensor([[5, 0], [0, 3]])}
    ids = model.conditioning(bucketed)["time_ids"]
    assert ids.tolist() == [[300, 200, 5, 0, 32, 24], [40, 30, 0, 3, 32, 24]]  # (h, w), (top, left), (h, w)
    plain = model.conditioning({"image": images, "caption": ["a", "b"]})["time_ids"]
    assert plain.tolist() == [[32, 24, 0, 0, 32, 24]] * 2
    half = {k: v.bfloat16() for k, v in model.cond_stage_model(["a"]).items()}  # as under bf16 autocast
    ids = model.cond_stage_model.with_sizes(half, torch.tensor([[1024, 640]]), torch.tensor([[667, 1001]]))["time_ids"]
    assert ids.dtype == torch.float32 and ids.tolist() == [[667, 1001, 0, 0, 1024, 640]]  # bf16 would say 668, 1000
    down = model.first_stage_model.downsample  # cached latents: the VAE's factor smaller
    moments = {"image_moments": torch.zeros(2, 8, 32 // down, 24 // down), "caption": ["a", "b"]}
    assert model.conditioning(moments)["time_ids"].tolist() == [[32, 24, 0, 0, 32, 24]] * 2


def test_denoise_hands_the_pooled_vector_and_time_ids_to_the_unet(model):
    torch.manual_seed(0)
    x, t = torch.randn(2, 4, 4, 3), torch.tensor([10, 500])
    cond = model.cond_stage_model.with_sizes(model.cond_stage_model(["a", "b"]), torch.tensor([[32, 24]] * 2))
    direct = model.unet(x, t, encoder_hidden_states=cond["context"],
                        added_cond_kwargs={"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}).sample
    assert torch.equal(model.denoise(x, t, cond), direct)
    other_size = {**cond, "time_ids": cond["time_ids"] * 2}
    assert (model.denoise(x, t, other_size) - direct).abs().max() > 1e-4  # the UNet reads them


# ---- which encoders train ----------------------------------------------------------------------------------
@pytest.mark.parametrize("trainable, trained", [(False, set()), (True, {"transformer", "transformer_2"}),
                                                (["text_encoder_2"], {"transformer_2"})])
def test_each_text_encoder_is_frozen_or_trained_on_its_own(trainable, trained):
    model = tiny_model(trainable=trainable)
    cond = model.cond_stage_model
    model.train()
    for name in ("transformer", "transformer_2"):
        encoder = getattr(cond, name)
        assert all(p.requires_grad == (name in trained) for p in encoder.parameters())
        assert encoder.training == (name in trained)
    optimised = {id(p) for group in model.configure_optimizers()["optimizer"].param_groups for p in group["params"]}
    assert all((id(p) in optimised) == ("transformer_2" in trained) for p in cond.transformer_2.parameters())
    batch = {"image": torch.zeros(2, 3, 32, 24), "caption": ["a", "b"]}
    model.diffusion_loss(batch).backward()
    assert (cond.transformer_2.text_projection.weight.grad is not None) == ("transformer_2" in trained)


def test_a_wrong_encoder_name_is_one_line():
    with pytest.raises(ConfigError, match="trainable takes true, false or a list of text_encoder, text_encoder_2"):
        tiny_model(trainable=["text_encoder_3"])


def test_declared_weights_and_lora_modules_name_both_encoders(model):
    rows = model.weight_components()
    assert [(r.prefix, r.diffusers, r.original) for r in rows if r.prefix.startswith("cond")] == [
        ("cond_stage_model.transformer.", "text_encoder", "sdxl_clip_text"),
        ("cond_stage_model.transformer_2.", "text_encoder_2", "sdxl_open_clip_text")]
    assert list(model.cond_stage_model.lora_modules()) == ["text_encoder", "text_encoder_2"]


# ---- sampling held to diffusers -------------------------------------------------------------------------------
def diffusers_sample(pipe, sampler, prompts, negative, seed, **kwargs):
    pipe.scheduler = REFERENCE[sampler].from_config(pipe.folder_scheduler.config)
    out = pipe(prompts, negative_prompt=[negative] * len(prompts) if negative else None, num_inference_steps=STEPS,
               guidance_scale=SCALE, generator=gen(seed), output_type="pt", **kwargs).images
    return out.permute(0, 2, 3, 1).numpy()


@pytest.mark.parametrize("negative", ["", "blurry"])
@pytest.mark.parametrize("sampler", list(REFERENCE))
def test_txt2img_matches_the_sdxl_pipeline(model, pipe, sampler, negative):
    prompts = ["a photo of a cat", "a red dog"]
    ours = inference.txt2img(model, prompts, H, W, negative, gen(7), sampler, STEPS, SCALE)
    theirs = diffusers_sample(pipe, sampler, prompts, negative, 7, height=H, width=W)
    ours = (ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert float(np.abs(ours - theirs).max()) == 0.0  # the same loop: bit-exact
    other_seed = diffusers_sample(pipe, sampler, prompts, negative, 8, height=H, width=W)
    assert float(np.abs(other_seed - theirs).mean()) > 0.02  # far from what a seed changes


def test_configured_sample_size_conditioning_matches_the_pipeline_given_it(sdxl_folder, pipe):
    model = inference.load(str(sdxl_folder))
    model.cond_stage_model.sample_original_size, model.cond_stage_model.sample_crop_top_left = (1024, 1024), (16, 8)
    ours = inference.txt2img(model, ["a cat"], H, W, "", gen(1), "euler", STEPS, SCALE)
    theirs = diffusers_sample(pipe, "euler", ["a cat"], "", 1, height=H, width=W, original_size=(1024, 1024),
                              crops_coords_top_left=(16, 8))
    assert float(np.abs((ours / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy() - theirs).max()) == 0.0
    default = diffusers_sample(pipe, "euler", ["a cat"], "", 1, height=H, width=W)
    assert float(np.abs(default - theirs).max()) > 1e-3  # the size conditioning changes the picture


@pytest.mark.parametrize("negative", ["", "blurry"])
@pytest.mark.parametrize("sampler", ["euler", "ddim"])
def test_img2img_matches_the_sdxl_img2img_pipeline(model, pipe, sampler, negative, tmp_path):
    from PIL import Image
    from skimage import data

    Image.fromarray(data.astronaut()).resize((W, H)).save(tmp_path / "init.png")
    init = outputs.load_init_image(tmp_path / "init.png")
    img = StableDiffusionXLImg2ImgPipeline(**pipe.components)
    img.set_progress_bar_config(disable=True)
    img.scheduler = REFERENCE[sampler].from_config(pipe.folder_scheduler.config)
    theirs = img("an oil painting", image=init, strength=0.6, num_inference_steps=STEPS, guidance_scale=SCALE,
                 negative_prompt=negative or None, num_images_per_prompt=2, generator=gen(3), output_type="pt").images
    ours = inference.img2img(model, outputs.image_to_tensor(init), ["an oil painting"] * 2, 0.6, negative, gen(3),
                             sampler, STEPS, SCALE)
    assert ours.shape == theirs.shape == (2, 3, H, W)
    # The same steps; the encoded start differs in the last float bits (measured 2.4e-6 at most), which can move
    # one pixel by one 0..255 level.
    assert float(((ours / 2 + 0.5).clamp(0, 1) - theirs).abs().max()) < 1e-5
    assert maxdiff(inference.to_uint8(ours), (theirs.permute(0, 2, 3, 1).numpy() * 255).round()) <= 1


def test_scripts_sample_an_sdxl_folder(sdxl_folder, model, tmp_path):
    sweep = load_script("guidance_sweep")
    out = tmp_path / "sweep"
    assert sweep.main(["--ckpt", str(sdxl_folder), "--prompt", "a cat", "--scales", "1", "5", "--seeds", "0",
                       "--ddim_steps", str(STEPS), "--H", str(H), "--W", str(W), "--outdir", str(out)]) == 0
    cells = sorted((out / "samples").iterdir())
    assert len(cells) == 2
    direct = inference.to_uint8(inference.txt2img(model, ["a cat"], H, W, "", gen(0), "ddim", STEPS, 5.0))[0]
    assert maxdiff(np.asarray(outputs.load_init_image(cells[1])), direct) <= 1
    for script, extra in (("txt2img", []), ("img2img", ["--init-img", str(cells[0]), "--strength", "0.5"])):
        out = tmp_path / script
        assert load_script(script).main(["--ckpt", str(sdxl_folder), "--prompt", "a cat", "--ddim_steps", str(STEPS),
                                         "--H", str(H), "--W", str(W), "--n_samples", "1", "--outdir", str(out),
                                         *extra]) == 0
        assert np.asarray(outputs.load_init_image(out / "samples" / "00000.png")).shape == (H, W, 3)
    gif = tmp_path / "denoise.gif"
    assert load_script("make_gifs").main(["denoise", "--ckpt", str(sdxl_folder), "--prompt", "a cat", "--ddim_steps",
                                          str(STEPS), "--H", str(H), "--W", str(W), "--out", str(gif)]) == 0
    from PIL import Image

    assert Image.open(gif).n_frames == STEPS


def test_guided_batches_put_unconditional_and_conditional_side_by_side(model):
    a, b = model.cond_stage_model(["x"]), model.cond_stage_model(["y"])
    both = cat_conditioning([a, b])
    assert both["context"].shape[0] == 2 and torch.equal(both["text_embeds"][1], b["text_embeds"][0])


def test_training_flops_are_counted_for_sdxl():
    """ldm.flops hands the size conditioning to the UNet too (SDXL's UNet refuses a call without time ids)."""
    from ldm.flops import step_flops

    section = OmegaConf.to_container(merge_configs([TINY]).model, resolve=True)
    flops = step_flops(section, 2, 32)
    assert flops.unet_train > 0 and flops.text_encode > 0 and flops.vae_encode > 0
    assert step_flops(section, 4, 32).unet_train == 2 * flops.unet_train
