"""SDXL weights and LoRA files: exports to a diffusers SDXL folder and to the original single-file layout load back
here and in diffusers (``from_pretrained``, ``from_single_file``) to the same images; LoRA adapters on the UNet and
both text encoders save in diffusers' and kohya's SDXL layouts and load in ``StableDiffusionXLPipeline``; the
DreamBooth LoRA recipe runs through main.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm import inference
from ldm.config import merge_configs
from ldm.util import ConfigError, instantiate_from_config
from ldm.weights import load_model
from ldm.weights.export import export_diffusers, export_single_file, prepare
from ldm.weights.source import open_weights
from tests.conftest import main_env, main_py
from tests.test_sdxl import H, SCALE, STEPS, TINY, W, gen, sdxl_folder  # noqa: F401  (fixture)
from tests.test_dreambooth import subject_photos

ROOT = Path(__file__).resolve().parent.parent


def ours(model, prompts=("a photo of sks dog",), seed=1) -> torch.Tensor:
    """Our txt2img (Euler, the SDXL folder's own scheduler) as diffusers' output_type="pt" gives it."""
    images = inference.txt2img(model, list(prompts), H, W, "", gen(seed), "euler", STEPS, SCALE)
    return (images / 2 + 0.5).clamp(0, 1)


def theirs(pipe, prompts=("a photo of sks dog",), seed=1) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    return pipe(list(prompts), height=H, width=W, num_inference_steps=STEPS, guidance_scale=SCALE,
                generator=gen(seed), output_type="pt").images


@pytest.fixture(scope="module")
def exported(sdxl_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("export")
    item = prepare(sdxl_folder)
    return export_diffusers(item, out / "folder", progress=False), export_single_file(item, out / "x.safetensors",
                                                                                     progress=False)


def test_single_file_has_the_original_sdxl_layout(exported):
    with safe_open(str(exported[1]), "pt") as f:
        keys = list(f.keys())
    tops = {k.split(".")[0] for k in keys}
    assert tops == {"model", "first_stage_model", "conditioner"}
    assert "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys
    assert "model.diffusion_model.label_emb.0.0.weight" in keys  # the added embedding (pooled vector + time ids)
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "conditioner.embedders.0.transformer.",
                             "conditioner.embedders.1.model.")) for k in keys)


def test_both_exports_load_back_bit_for_bit(sdxl_folder, exported):
    base = load_model(sdxl_folder).state_dict()
    for path in exported:
        state = load_model(path).state_dict()
        assert set(state) == set(base) and all(torch.equal(state[k], base[k]) for k in base)
    # original -> project -> original: the same tensors again
    again = export_single_file(prepare(exported[1]), exported[1].with_name("again.safetensors"), progress=False)
    first, second = load_file(exported[1]), load_file(again)
    assert set(first) == set(second) and all(torch.equal(first[k], second[k]) for k in first)


def test_diffusers_loads_both_exports_to_our_images(sdxl_folder, exported):
    reference = ours(load_model(sdxl_folder))
    assert theirs(StableDiffusionXLPipeline.from_pretrained(str(exported[0]))).sub(reference).abs().max() == 0
    single = StableDiffusionXLPipeline.from_single_file(str(exported[1]), config=str(exported[0]))
    folder = StableDiffusionXLPipeline.from_pretrained(str(exported[0]))
    for name in ("unet", "vae", "text_encoder", "text_encoder_2"):  # diffusers reads the same tensors from both
        a, b = getattr(single, name).state_dict(), getattr(folder, name).state_dict()
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    # in another memory layout (its converter's slices and transposes), which can move the last float bits
    assert theirs(single).sub(reference).abs().max() < 1e-5


def test_a_single_file_without_our_metadata_needs_the_architecture(sdxl_folder, exported, tmp_path):
    bare = tmp_path / "bare.safetensors"
    save_file(load_file(exported[1]), bare)  # no sd_finetune.* metadata: as a downloaded file
    assert open_weights(bare).description == "SDXL-shaped (CLIP + OpenCLIP text encoders, 96-d context)"
    with pytest.raises(ConfigError, match="holds no architecture: pass a config"):
        load_model(bare)
    state, base = load_model(bare, config=TINY).state_dict(), load_model(sdxl_folder).state_dict()
    assert set(state) == set(base) and all(torch.equal(state[k], base[k]) for k in base)


def test_full_size_names_map_both_ways_and_an_unlabelled_file_is_recognised():
    """At SDXL's full size on the meta device: every tensor gets an original-layout name that diffusers' converters
    map back to the same tensor and shape, and the file's shapes say which architecture to build."""
    from ldm.weights.load import ARCHITECTURES, resolve_config
    from ldm.weights.original import describe, original_to_project, project_to_original
    from ldm.weights.source import Source

    cfg = merge_configs([ARCHITECTURES / "sdxl.yaml"])
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    state = model.state_dict()
    original = project_to_original(state, model.weight_components())
    assert describe(original) == "SDXL (CLIP + OpenCLIP text encoders, 2048-d context)"
    back, _ = original_to_project(original, model.weight_components())
    assert set(back) == set(state) and all(back[k].shape == state[k].shape for k in state)
    section, origin = resolve_config(Source(Path("sd_xl_base_1.0.safetensors"), "original", original))
    assert origin.startswith("configs/architectures/sdxl.yaml (detected SDXL")
    assert section["params"]["cond_stage_config"]["target"] == "ldm.models.sdxl.SDXLTextConditioner"


def test_an_sdxl_refiner_is_refused_in_one_line(tmp_path):
    refiner = tmp_path / "refiner.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(384, 4, 3, 3),
               "conditioner.embedders.0.model.text_projection": torch.zeros(1280, 1280)}, refiner)
    with pytest.raises(ConfigError, match="is an SDXL refiner .*; expected a Stable Diffusion v1/2.x or SDXL base"):
        load_model(refiner, config=TINY)


