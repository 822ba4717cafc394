"""DreamBooth: dataset items with instance + class examples, the prior-preservation loss, identifier warnings,
resumable class-image generation, and an end-to-end tiny run through main.py that learns a subject."""
from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.data.dreambooth import DreamBoothDataset, identifier_problems, rare_tokens
from ldm.models.tokenizer import clip_tokenizer
from ldm.util import ConfigError
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
    assert not list(folder.glob(".*.tmp"))
