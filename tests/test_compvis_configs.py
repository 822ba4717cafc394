"""Configs written for CompVis/stable-diffusion and its fine-tuning fork, run through main.py unchanged (ldm.compvis).

tests/compvis_configs/ holds configs in that dialect (the Pokémon guide's, an image-variations one, CompVis's
v1-inference.yaml): full size they must build SD v1 exactly (on the meta device); shrunk by overrides they train
on the CPU from a tiny CompVis-layout .ckpt with EMA keys, resume, and sample with txt2img.py --config ... --plms.
The UNet and VAE configs are held to diffusers' own converters of CompVis params.
"""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from ldm.compvis import is_compvis, model_section_of, translate
from ldm.config import merge_configs, to_container
from ldm.util import ConfigError, count_params, instantiate_from_config
from tests.conftest import REPO, main_env, main_py, write_image_folder

CONFIGS = REPO / "tests" / "compvis_configs"
POKEMON, VARIATIONS, INFERENCE = CONFIGS / "pokemon.yaml", CONFIGS / "image-condition-finetune.yaml", \
    CONFIGS / "v1-inference.yaml"
SD_V1_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
PROMPTS = ["A pokemon with green eyes, large wings, and a hat", "A cute bunny rabbit", "Yoda",
           "An epic landscape photo of a mountain"]
# CompVis keys shrinking SD v1 to a model of make_tiny_sd.py's size (CompVis's GroupNorm needs 32-channel groups).
TINY = ["model.params.image_size=8", "model.params.unet_config.params.model_channels=32",
        "model.params.unet_config.params.channel_mult=[1,2]",
        "model.params.unet_config.params.attention_resolutions=[1]",
        "model.params.unet_config.params.num_res_blocks=1", "model.params.unet_config.params.num_heads=4",
        "model.params.unet_config.params.context_dim=32", "model.params.first_stage_config.params.ddconfig.ch=32",
        "model.params.first_stage_config.params.ddconfig.ch_mult=[1,2]",
        "model.params.first_stage_config.params.ddconfig.num_res_blocks=1"]
TINY_DATA = ["data.params.train.params.image_transforms.0.params.size=16",
             "data.params.train.params.image_transforms.1.params.size=16", "data.params.num_workers=0"]


def translated(path, overrides=(), weights_given=True, logdir=None) -> dict:
    return translate(merge_configs([path], list(overrides)), weights_given, logdir).config


def one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message, message
    return message


def public(config) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


