"""The real Stable Diffusion recipes (configs/pokemon.yaml, configs/simpsons.yaml) and scripts/make_tiny_sd.py.

Real SD weights are not available here, so the full-size architecture is built on PyTorch's meta device (exact
shapes, no memory, no weights) and checked against the published SD v1 parameter counts; everything that reads
weights runs on a random SD-shaped pipeline folder written by make_tiny_sd.py.
"""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage import data as skdata

from ldm.config import load_yaml
from ldm.config import merge_configs
from ldm.util import ConfigError, count_params, instantiate_from_config
from ldm.weights import load_weights

ROOT = Path(__file__).resolve().parent.parent
POKEMON, SIMPSONS, TINY = ROOT / "configs/pokemon.yaml", ROOT / "configs/simpsons.yaml", ROOT / "configs/tiny/tiny-sd.yaml"
# SD v1.x built from its published unet/vae/text_encoder config.json files.
SD_V1_COUNTS = {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
VALIDATION_PROMPTS = ["A pokemon with green eyes, large wings, and a hat", "A cute bunny rabbit", "Yoda",
                      "An epic landscape photo of a mountain"]


def model_section(path: Path, pretrained=None, extra: tuple = ()) -> dict:
    cfg = merge_configs([path], [f"model.params.pretrained={'null' if pretrained is None else pretrained}", *extra])
    return OmegaConf.to_container(cfg.model, resolve=True)


def build(path: Path, pretrained=None, seed: int = 0):
    torch.manual_seed(seed)
    return instantiate_from_config(model_section(path, pretrained))


def write_imagefolder(folder: Path, sidecars: bool = False) -> Path:
    """Four small photos with captions: in metadata.jsonl (HF imagefolder) or in .txt sidecars."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        Image.fromarray(getattr(skdata, name)()).resize((96, 72)).save(folder / f"{name}.png")
        if sidecars:
            (folder / f"{name}.txt").write_text(f"a picture of {name}\n")
        rows.append(json.dumps({"file_name": f"{name}.png", "text": f"a picture of {name}"}))
    if not sidecars:
        (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> tuple[Path, str]:
    """Run scripts/make_tiny_sd.py (in-process, through its CLI entry point) once; return the folder and its output."""
    spec = importlib.util.spec_from_file_location("make_tiny_sd", ROOT / "scripts/make_tiny_sd.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    out = tmp_path_factory.mktemp("models") / "tiny-sd"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert script.main(["--out", str(out), "--seed", "0"]) == 0
    return out, printed.getvalue()


# ---- the full-size architecture ------------------------------------------------------------------------
def test_pokemon_builds_sd_v1_at_full_size_with_the_published_parameter_counts():
    with torch.device("meta"):  # shapes only: 1.07 billion parameters without 4.3 GB of RAM
        model = build(POKEMON)
    counts = {"unet": count_params(model.unet), "vae": count_params(model.first_stage_model),
              "text_encoder": count_params(model.cond_stage_model)}
    assert counts == SD_V1_COUNTS
    assert model.unet.is_gradient_checkpointing
    assert model.default_image_size() == 512 and model.first_stage_model.scale_factor == 0.18215
    assert model.cond_stage_model.ucg_rate == 0.1 and model.use_ema
    with torch.no_grad():
        # Real tokenization of real captions; the network itself runs on meta tensors (shapes only).
        context = model.cond_stage_model(VALIDATION_PROMPTS[:2])
        assert context.shape == (2, 77, 768)
        latents = model.first_stage_model.vae.encode(torch.empty(2, 3, 512, 512, device="meta")).latent_dist.mean
        assert latents.shape == (2, 4, 64, 64)
        out = model.unet(latents, torch.tensor([10, 999], device="meta"), encoder_hidden_states=context).sample
        assert out.shape == (2, 4, 64, 64)
    ids = model.cond_stage_model.tokenizer(VALIDATION_PROMPTS, padding="max_length", max_length=77).input_ids
    assert all(len(row) == 77 and row[0] == 49406 and 49407 in row for row in ids)  # start / end of text


def test_simpsons_uses_the_same_model_as_pokemon():
    assert load_yaml(SIMPSONS).model == load_yaml(POKEMON).model


@pytest.mark.parametrize("path", [POKEMON, SIMPSONS], ids=["pokemon", "simpsons"])
def test_recipe_settings(path):
    cfg = load_yaml(path)
    assert cfg.model.params.pretrained == "models/stable-diffusion-v1-5"
    assert cfg.model.base_learning_rate == 1e-4 and cfg.model.params.scheduler_config.params.warm_up_steps[0] > 0
    assert cfg.data.params.batch_size == 4
    resize, crop, flip = cfg.data.params.train.params.image_transforms
    assert resize.target.endswith("Resize") and dict(resize.params) == {"size": 512, "interpolation": 3, "antialias": True}
    assert crop.target.endswith("RandomCrop") and crop.params.size == 512 and flip.target.endswith("RandomHorizontalFlip")
    trainer = cfg.lightning.trainer
    assert (trainer.precision, trainer.accumulate_grad_batches, trainer.gradient_clip_val) == ("bf16-mixed", 1, 1.0)
    assert trainer.max_epochs > 0 and cfg.lightning.callbacks.image_logger.params.guidance_scale == 3.0
    assert cfg.lightning.modelcheckpoint.params.every_n_epochs == (25 if path == POKEMON else 10)
    captions = list(cfg.data.params.validation.params.captions)
    assert captions == VALIDATION_PROMPTS if path == POKEMON else len(captions) == 4


def test_recipe_data_sections_instantiate_on_local_folders(tmp_path):
    pokemon = merge_configs([POKEMON], [f"data.params.train.params.name={write_imagefolder(tmp_path / 'pk')}"])
    data = instantiate_from_config(pokemon.data)
    item = data.datasets["train"][0]
    assert item["image"].shape == (3, 512, 512) and item["caption"] == "a picture of astronaut"
    assert [data.datasets["validation"][i]["caption"] for i in range(4)] == VALIDATION_PROMPTS
    simpsons = merge_configs([SIMPSONS], [f"data.params.train.params.root={write_imagefolder(tmp_path / 'sp', True)}"])
    data = instantiate_from_config(simpsons.data)
    captions = sorted(data.datasets["train"][i]["caption"] for i in range(4))
    assert captions[0] == "a picture of astronaut" and data.datasets["train"][3]["image"].shape == (3, 512, 512)


def test_simpsons_buckets_recipe_trains_bucketed_from_the_caches(tmp_path):
    """configs/simpsons-buckets.yaml's data section as written, at the tiny model's scale (32 px budget)."""
    folder = write_imagefolder(tmp_path / "sp", True)
    cfg = merge_configs([ROOT / "configs/simpsons-buckets.yaml"], [
        f"data.params.train.params.root={folder}", "data.params.buckets.resolution=32", "data.params.buckets.step=8",
        f"data.params.cache_dir={tmp_path / 'cache'}", "data.params.num_workers=0"])
    data = instantiate_from_config(cfg.data)
    assert data.buckets["max_aspect"] == 2.0 and data.cache_latents == "disk" and data.cache_text_embeddings
    data.prepare_train(build(TINY), torch.device("cpu"))
    batch = next(iter(data.train_dataloader()))
    assert batch["image_moments"].shape[1] == 8 and batch["caption_context"].shape[1:] == (77, 32)
    assert data.cached_inputs == {"latents", "text"}
    sizes = {tuple(data.datasets["validation"][i][k] for k in ("height", "width")) for i in range(3)}
    assert sizes == {(512, 512), (384, 640), (640, 384)}


# ---- the tiny pipeline folder ---------------------------------------------------------------------------
def test_make_tiny_sd_writes_a_pipeline_folder_diffusers_loads_offline(tiny_folder):
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    folder, printed = tiny_folder
    assert "LatentDiffusion: unet 792,964" in printed and "model.params.pretrained=" in printed
    assert {p.name for p in folder.iterdir()} == {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"}
    pipe = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    assert pipe.safety_checker is None and isinstance(pipe.scheduler, PNDMScheduler)
    assert (pipe.scheduler.config.steps_offset, pipe.scheduler.config.beta_schedule) == (1, "scaled_linear")
    model = build(TINY, pretrained=folder)
    for ours, theirs in ((model.unet, pipe.unet), (model.first_stage_model.vae, pipe.vae),
                         (model.cond_stage_model.transformer, pipe.text_encoder)):
        theirs = theirs.state_dict()
        assert ours.state_dict().keys() == theirs.keys()
        assert all(torch.equal(v, theirs[k]) for k, v in ours.state_dict().items())
    caption = "A pokemon with green eyes, large wings, and a hat"
    assert pipe.tokenizer(caption).input_ids == model.cond_stage_model.tokenizer(caption).input_ids


def test_pretrained_folder_loads_the_saved_weights_not_a_new_initialisation(tiny_folder):
    loaded, other = build(TINY, pretrained=tiny_folder[0], seed=5), build(TINY, seed=5)
    key = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    written = build(TINY, seed=0).state_dict()[key]  # the script built with --seed 0
    assert torch.equal(loaded.state_dict()[key], written) and not torch.equal(other.state_dict()[key], written)


def test_sd_v1_config_refuses_the_tiny_folder_with_one_line(tiny_folder):
    with pytest.raises(ConfigError) as err:
        build(POKEMON, pretrained=tiny_folder[0])
    message = str(err.value)
    assert "\n" not in message and "config key 'sample_size' is 8 there but 64 in the YAML" in message
    assert str(tiny_folder[0] / "unet") in message


def test_missing_pretrained_folder_is_one_clear_line(tmp_path):
    with pytest.raises(ConfigError, match="pretrained folder .*nope.* does not exist .*models/README.md"):
        build(POKEMON, pretrained=tmp_path / "nope")


def test_finetune_from_a_diffusers_folder_loads_its_weights(tiny_folder):
    model = build(TINY, seed=7)
    summary = load_weights(model, tiny_folder[0])
    assert summary.startswith(f"loaded {len(model.state_dict()) - len(model.model_ema.state_dict())} tensors from")
    reference = build(TINY, pretrained=tiny_folder[0]).state_dict()
    for key in ("unet.conv_in.weight", "first_stage_model.vae.decoder.conv_out.bias",
                "cond_stage_model.transformer.embeddings.token_embedding.weight"):
        assert torch.equal(model.state_dict()[key], reference[key]), key
    # EMA starts from the loaded weights, not from the random initialisation.
    assert torch.equal(model.model_ema.conv_in__weight, reference["unet.conv_in.weight"])


# ---- the recipe, trained on the tiny model ---------------------------------------------------------------
def test_pokemon_plus_tiny_sd_builds_exactly_the_tiny_model():
    """``--base configs/pokemon.yaml configs/tiny/tiny-sd.yaml``: OmegaConf merges dicts key by key, so keys
    only pokemon.yaml names stay; they must all be SD defaults that leave the tiny architecture unchanged."""
    merged = OmegaConf.to_container(merge_configs([POKEMON, TINY]).model, resolve=True)
    assert merged["params"]["pretrained"] is None
    torch.manual_seed(0)
    combined = instantiate_from_config(merged)
    tiny = build(TINY)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # not diffusers' bookkeeping
    assert public(combined.unet.config) == public(tiny.unet.config)
    assert public(combined.first_stage_model.vae.config) == public(tiny.first_stage_model.vae.config)
    assert combined.cond_stage_model.transformer.config.to_dict() == tiny.cond_stage_model.transformer.config.to_dict()
    assert {k: v.shape for k, v in combined.state_dict().items()} == {k: v.shape for k, v in tiny.state_dict().items()}


def test_pokemon_recipe_trains_two_steps_with_the_tiny_model(tiny_folder, tmp_path):
    """The recipe's data and lightning sections as they are (bf16-mixed, EMA, warm-up, gradient checkpointing,
    validation prompts), the tiny model from make_tiny_sd.py through --finetune_from, 64 px images."""
    images = write_imagefolder(tmp_path / "pokemon")
    cmd = [sys.executable, "main.py", "-t", "--base", str(POKEMON), str(TINY), "-l", str(tmp_path / "logs"), "-n", "tiny",
           "--finetune_from", str(tiny_folder[0]), f"data.params.train.params.name={images}",
           "data.params.train.params.image_transforms.0.params.size=64",
           "data.params.train.params.image_transforms.1.params.size=64", "data.params.num_workers=0",
           "data.params.validation.params.output_size=64",  # the recipe's validation prompts sample at 512 px
           "lightning.trainer.max_steps=2", "lightning.callbacks.image_logger.params.steps=2"]
    # Offline, and one BLAS thread: pytest and this process share the CPU cores.
    env = {**{k: v for k, v in os.environ.items() if k != "SD_FINETUNE_RUN_DIR"}, "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"tensors from {tiny_folder[0]}" in proc.stdout and "LatentDiffusion: unet 792,964" in proc.stdout
    (run,) = (tmp_path / "logs").iterdir()
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=False)
    assert ckpt["global_step"] == 2 and ckpt["state_dict"]["unet.conv_in.weight"].shape == (32, 4, 3, 3)
    assert "train/loss_epoch" in (run / "metrics.csv").read_text().splitlines()[0]
    assert list((run / "images/val").glob("samples_cfg3_gs-000002_*.png"))


def test_a_later_file_that_changes_a_target_replaces_the_block(tmp_path):
    """digits-dreambooth.yaml over digits.yaml: the DreamBooth dataset must not inherit the digits dataset's params
    (split, size, ...), while blocks keeping their target still merge key by key."""
    demo = ROOT / "configs" / "demo"
    cfg = merge_configs([demo / "digits.yaml", demo / "digits-dreambooth.yaml"])
    train = OmegaConf.to_container(cfg.data.params.train)
    assert train["target"] == "ldm.data.dreambooth.DreamBoothDataset" and "repeats" not in train
    assert "split" not in train["params"] and train["params"]["num_class_images"] == 50
    assert cfg.data.params.validation is None and cfg.data.params.val_batch_size == 200  # merged, not replaced
    assert cfg.model.params.unet_config.params.config.sample_size == 8 and cfg.model.params.use_ema is False
    assert cfg.model.params.scheduler_config is None
