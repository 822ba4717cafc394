"""configs/sdxl.yaml as written (buckets, cached latents and text embeddings, bf16-mixed, gradient checkpointing,
Adafactor) on the tiny SDXL folder: the batches carry what SDXL's micro-conditioning needs, and main.py trains,
logs grids and resumes."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from skimage import data as skdata

from diffusers import DDIMScheduler, StableDiffusionXLPipeline

from ldm import inference
from ldm.config import merge_configs
from ldm.util import instantiate_from_config
from ldm.weights import load_model
from tests.conftest import main_env, main_py
from tests.test_sdxl import RECIPE, TINY, load_script, sdxl_folder  # noqa: F401  (the module-scoped folder fixture)

# Photos of several shapes (w x h), so the 32 px bucket budget makes more than one bucket.
SHAPES = {"astronaut": (48, 32), "chelsea": (48, 32), "coffee": (32, 48), "rocket": (32, 48), "camera": (40, 40),
          "page": (40, 40)}


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("style")
    for name, size in SHAPES.items():
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize(size).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a {name} in the style\n")
    return root


def overrides(folder: Path, photos: Path, cache: Path) -> list[str]:
    return [f"model.params.pretrained={folder}", f"data.params.train.params.root={photos}",
            "data.params.buckets.resolution=32", "data.params.buckets.step=8", "data.params.batch_size=2",
            f"data.params.cache_dir={cache}", "data.params.num_workers=0",
            "data.params.validation.params.output_size=[[32,32],[24,40]]"]


def test_batches_carry_the_bucket_sizes_and_the_cached_pooled_vector(sdxl_folder, photos, tmp_path):
    cfg = merge_configs([RECIPE, TINY], overrides(sdxl_folder, photos, tmp_path / "cache"))
    torch.manual_seed(0)
    model = instantiate_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    data = instantiate_from_config(cfg.data)
    data.prepare_train(model, torch.device("cpu"))
    assert data.cached_inputs == {"latents", "text"}
    model._cached_unconditional = model.cond_stage_model.unconditional(1)  # what on_fit_start keeps
    for batch in data.train_dataloader():
        context = batch["caption_context"]  # the conditioner's whole output, cached per caption
        assert context["context"].shape[1:] == (77, 96) and context["text_embeds"].shape[1:] == (48,)
        fresh = model.cond_stage_model(batch["caption"])
        assert torch.allclose(context["text_embeds"], fresh["text_embeds"], atol=1e-6)
        h, w = (s * model.first_stage_model.downsample for s in batch["image_moments"].shape[-2:])
        ids = model.conditioning(batch)["time_ids"]
        expected = torch.cat([batch["original_size"], batch["crop_top_left"],
                              torch.tensor([[h, w]] * len(ids))], dim=1)
        assert torch.equal(ids, expected.to(ids))
        assert {tuple(x) for x in batch["original_size"].tolist()} <= {(h, w) for w, h in SHAPES.values()}
    dropped = model.conditioning(batch, drop=torch.tensor([True, False]))
    assert not dropped["context"][0].any() and not dropped["text_embeds"][0].any()
    assert torch.equal(dropped["time_ids"], ids)  # the size conditioning is never dropped


def metrics_steps(run: Path) -> list[int]:
    with open(run / "metrics.csv") as f:
        return sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss_step")})


def test_recipe_trains_logs_grids_and_resumes(sdxl_folder, photos, tmp_path):
    logs = tmp_path / "logs"
    args = ["-t", "--base", RECIPE, TINY, "-l", logs, "-n", "sdxl", *overrides(sdxl_folder, photos, tmp_path / "c"),
            "lightning.trainer.max_steps=4", "lightning.trainer.accelerator=cpu",
            "lightning.trainer.log_every_n_steps=1", "lightning.modelcheckpoint.params.every_n_train_steps=2",
            "lightning.callbacks.image_logger.params.batch_frequency=2",
            "lightning.callbacks.image_logger.params.steps=2", "+lightning.trainer.limit_val_batches=1"]
    first = main_py(*args, timeout=400, env=main_env(PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert first.returncode == 0, first.stderr[-3000:]
    out = first.stdout
    assert "aspect-ratio buckets (resolution 32" in out and "text cache:" in out and "latent cache:" in out
    (run,) = logs.iterdir()
    (project,) = (run / "configs").glob("*-project.yaml")
    assert "ldm.models.sdxl.SDXLTextConditioner" in project.read_text()
    ckpt = torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    assert ckpt["global_step"] == 4
    assert ckpt["state_dict"]["unet.add_embedding.linear_1.weight"].shape == (128, 96)  # pooled 48 + 6 x 8 in
    train_grids = sorted(p.name for p in (run / "images/train").glob("samples_cfg5*.png"))
    assert train_grids, sorted(p.name for p in (run / "images/train").iterdir())
    val = {p.name.split("_gs-")[0] for p in (run / "images/val").glob("samples_*.png")}
    assert val == {"samples_cfg5_32x32", "samples_cfg5_40x24"}  # one grid per size (width x height)

    resumed = main_py("-r", run, "lightning.trainer.max_steps=6", timeout=400,
                      env=main_env(PYTHONPATH=str(Path(__file__).resolve().parents[1])))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert torch.load(run / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["global_step"] == 6
    assert metrics_steps(run)[-1] >= 4 and len(list(logs.iterdir())) == 1

    # The run exports (EMA weights) to a folder and a single file that diffusers samples as we sample the export;
    # the run itself samples within float rounding of that (the same tensors, measured 1.3e-6 apart: they come from
    # the training checkpoint instead of safetensors files).
    convert = load_script("convert")
    folder, single = tmp_path / "export", tmp_path / "export.safetensors"
    assert convert.main([str(run), "--diffusers", str(folder), "--single-file", str(single)]) == 0

    def sample(model):
        images = inference.txt2img(model, ["a camera"], 32, 24, "", torch.Generator().manual_seed(0), "ddim", 3, 5.0)
        return (images / 2 + 0.5).clamp(0, 1)

    exported = sample(load_model(folder))
    assert float((sample(load_model(run)) - exported).abs().max()) < 1e-5
    # from_single_file's converter gives the same tensors in another memory layout: float rounding (6.6e-7 here).
    for pipe, tolerance in ((StableDiffusionXLPipeline.from_pretrained(str(folder)), 0.0),
                            (StableDiffusionXLPipeline.from_single_file(str(single), config=str(folder)), 1e-5)):
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        theirs = pipe(["a camera"], height=32, width=24, num_inference_steps=3, guidance_scale=5.0,
                      generator=torch.Generator().manual_seed(0), output_type="pt").images
        assert float((exported - theirs).abs().max()) <= tolerance

if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