def test_the_fp16_fixed_vae_folder_replaces_the_pipeline_vae(sdxl_folder, tmp_path):
    """A bare VAE folder (as madebyollin/sdxl-vae-fp16-fix ships) through first_stage_config's pretrained."""
    vae = AutoencoderKL.from_pretrained(str(sdxl_folder), subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_out.bias.add_(0.5)
    vae.save_pretrained(str(tmp_path / "vae-fix"))
    cfg = merge_configs([TINY], [f"model.params.pretrained={sdxl_folder}",
                                 f"+model.params.first_stage_config.params.pretrained={tmp_path / 'vae-fix'}",
                                 "+model.params.first_stage_config.params.subfolder=null"])
    model = instantiate_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    assert torch.equal(model.first_stage_model.vae.decoder.conv_out.bias, vae.decoder.conv_out.bias)
    assert torch.equal(model.unet.conv_in.weight, load_model(sdxl_folder).unet.conv_in.weight)


# ---- LoRA ---------------------------------------------------------------------------------------------------
def adapted(folder: Path, text_encoder: bool = True):
    lora = f"{{rank: 4, alpha: 8, text_encoder: {str(text_encoder).lower()}}}"
    cfg = merge_configs([TINY], [f"model.params.pretrained={folder}", "model.params.use_ema=false",
                                 f"+model.params.lora={lora}"])
    model = instantiate_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    model.sampler_config = dict(load_model(folder).sampler_config)  # the folder's Euler, as the pipeline samples
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


@pytest.fixture(scope="module")
def lora_files(sdxl_folder, tmp_path_factory):
    from ldm.lora import save_lora_files

    model = adapted(sdxl_folder)
    return model, save_lora_files(model, tmp_path_factory.mktemp("lora"), "sks-dog")


def test_lora_files_hold_the_unet_and_both_text_encoders_under_their_sdxl_names(lora_files, capsys):
    kohya = load_file(lora_files[1]["kohya"])
    assert {k.split("_")[0] + "_" + k.split("_")[1] for k in kohya} == {"lora_unet", "lora_te1", "lora_te2"}
    assert "lora_te2_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight" in kohya
    assert "lora_te1_text_model_encoder_layers_1_self_attn_out_proj.alpha" in kohya
    assert float(kohya["lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.alpha"]) == 8.0
    with safe_open(str(lora_files[1]["kohya"]), "pt") as f:
        assert f.metadata()["ss_base_model_version"] == "sdxl_base_v1-0"
    diffusers_keys = load_file(lora_files[1]["diffusers"])
    assert {k.split(".")[0] for k in diffusers_keys} == {"unet", "text_encoder", "text_encoder_2"}


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_each_lora_layout_loads_in_the_sdxl_pipeline_to_our_images(sdxl_folder, lora_files, layout):
    model, files = lora_files
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    pipe.load_lora_weights(str(files[layout].parent), weight_name=files[layout].name)
    reference = ours(model)
    assert (theirs(pipe) - reference).abs().max() < 1e-5
    assert (ours(load_model(sdxl_folder)) - reference).abs().max() > 1e-3  # the adapters change the picture


def test_lora_files_load_back_here_and_check_whole(sdxl_folder, lora_files, capsys):
    from ldm.lora_check import check_lora_file
    from ldm.lora import load_lora

    model, files = lora_files
    for path in files.values():
        plain = load_model(sdxl_folder)
        load_lora(plain, path)
        assert (ours(plain) - ours(model)).abs().max() < 1e-5
        n = len(load_file(path))
        assert check_lora_file(model, path).applied == n


def test_kohya_files_with_original_unet_names_load_too(sdxl_folder, lora_files, tmp_path):
    """kohya's own SDXL trainer names UNet layers as the original UNet does (lora_unet_input_blocks_4_1_...)."""
    from ldm.lora import load_lora
    from ldm.weights.original import _unet_key

    model, files = lora_files
    renamed = {}
    for key, value in load_file(files["kohya"]).items():
        if key.startswith("lora_unet_"):
            module, _, tail = key[len("lora_unet_"):].partition(".")
            dotted = _diffusers_module_path(module, model.unet)
            key = "lora_unet_" + _unet_key(dotted + ".weight", 1, {0}).removesuffix(".weight").replace(".", "_") + \
                "." + tail
        renamed[key] = value
    # the tiny UNet's second level (one resnet per level, two transformer blocks) is input_blocks.3
    assert "lora_unet_input_blocks_3_1_transformer_blocks_1_attn2_to_k.lora_down.weight" in renamed
    path = tmp_path / "original-names.safetensors"
    save_file(renamed, path)
    plain = load_model(sdxl_folder)
    load_lora(plain, path)
    assert (ours(plain) - ours(model)).abs().max() < 1e-5


def _diffusers_module_path(underscored: str, network) -> str:
    """A kohya module name (dots as _) back to the network's dotted module path."""
    paths = {name.replace(".", "_"): name for name, _ in network.named_modules()}
    return paths[underscored]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_dreambooth_lora_recipe_runs_and_saves_an_adapter_the_pipeline_loads(sdxl_folder, tmp_path):
    photos = subject_photos(tmp_path / "photos", 3, size=32)
    logs = tmp_path / "logs"
    args = ["-t", "--base", ROOT / "configs/sdxl-dreambooth.yaml", ROOT / "configs/sdxl-dreambooth-lora.yaml", TINY,
            "-l", logs, "-n", "sks", f"model.params.pretrained={sdxl_folder}",
            f"data.params.train.params.instance_data_dir={photos}",
            f"data.params.train.params.class_data_dir={tmp_path / 'class'}",
            "data.params.train.params.num_class_images=2",
            "data.params.train.params.image_transforms.0.params.size=32",
            "data.params.train.params.image_transforms.1.params.size=32", "data.params.num_workers=0",
            "lightning.trainer.max_steps=2", "lightning.trainer.accelerator=cpu",
            "+lightning.trainer.log_every_n_steps=1",
            "lightning.callbacks.class_images.params.steps=2", "lightning.callbacks.dreambooth_samples.params.steps=2",
            "lightning.callbacks.dreambooth_samples.params.every_n_steps=2"]
    proc = main_py(*args, timeout=400, env=main_env(PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list((tmp_path / "class").glob("*.png"))) == 2  # sampled by the SDXL base before the first step
    (run,) = logs.iterdir()
    assert "train/prior_loss" in (run / "metrics.csv").read_text().splitlines()[0]
    assert "sks.safetensors (kohya layout) through diffusers' loader" in proc.stdout
    pipe = StableDiffusionXLPipeline.from_pretrained(str(sdxl_folder))
    pipe.load_lora_weights(str(run / "lora"))
    assert theirs(pipe).shape == (1, 3, H, W)


def test_the_hub_folder_of_an_sdxl_model_loads_in_fp16_and_its_card_names_the_sdxl_pipeline(sdxl_folder, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from ldm.hub import export_hub

    out = tmp_path / "hub"
    written = export_hub(sdxl_folder, out, progress=False)
    card = written["model card"].read_text()
    assert "from diffusers import StableDiffusionXLPipeline" in card and "stable-diffusion-xl" in card
    pipe = StableDiffusionXLPipeline.from_pretrained(out, variant="fp16", torch_dtype=torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.text_encoder_2 is not None