@pytest.fixture(scope="module")
def tiny_text_encoder(tmp_path_factory):
    """make_tiny_sd.py's text encoder folder: what ``FrozenCLIPEmbedder``'s ``version`` names for the tiny model."""
    out = tmp_path_factory.mktemp("models") / "tiny-sd"
    proc = subprocess.run([sys.executable, "scripts/make_tiny_sd.py", "--out", str(out), "--seed", "0"], cwd=REPO,
                          env=main_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out / "text_encoder"


def tiny(tiny_text_encoder) -> list[str]:
    return TINY + [f"+model.params.cond_stage_config.params.version={tiny_text_encoder}"]


# ---- the full-size architecture ------------------------------------------------------------------------------
@pytest.mark.parametrize("path", [POKEMON, INFERENCE], ids=["pokemon", "v1-inference"])
def test_compvis_configs_build_sd_v1_at_full_size(path):
    from ldm.weights.load import SD_V1_CONFIG

    section = translated(path)["model"]
    ours = to_container(merge_configs([SD_V1_CONFIG]).model)
    with torch.device("meta"):
        model, reference = instantiate_from_config(section), instantiate_from_config(ours)
    counts = {"unet": count_params(model.unet), "vae": count_params(model.first_stage_model),
              "text_encoder": count_params(model.cond_stage_model)}
    assert counts == SD_V1_COUNTS
    assert public(model.unet.config) == public(reference.unet.config)
    vae, ref_vae = public(model.first_stage_model.vae.config), public(reference.first_stage_model.vae.config)
    assert vae.pop("sample_size") == 512 and {k: v for k, v in ref_vae.items() if k != "sample_size"} == vae
    text, ref_text = model.cond_stage_model.transformer, reference.cond_stage_model.transformer
    assert text.config.to_dict() == ref_text.config.to_dict()
    assert model.first_stage_model.scale_factor == 0.18215 and model.default_image_size() == 512
    assert model.unet.is_gradient_checkpointing  # use_checkpoint: True
    assert model.use_ema == (path == POKEMON)  # CompVis's default is true; v1-inference.yaml sets False
    assert model.cond_stage_model.ucg_rate == 0 and not model.cond_stage_model.trainable


def test_image_variations_config_builds_the_variations_architecture():
    from ldm.weights.load import VARIATIONS_CONFIG

    section = translated(VARIATIONS)["model"]
    with torch.device("meta"):
        model = instantiate_from_config(section)
        reference = instantiate_from_config(to_container(merge_configs([VARIATIONS_CONFIG]).model))
    assert count_params(model.unet) == SD_V1_COUNTS["unet"]
    assert count_params(model.first_stage_model) == SD_V1_COUNTS["vae"]
    # CLIP ViT-L/14's image tower and its projection.
    assert count_params(model.cond_stage_model) == count_params(reference.cond_stage_model) == 303_966_208
    cond = model.cond_stage_model
    assert cond.encoder.config.to_dict() == reference.cond_stage_model.encoder.config.to_dict()
    # The fork's embedder: bicubic, antialias off by default, condition dropout 5% to the zero embedding.
    assert (cond.interpolation, cond.antialias, cond.ucg_rate) == ("bicubic", False, 0.05)
    assert model.cond_stage_key == "image"
    assert section["params"]["trainable"] == "attn2" and section["params"]["sample_with_ema"] is False


def test_sd2_open_clip_params_build_sd2():
    """Stability's SD 2.x params (64-d heads, linear projections, FrozenOpenCLIPEmbedder at the penultimate layer)."""
    cfg = merge_configs([INFERENCE], ["model.params.unet_config.params.num_heads=-1",
                                      "+model.params.unet_config.params.num_head_channels=64",
                                      "+model.params.unet_config.params.use_linear_in_transformer=true",
                                      "model.params.unet_config.params.context_dim=1024"])
    cfg.model.params.cond_stage_config = {"target": "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder",
                                          "params": {"freeze": True, "layer": "penultimate"}}
    section = translate(cfg, weights_given=True).config["model"]
    ours = to_container(merge_configs([REPO / "configs" / "sd-v2.yaml"]).model)
    with torch.device("meta"):
        model, reference = instantiate_from_config(section), instantiate_from_config(ours)
    assert count_params(model.unet) == 865_910_724 and count_params(model.cond_stage_model) == 340_387_840
    assert public(model.unet.config) == public(reference.unet.config)
    assert model.cond_stage_model.tokenizer.pad_token == "!"


# ---- each param as diffusers' converters derive it -----------------------------------------------------------
UNETS = {
    "sd-v1": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
              "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_heads": 8, "use_spatial_transformer": True,
              "transformer_depth": 1, "context_dim": 768, "use_checkpoint": True, "legacy": False},
    "sd-v2": {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
              "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_head_channels": 64,
              "use_spatial_transformer": True, "use_linear_in_transformer": True, "transformer_depth": 1,
              "context_dim": 1024},
    "odd": {"in_channels": 4, "out_channels": 4, "model_channels": 64, "attention_resolutions": [2, 4],
            "num_res_blocks": 3, "channel_mult": [1, 2, 3], "num_heads": 4, "use_spatial_transformer": True,
            "transformer_depth": 2, "context_dim": [96], "disable_self_attentions": [False, True, False]},
}
DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
            "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


