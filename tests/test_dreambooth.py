"""DreamBooth: dataset items with instance + class examples, the prior-preservation loss, identifier warnings,
resumable class-image generation, and an end-to-end tiny run through main.py that learns a subject."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from ldm.data.dreambooth import DreamBoothDataset, identifier_problems, rare_tokens
from ldm.models.tokenizer import clip_tokenizer
from ldm.util import PARTIAL_GLOB, ConfigError
from tests.conftest import main_py, run_dirs
from tests.test_model import tiny_model

TRANSFORMS = [{"target": "torchvision.transforms.Resize", "params": {"size": 16}},
              {"target": "torchvision.transforms.CenterCrop", "params": {"size": 16}}]


def subject_photos(root: Path, n: int = 5, size: int = 32) -> Path:
    """``n`` augmented crops of skimage's ``chelsea`` (one distinct cat): shifted crops, some mirrored."""
    from skimage import data as skdata

    root.mkdir(parents=True, exist_ok=True)
    cat = Image.fromarray(skdata.chelsea()).convert("RGB")  # 451 x 300
    for i in range(n):
        box = (40 + 12 * i, 10 + 6 * i, 340 + 12 * i, 290 + 6 * i)
        crop = cat.crop(box).resize((size, size), Image.BICUBIC)
        (crop.transpose(Image.FLIP_LEFT_RIGHT) if i % 2 else crop).save(root / f"chelsea-{i}.png")
    return root


def solid_images(root: Path, n: int, colour=(40, 90, 200), size: int = 32) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.new("RGB", (size, size), colour).save(root / f"c{i}.png")
    return root


def test_items_hold_an_instance_and_a_class_example(tmp_path):
    ds = DreamBoothDataset(str(subject_photos(tmp_path / "inst", 3)), "a photo of sks cat",
                           str(solid_images(tmp_path / "cls", 5)), "a photo of a cat", num_class_images=4,
                           image_transforms=TRANSFORMS)
    assert len(ds) == 4  # max(3 instance photos, 4 of the 5 class images)
    item = ds[3]
    assert set(item) == {"image", "caption", "class_image", "class_caption"}
    assert item["image"].shape == item["class_image"].shape == (3, 16, 16)
    assert item["caption"] == "a photo of sks cat" and item["class_caption"] == "a photo of a cat"
    assert torch.allclose(item["class_image"][2], torch.tensor(200 / 127.5 - 1), atol=1e-2)
    plain = DreamBoothDataset(str(tmp_path / "inst"), "a photo of sks cat", with_prior_preservation=False,
                              image_transforms=TRANSFORMS)
    assert len(plain) == 3 and set(plain[0]) == {"image", "caption"}


def test_missing_class_images_are_reported(tmp_path):
    inst = str(subject_photos(tmp_path / "inst", 2))
    ds = DreamBoothDataset(inst, "a photo of sks cat", str(tmp_path / "empty"), "a photo of a cat", num_class_images=3)
    assert ds.scan_class_images() == 3
    with pytest.raises(RuntimeError, match="ClassImages"):
        ds[0]
    with pytest.raises(ConfigError, match="class_data_dir and class_prompt"):
        DreamBoothDataset(inst, "a photo of sks cat")
    with pytest.raises(ConfigError, match="does not exist"):
        DreamBoothDataset(str(tmp_path / "nope"), "a photo of sks cat", with_prior_preservation=False)


def test_identifier_check_flags_common_and_split_words(tmp_path, caplog):
    assert identifier_problems("a photo of sks dog", "a photo of a dog") == []
    common = identifier_problems("a photo of bob dog", "a photo of a dog")
    assert "'bob' is a common word" in common[0] and "sks" in common[-1]
    split = identifier_problems("a photo of zwx dog", "a photo of a dog")
    assert "splits into 2 CLIP tokens" in split[0]
    tok = clip_tokenizer()
    for word in rare_tokens(tok, 4):
        assert len(tok.tokenize(word)) == 1 and identifier_problems(f"{word} dog", "dog") == []
    with caplog.at_level(logging.WARNING, logger="ldm.data.dreambooth"):
        DreamBoothDataset(str(subject_photos(tmp_path / "inst", 1)), "a photo of max dog", with_prior_preservation=False)
    assert "'max' is a common word" in caplog.text