@pytest.mark.parametrize("name", list(UNETS))
def test_unet_params_map_as_diffusers_converts_them(name):
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    from ldm.compvis.keys import Record
    from ldm.compvis.networks import unet_config

    ours, checkpointing = unet_config(copy.deepcopy(UNETS[name]), 64, Record(), "unet")
    original = {"model": {"params": {"unet_config": {"params": UNETS[name]},
                                     "first_stage_config": {"params": {"ddconfig": DDCONFIG}}}}}
    theirs = create_unet_diffusers_config_from_ldm(original, {})  # 512 px / 8: sample_size 64
    for key, value in theirs.items():  # every value diffusers derives
        if value is not None:
            assert public({key: ours.get(key)}) == public({key: value}), key
    with torch.device("meta"):  # and the networks they build are the same
        assert public(UNet2DConditionModel(**ours).config) == public(UNet2DConditionModel(**theirs).config)
    assert checkpointing == UNETS[name].get("use_checkpoint", False)


def test_vae_params_map_as_diffusers_converts_them():
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    from ldm.compvis.keys import Record
    from ldm.compvis.networks import first_stage

    block = {"target": "ldm.models.autoencoder.AutoencoderKL",
             "params": {"embed_dim": 4, "ddconfig": DDCONFIG, "lossconfig": {"target": "torch.nn.Identity"}}}
    ours = first_stage(block, 64, 0.18215, Record(), weights_given=True)["params"]
    original = {"model": {"params": {"scale_factor": 0.18215, "first_stage_config": block}}}
    theirs = create_vae_diffusers_config_from_ldm(original, {})
    assert theirs.pop("scaling_factor") == ours["scale_factor"]
    assert {k: ours["config"][k] for k in theirs} == theirs
    with torch.device("meta"):  # diffusers' default scaling_factor is SD's 0.18215 too
        assert public(AutoencoderKL(**ours["config"]).config) == public(AutoencoderKL(**theirs).config)


@pytest.mark.parametrize("schedule", ["linear", "sqrt_linear", "cosine"])
def test_beta_schedules_are_compvis_betas(schedule):
    """CompVis's make_beta_schedule: "linear" interpolates sqrt(beta), "sqrt_linear" beta, "cosine" is
    Nichol & Dhariwal's (s = 0.008, betas capped at 0.999)."""
    from ldm.models.schedule import NoiseSchedule

    start, end, n = 0.00085, 0.012, 1000
    if schedule == "linear":
        expected = torch.linspace(start ** 0.5, end ** 0.5, n, dtype=torch.float64) ** 2
    elif schedule == "sqrt_linear":
        expected = torch.linspace(start, end, n, dtype=torch.float64)
    else:
        t = torch.arange(n + 1, dtype=torch.float64) / n + 8e-3
        alphas = torch.cos(t / (1 + 8e-3) * torch.pi / 2) ** 2
        expected = (1 - alphas[1:] / alphas[:-1]).clamp(0, 0.999)
    params = translated(INFERENCE, [f"+model.params.beta_schedule={schedule}"])["model"]["params"]
    betas = NoiseSchedule(params["timesteps"], params["linear_start"], params["linear_end"],
                          params["beta_schedule"]).scheduler.betas
    torch.testing.assert_close(betas.double(), expected, rtol=1e-5, atol=1e-7)


# ---- what the other keys become ------------------------------------------------------------------------------
def test_pokemon_sections_translate_key_by_key():
    done = translate(merge_configs([POKEMON]), weights_given=True, logdir="logs/run")
    model, data, lightning = done.config["model"]["params"], done.config["data"], done.config["lightning"]
    assert (model["first_stage_key"], model["cond_stage_key"], model["trainable"]) == ("image", "caption", "all")
    assert (model["linear_start"], model["linear_end"], model["beta_schedule"]) == (0.00085, 0.012, "scaled_linear")
    assert model["scheduler_config"]["params"]["warm_up_steps"] == [1]
    assert done.config["model"]["base_learning_rate"] == 1e-4
    assert data["target"] == "ldm.data.datamodule.DataModuleFromConfig"
    assert data["params"]["holdout"] == 0 and data["params"]["batch_size"] == 4 and "num_val_workers" not in data["params"]
    train, val = data["params"]["train"], data["params"]["validation"]
    assert train["target"] == "ldm.data.hf.hf_dataset" and train["params"]["name"] == "lambdalabs/pokemon-blip-captions"
    assert train["params"]["image_transforms"][0]["params"] == {"size": 512, "interpolation": 3}
    assert val == {"target": "ldm.data.text_only.TextOnly",
                   "params": {"captions": PROMPTS, "output_size": 512, "n_per_caption": 2}}
    logger = lightning["callbacks"]["image_logger"]
    assert logger == {"target": "ldm.callbacks.image_logger.ImageLogger", "params": {
        "batch_frequency": 2000, "max_images": 4, "log_first_step": True, "disabled": False, "sampler": "ddim",
        "steps": 200, "eta": 1.0, "guidance_scale": 3.0, "negative_prompt": "", "max_val_batches": 2 ** 31 - 1}}
    assert lightning["modelcheckpoint"]["params"] == {"every_n_train_steps": 2000, "save_top_k": -1, "monitor": None,
                                                      "every_n_epochs": 0}
    assert lightning["trainer"] == {"benchmark": True, "num_sanity_val_steps": 0, "accumulate_grad_batches": 1}
    lines = done.lines()
    assert lines[0] == "compvis: model: ldm.models.diffusion.ddpm.LatentDiffusion → ldm.models.diffusion.LatentDiffusion"
    assert "compvis: data: main.DataModuleFromConfig → ldm.data.datamodule.DataModuleFromConfig" in lines
    (ignored,) = [line for line in lines if line.startswith("compvis: ignored")]
    for key in ("model.params.log_every_t", "model.params.first_stage_config.ckpt_path", "data.params.num_val_workers",
                "lightning.find_unused_parameters", "model.params.unet_config.params.legacy"):
        assert ignored.count(key + ",") + ignored.endswith(key) == 1, key
    assert len(lines) == 9 and not is_compvis(done.config) and is_compvis(done.original)


def test_fork_and_lightning_1_keys():
    overrides = ["model.params.cond_stage_trainable=true", "+model.params.unet_trainable=conv_in",
                 "+model.params.ucg_training={txt: {p: 0.1, val: ''}}", "lightning.find_unused_parameters=true",
                 "+lightning.trainer.gpus='0,1'", "+lightning.trainer.weights_summary=null",
                 "lightning.callbacks.image_logger.params.increase_log_steps=true",
                 "lightning.callbacks.image_logger.params.log_images_kwargs.unconditional_guidance_label=['blurry']",
                 "+lightning.callbacks.cuda_callback={target: main.CUDACallback}",
                 "+lightning.callbacks.metrics_over_trainsteps_checkpoint={params: {every_n_train_steps: 500}}",
                 "+lightning.logger={target: pytorch_lightning.loggers.TestTubeLogger, params: {name: tt, debug: false}}"]
    done = translate(merge_configs([POKEMON], overrides), weights_given=True, logdir="logs/run")
    model, lightning = done.config["model"]["params"], done.config["lightning"]
    assert model["trainable"] == ["conv_in.*"] and model["cond_stage_config"]["params"]["ucg_rate"] == 0.1
    # FrozenCLIPEmbedder freezes itself, so cond_stage_trainable alone trains nothing (as in CompVis).
    assert model["cond_stage_config"]["params"]["trainable"] is False
    assert any("set freeze: false to train it" in line for line in done.lines())
    assert lightning["trainer"] == {"benchmark": True, "num_sanity_val_steps": 0, "accumulate_grad_batches": 1,
                                    "strategy": "ddp_find_unused_parameters_true", "enable_model_summary": False,
                                    "accelerator": "gpu", "devices": [0, 1]}
    logger = lightning["callbacks"]["image_logger"]
    assert logger["target"] == "ldm.compvis.lightning.StepDoublingImageLogger"
    assert logger["params"]["negative_prompt"] == "blurry" and "cuda_callback" not in lightning["callbacks"]
    assert lightning["callbacks"]["metrics_over_trainsteps_checkpoint"] == {
        "target": "pytorch_lightning.callbacks.ModelCheckpoint", "params": {
            "filename": "{epoch:06}-{step:09}", "verbose": True, "save_top_k": -1, "every_n_train_steps": 500,
            "save_weights_only": True, "dirpath": "logs/run/checkpoints/trainstep_checkpoints"}}
    assert lightning["logger"] == {"target": "pytorch_lightning.loggers.TensorBoardLogger", "params": {"name": "tt"}}
    built = instantiate_from_config({**logger, "params": {**logger["params"], "logdir": "logs/x"}})
    built.batch_frequency = 20
    assert [s for s in range(1, 45) if built._due(s)] == [1, 2, 4, 8, 16, 20, 40]