def test_training_step_adds_the_weighted_prior_loss_and_logs_both():
    model = tiny_model(**{"params.use_ema": False, "params.prior_loss_weight": 0.5,
                          "params.cond_stage_config.params.ucg_rate": 0.0})
    model._trainer = SimpleNamespace(checkpoint_callbacks=[], global_step=0)
    logged = {}
    model.log = lambda name, value, **kw: logged.__setitem__(name, float(value.detach()))
    g = torch.Generator().manual_seed(3)
    inst, cls = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    batch = {"image": inst, "caption": ["sks cat"] * 2, "class_image": cls, "class_caption": ["a cat"] * 2}
    torch.manual_seed(0)
    total = model.training_step(batch, 0)
    torch.manual_seed(0)
    a = model.diffusion_loss({"image": inst, "caption": ["sks cat"] * 2})
    b = model.diffusion_loss({"image": cls, "caption": ["a cat"] * 2})
    assert torch.allclose(total, a + 0.5 * b)
    assert logged["train/instance_loss"] == pytest.approx(float(a)) and logged["train/prior_loss"] == pytest.approx(float(b))


def test_class_images_are_generated_once_and_resume_with_the_same_seeds(tmp_path):
    from ldm.callbacks.dreambooth import generate_class_images

    model = tiny_model(**{"params.use_ema": False})
    folder = tmp_path / "cls"
    assert generate_class_images(model, folder, "a photo of a cat", 3, batch_size=2, steps=2) == 3
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == ["class-00000.png", "class-00001.png", "class-00002.png"]
    first = np.asarray(Image.open(files[1]))
    assert generate_class_images(model, folder, "a photo of a cat", 3, steps=2) == 0  # cached
    files[1].unlink()  # as if interrupted before image 1 was written
    assert generate_class_images(model, folder, "a photo of a cat", 3, steps=2) == 1
    assert np.array_equal(np.asarray(Image.open(files[1])), first)
    assert not list(folder.glob(PARTIAL_GLOB))


def distance_to(samples: torch.Tensor, images: torch.Tensor) -> float:
    """Mean over samples of the pixel MSE to the nearest of ``images`` (both (N,3,H,W) in [-1, 1])."""
    d = ((samples[:, None] - images[None]) ** 2).mean(dim=(2, 3, 4))
    return float(d.min(dim=1).values.mean())