def test_unet_trainable_attn_trains_only_cross_attention(tiny_text_encoder):
    section = translated(POKEMON, tiny(tiny_text_encoder) + ["+model.params.unet_trainable=attn"])["model"]
    model = instantiate_from_config(section)
    assert model.trainable_names and all(".attn2." in name for name in model.trainable_names)
    assert count_params(model, trainable_only=True) == sum(
        p.numel() for n, p in model.unet.named_parameters() if ".attn2." in n)


REFUSED = [
    (["+model.params.loss_type=l1"], "model.params.loss_type: 'l1' cannot be translated: the loss is the mean squared"),
    (["+model.params.parameterization=x0"], "model.params.parameterization: 'x0' cannot be translated"),
    (["model.params.conditioning_key=hybrid"], "only cross-attention conditioning"),
    (["+model.params.unet_config.params.use_fp32=true"],
     "model.params.unet_config.params.use_fp32: not a key of CompVis's UNetModel that this project translates"),
    (["model.params.unet_config.params.use_spatial_transformer=false"], "use_spatial_transformer: true translates"),
    (["model.params.first_stage_config.params.ddconfig.attn_resolutions=[32]"], "ddconfig.attn_resolutions"),
    (["+model.params.ucg_training={image: {p: 0.1, val: ''}}"], "model.params.ucg_training.image: only the condition"),
    (["model.params.cond_stage_config.target=ldm.modules.encoders.modules.FrozenT5Embedder"],
     "model.params.cond_stage_config.target: 'ldm.modules.encoders.modules.FrozenT5Embedder' has no translation"),
    (["model.params.cond_stage_key=caption"], "data.params.train.params.caption_key: 'txt' is not model.params.cond_stage_key"),
    (["lightning.callbacks.image_logger.params.log_images_kwargs.inpaint=true"], "log_images_kwargs.inpaint: True"),
    (["+lightning.trainer.resume_from_checkpoint=last.ckpt"], "continue a run with -r"),
    (["+lightning.profiler=simple"], "lightning.profiler: the lightning section holds"),
    (["data.target=ldm.data.laion.WebDataModuleFromConfig"], "ldm.data.tar_shards.TarShards"),
]


@pytest.mark.parametrize("overrides, expected", REFUSED, ids=[o[0].split("=")[0].lstrip("+") for o, _ in REFUSED])
def test_keys_that_cannot_be_honoured_are_one_line(overrides, expected):
    assert expected in one_line(translate, merge_configs([POKEMON], overrides), True)


def test_first_stage_ckpt_path_needs_the_weights_from_elsewhere(tmp_path):
    cfg = merge_configs([INFERENCE], [f"+model.params.first_stage_config.params.ckpt_path={tmp_path / 'kl-f8.ckpt'}"])
    message = one_line(translate, cfg, False)
    assert "kl-f8.ckpt' does not exist" in message and "--finetune_from" in message
    assert any("ckpt_path" in line and "not read" in line for line in translate(cfg, True).lines())


def test_folder_data_reads_only_its_extension(tmp_path):
    folder = write_image_folder(tmp_path / "photos")  # .png images with .txt captions
    cfg = merge_configs([VARIATIONS], [f"data.params.train.params.root_dir={folder}"])
    assert "FolderData reads only ['jpg'] files but" in one_line(translate, cfg, True)
    done = translate(merge_configs([VARIATIONS], [f"data.params.train.params.root_dir={folder}",
                                                  "+data.params.train.params.ext=png"]), True)
    assert done.config["data"]["params"]["train"]["params"]["root"] == str(folder)
    assert any("FolderDataset reads" in line for line in done.lines())  # its captions are read; FolderData's are not


# ---- end to end: the pasted commands on the CPU ----------------------------------------------------------------
@pytest.fixture(scope="module")
def compvis_ckpt(tmp_path_factory, tiny_text_encoder):
    """A tiny Lightning checkpoint in CompVis's layout: state_dict with model.diffusion_model.*, first_stage_model.*,
    cond_stage_model.transformer.*, model_ema.* (CompVis's dot-less EMA names, offset by 0.01 so EMA and raw differ),
    the schedule buffers, global_step and optimizer states."""
    from ldm.weights.original import project_to_original

    torch.manual_seed(0)
    model = instantiate_from_config(translated(POKEMON, tiny(tiny_text_encoder))["model"])
    state = project_to_original(model.state_dict(), model.weight_components())
    for key in [k for k in state if k.startswith("model.diffusion_model.")]:
        state["model_ema." + key[len("model."):].replace(".", "")] = state[key] + 0.01
    state.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(470000),
                  "betas": model.schedule.scheduler.betas, "alphas_cumprod": model.schedule.scheduler.alphas_cumprod})
    path = tmp_path_factory.mktemp("ckpt") / "sd-v1-4-full-ema.ckpt"
    torch.save({"state_dict": state, "global_step": 470000, "epoch": 6, "pytorch-lightning_version": "1.4.2",
                "optimizer_states": [{"state": {0: {"step": 5, "exp_avg": torch.zeros(3)}},
                                      "param_groups": [{"lr": 1e-4, "params": [0]}]}],
                "lr_schedulers": [{"base_lrs": [1e-4], "last_epoch": 5, "lr_lambdas": [{}]}]}, path)
    return path, model.state_dict()


def test_compvis_ckpt_loads_raw_or_ema(compvis_ckpt, tiny_text_encoder):
    from ldm.weights import load_weights

    path, written = compvis_ckpt
    section = translated(POKEMON, tiny(tiny_text_encoder))["model"]
    for ema in (False, True):
        model = instantiate_from_config(section)
        summary = load_weights(model, path, ema=ema)
        # Every tensor of the model came from the file, EMA included; only the EMA's update counter starts again.
        loaded = [k for k in written if k != "model_ema.num_updates"]
        assert summary.startswith(f"loaded {len(loaded)} tensors from {path}") and "missing" not in summary
        state = model.state_dict()
        for key in ("unet.conv_in.weight", "unet.up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k.weight"):
            assert torch.equal(state[key], written[key] + (0.01 if ema else 0)), key
            # The file's EMA seeds the model's EMA either way.
            assert torch.equal(state["model_ema." + key[5:].replace(".", "__")], written[key] + 0.01)
        assert torch.equal(state["cond_stage_model.transformer.embeddings.token_embedding.weight"],
                           written["cond_stage_model.transformer.embeddings.token_embedding.weight"])