def dreambooth_overlay(tmp_path: Path, inst: Path, cls: Path, lr: float = 3e-3, steps: int = 300) -> Path:
    """Tiny-model settings over configs/dreambooth.yaml: 16 px, a high LR for a random tiny model, few steps."""
    cfg = {
        "model": {"base_learning_rate": lr,
                  "params": {"use_ema": False, "scheduler_config": None,
                             "unet_config": {"params": {"gradient_checkpointing": False}},
                             "cond_stage_config": {"params": {"ucg_rate": 0.0}}}},
        "data": {"params": {"batch_size": 2, "num_workers": 0,
                            "train": {"repeats": 4, "params": {"instance_data_dir": str(inst),
                                                               "instance_prompt": "a photo of sks cat",
                                                               "class_data_dir": str(cls),
                                                               "class_prompt": "a photo of a cat",
                                                               "num_class_images": 6,
                                                               "image_transforms": TRANSFORMS}}}},
        "lightning": {"trainer": {"accelerator": "cpu", "precision": 32, "max_steps": steps, "log_every_n_steps": 5,
                                  "enable_progress_bar": False, "enable_model_summary": False},
                      "modelcheckpoint": {"params": {"every_n_train_steps": None, "every_n_epochs": None}},
                      "callbacks": {"class_images": {"params": {"batch_size": 6, "steps": 10, "guidance_scale": 1.0}},
                                    "dreambooth_samples": {"params": {"every_n_steps": 100, "n": 2, "steps": 5,
                                                                      "prompts": ["sks cat in the style of pixar"]}},
                                    "dreambooth_score": {"params": {"n": 4, "steps": 5}}}},
    }
    path = tmp_path / "overlay.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def run_dreambooth(tmp_path: Path, lora: bool = False) -> tuple[Path, Path, Path]:
    inst, cls = subject_photos(tmp_path / "inst"), tmp_path / "class"
    bases = ["configs/dreambooth.yaml", "configs/tiny/tiny-sd.yaml"] + (["configs/dreambooth-lora.yaml"] if lora else [])
    overlay = dreambooth_overlay(tmp_path, inst, cls, lr=1e-2 if lora else 3e-3, steps=150)
    proc = main_py("-t", "--no-test", "--base", *bases, overlay,
                   "-l", tmp_path / "logs", "-n", "db", timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    return run, inst, cls


def closeness(model, inst: Path, cls: Path, guidance_scale: float = 1.0) -> dict[str, float]:
    """Distances of instance-prompt and class-prompt samples to the instance photos and to the class images."""
    from ldm.data.folder import FolderDataset

    def load(root):
        ds = FolderDataset(str(root), image_transforms=TRANSFORMS)
        return torch.stack([ds[i]["image"] for i in range(len(ds))])

    inst_images, class_images = load(inst), load(cls)
    seeds = list(range(100, 108))
    kw = {"steps": 10, "guidance_scale": guidance_scale, "size": 16}
    s_inst = model.generate(["a photo of sks cat"] * len(seeds), seeds, **kw)
    s_cls = model.generate(["a photo of a cat"] * len(seeds), seeds, **kw)
    return {"instance_prompt_to_photos": distance_to(s_inst, inst_images),
            "class_prompt_to_photos": distance_to(s_cls, inst_images),
            "class_prompt_to_class_images": distance_to(s_cls, class_images)}


def load_run(run: Path):
    from ldm.models.diffusion import LatentDiffusion
    from ldm.util import instantiate_from_config
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(next((run / "configs").glob("*-project.yaml")))
    model = instantiate_from_config(OmegaConf.to_container(cfg.model, resolve=True))
    assert isinstance(model, LatentDiffusion)
    state = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)["state_dict"]
    model.load_state_dict(state)
    return model.eval()


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_end_to_end_dreambooth_run(tmp_path, lora):
    """The user's path: configs/dreambooth.yaml (+ dreambooth-lora.yaml) on the tiny model through main.py."""
    run, inst, cls = run_dreambooth(tmp_path, lora)
    assert len(list(cls.glob("class-*.png"))) == 6  # generated by the base model before training
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "train/instance_loss" in header and "train/prior_loss" in header
    grids = sorted((run / "images" / "train").glob("dreambooth_gs-*.png"))
    assert [g.name for g in grids] == ["dreambooth_gs-000001.png", "dreambooth_gs-000100.png", "dreambooth_gs-000150.png"]
    assert Image.open(grids[-1]).size[1] == 3 * 66 + 2  # rows: instance, class, user prompt (16 px tiles shown at 64)
    assert (run / "dreambooth_score.json").is_file() and (run / "dreambooth_score.png").is_file()
    model = load_run(run)
    if lora:
        from diffusers import StableDiffusionPipeline

        adapter = run / "lora" / "pytorch_lora_weights.safetensors"
        assert adapter.stat().st_size < 0.1 * 4 * sum(p.numel() for p in model.unet.parameters())
        state, _ = StableDiffusionPipeline.lora_state_dict(str(adapter))
        assert state and all(k.startswith("unet.") for k in state)
    d = closeness(model, inst, cls)
    print(f"DreamBooth tiny run ({'lora' if lora else 'full'}):", {k: round(v, 4) for k, v in d.items()})
    # The base model's class images stay what the class prompt gives.
    assert d["class_prompt_to_class_images"] < d["class_prompt_to_photos"]


def test_dreambooth_score_figure_with_and_without_prior_preservation(tmp_path):
    """The score compares samples with the photos (and the class images when there are any); a stand-in model
    whose instance-prompt samples are the photos themselves must come out at distance 0 from them."""
    from ldm.callbacks.dreambooth_eval import DreamBoothScore

    inst = subject_photos(tmp_path / "inst", 3)
    cls = solid_images(tmp_path / "cls", 4)

    class Model:
        def __init__(self, dataset):
            self.dataset = dataset

        def generate(self, prompts, seeds, size, **kwargs):
            if "sks" in prompts[0]:
                photos = [self.dataset.instance[i % len(self.dataset.instance)]["image"] for i in range(len(seeds))]
                return torch.stack(photos)
            return torch.full((len(seeds), 3, *size), 200 / 127.5 - 1)  # the solid class colour's blue channel

    score = DreamBoothScore(n=4, thumb=8)
    with_prior = DreamBoothDataset(str(inst), "a photo of sks cat", str(cls), "a photo of a cat", num_class_images=4,
                                   image_transforms=TRANSFORMS)
    result, grid = score.score(Model(with_prior), with_prior)
    assert result["instance_prompt_to_instance_images"] < 1e-6
    assert result["instance_prompt_to_instance_images"] < result["class_prompt_to_instance_images"]
    assert grid.shape[0] == 3 * 4  # photos (padded), instance samples, class samples
    assert "'a photo of a cat'" in score.figure(result)
    plain = DreamBoothDataset(str(inst), "a photo of sks cat", with_prior_preservation=False, image_transforms=TRANSFORMS)
    result, grid = score.score(Model(plain), plain)
    assert set(k for k in result if "_to_" in k) == {"instance_prompt_to_instance_images"} and grid.shape[0] == 8
    assert "a photo of a cat" not in score.figure(result)