def test_pokemon_command_finetunes_resumes_and_samples(compvis_ckpt, tiny_text_encoder, tmp_path):
    """The guide's command (--gpus dropped: no GPU here) with the tiny overrides and a local imagefolder."""
    path, _ = compvis_ckpt
    images = write_image_folder(tmp_path / "pokemon")
    rows = [json.dumps({"file_name": p.name, "text": p.with_suffix(".txt").read_text().strip()})
            for p in sorted(images.glob("*.png"))]
    (images / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    logs = tmp_path / "logs"
    proc = main_py("-t", "--base", POKEMON, "--scale_lr", "False", "--num_nodes", "1", "--finetune_from", path,
                   "-l", logs, *tiny(tiny_text_encoder), *TINY_DATA, f"data.params.train.params.name={images}",
                   "data.params.validation.params.output_size=16", "lightning.trainer.max_steps=2",
                   "+lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2",
                   "lightning.modelcheckpoint.params.every_n_train_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "compvis: data.params.train: ldm.data.simple.hf_dataset → ldm.data.hf.hf_dataset" in proc.stdout
    assert f"tensors from {path} (original: SD-v1-shaped" in proc.stdout
    (run,) = logs.iterdir()
    (original,) = (run / "configs" / "compvis").glob("*-original.yaml")
    assert OmegaConf.load(original).data.target == "main.DataModuleFromConfig"
    (project,) = (run / "configs").glob("*-project.yaml")
    assert OmegaConf.load(project).data.target == "ldm.data.datamodule.DataModuleFromConfig"
    assert "original_config" not in next((run / "configs").glob("*-lightning.yaml")).read_text()
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and "model_ema.conv_in__weight" in ckpt["state_dict"]
    # log_all_val with n_gpus: 2: both batches of the eight prompts, after every validation.
    assert len(list((run / "images/val").glob("samples_cfg3_gs-000002_*_b-00000[01].png"))) == 2

    resumed = main_py("-r", run, "lightning.trainer.max_steps=4")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "compvis:" not in resumed.stdout  # the saved configs are already ours
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)["global_step"] == 4

    inference = tmp_path / "v1-inference-tiny.yaml"
    OmegaConf.save(merge_configs([INFERENCE], tiny(tiny_text_encoder)), inference)
    out = tmp_path / "samples"
    sample = subprocess.run([sys.executable, "scripts/txt2img.py", "--config", str(inference), "--ckpt", str(path),
                             "--plms", "--prompt", "a pokemon", "--ddim_steps", "3", "--n_samples", "2", "--n_iter", "1",
                             "--outdir", str(out)], cwd=REPO, env=main_env(), capture_output=True, text=True, timeout=120)
    assert sample.returncode == 0, sample.stderr[-3000:]
    assert "sets use_ema: False: sampling with the raw weights" in sample.stderr
    assert "(16x16, plms, 3 steps" in sample.stdout and len(list((out / "samples").glob("*.png"))) == 2


def test_image_variations_config_trains_only_cross_attention_on_a_jpeg_folder(tmp_path):
    """The fork's image-variations config (FrozenCLIPImageEmbedder, unet_trainable: attn, FolderData) at tiny size:
    ``model`` names a local CLIP vision folder, as ``version`` does for the text embedder."""
    from PIL import Image
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    vision = OmegaConf.load(REPO / "configs/tiny/tiny-variations.yaml").model.params.cond_stage_config.params.config
    torch.manual_seed(0)
    CLIPVisionModelWithProjection(CLIPVisionConfig(**vision)).save_pretrained(tmp_path / "clip-vision")
    photos = write_image_folder(tmp_path / "photos")
    jpegs = tmp_path / "jpegs"
    jpegs.mkdir()
    for png in photos.glob("*.png"):
        Image.open(png).save(jpegs / f"{png.stem}.jpg", quality=95)
    overrides = [*TINY, *TINY_DATA, f"+model.params.cond_stage_config.params.model={tmp_path / 'clip-vision'}",
                 f"data.params.train.params.root_dir={jpegs}"]
    model = instantiate_from_config(translated(VARIATIONS, overrides, weights_given=False)["model"])
    attn2 = sum(p.numel() for n, p in model.unet.named_parameters() if ".attn2." in n)
    proc = main_py("-t", "--base", VARIATIONS, "-l", tmp_path / "logs", *overrides, "lightning.trainer.max_steps=2",
                   "+lightning.callbacks.image_logger.params.log_images_kwargs.ddim_steps=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "FrozenCLIPImageEmbedder → ldm.models.conditioners.CLIPImageConditioner" in proc.stdout
    assert f"trainable {attn2:,}" in proc.stdout and count_params(model, trainable_only=True) == attn2
    (run,) = (tmp_path / "logs").iterdir()
    assert list((run / "images/train").glob("samples_cfg3_gs-000001_*.png"))  # log_first_step


def test_gpus_on_a_machine_without_cuda_is_one_line(compvis_ckpt):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = main_py("-t", "--base", POKEMON, "--gpus", "0,1", "--scale_lr", "False", "--num_nodes", "1",
                   "--finetune_from", compvis_ckpt[0])
    assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith(
        "error: --gpus 0,1: no CUDA GPU is visible here; to train on the CPU drop --gpus")


def test_sampling_config_translates_only_compvis_files(tmp_path):
    section, done = model_section_of(INFERENCE)
    assert section["target"] == "ldm.models.diffusion.LatentDiffusion" and section["params"]["use_ema"] is False
    assert done.lines()[0].startswith("compvis: model:")
    assert model_section_of(REPO / "configs" / "sd-v2.yaml") == (None, None)
