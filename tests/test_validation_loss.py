"""A validation loss that means something: fixed timesteps and fixed noise per image, so the same weights give
the same number in any batch order or size; a held-out share of the training set when no validation images are
given, never trained on."""
from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.holdout import Indexed
from ldm.util import ConfigError
from tests.conftest import write_image_folder
from tests.test_cache import tiny_model

TRANSFORMS = [{"target": "torchvision.transforms.Resize", "params": {"size": 16}},
              {"target": "torchvision.transforms.RandomCrop", "params": {"size": 16}},
              {"target": "torchvision.transforms.RandomHorizontalFlip"}]
NAMES = ("astronaut", "chelsea", "coffee", "rocket", "camera", "horse", "moon", "coins", "page", "clock", "text",
         "brick", "grass", "gravel", "logo", "cat", "cell", "colorwheel", "immunohistochemistry", "retina", "hubble_deep_field")


@pytest.fixture(scope="module")
def many(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("many"), NAMES, size=24)


def folder_dm(root, **params) -> DataModuleFromConfig:
    train = {"target": "ldm.data.folder.FolderDataset", "params": {"root": str(root), "image_transforms": TRANSFORMS}}
    validation = {"target": "ldm.data.text_only.TextOnly", "params": {"captions": ["a cat"]}}
    return DataModuleFromConfig(batch_size=2, num_workers=0, train=train, validation=validation, seed=3, **params)


def test_a_seeded_share_is_held_out_printed_and_never_trained_on(many, capsys):
    dm = folder_dm(many, holdout=0.1)
    out = capsys.readouterr().out
    assert f"2 of {len(NAMES)} training images held out (holdout: 0.1, seed 3)" in out
    train_files = set(dm.datasets["train"].files)
    held_files = set(dm.datasets["holdout"].files)
    assert len(held_files) == 2 and not train_files & held_files and len(train_files) == len(NAMES) - 2
    assert set(folder_dm(many, holdout=0.1).datasets["holdout"].files) == held_files  # the same per seed
    held = dm.datasets["holdout"]
    assert torch.equal(held[0]["image"], held[0]["image"])  # no random crop or flip in validation
    loaders = dm.val_dataloader()
    assert len(loaders) == 2 and "index" in next(iter(loaders[0]))  # held-out images first, prompts last
    assert "holdout" not in folder_dm(many, holdout=0).datasets
    with pytest.raises(ConfigError, match="holdout must be a fraction"):
        folder_dm(many, holdout=1.5)


def test_small_sets_and_given_validation_images_are_not_split(image_folder, many):
    assert "holdout" not in folder_dm(image_folder).datasets  # 4 photos: every one is needed for training
    train = {"target": "ldm.data.folder.FolderDataset", "params": {"root": str(many)}}
    given = DataModuleFromConfig(batch_size=2, train=train, validation=train)
    assert "holdout" not in given.datasets and len(given.datasets["train"]) == len(NAMES)


def test_val_loss_is_the_same_for_the_same_weights_in_any_batching(many):
    dm = folder_dm(many, holdout=0.2)
    model = tiny_model().eval()
    held = Indexed(dm.datasets["holdout"])

    def mean_losses(batch_size: int) -> dict[int, float]:
        totals: dict[int, float] = {}
        for n, batch in enumerate(DataLoader(held, batch_size=batch_size)):
            for t, value in model.validation_losses(batch, n).items():
                totals[t] = totals.get(t, 0.0) + float(value) * len(batch["caption"])
        return {t: v / len(held) for t, v in totals.items()}

    one, four = mean_losses(1), mean_losses(4)
    assert sorted(one) == model.val_timesteps == [100, 300, 500, 700, 900]
    assert one == pytest.approx(four, rel=1e-5)  # fixed per image, not per batch
    assert len({round(v, 6) for v in one.values()}) == 5  # each timestep its own figure
    with torch.no_grad():
        next(model.unet.parameters()).add_(0.1)
    assert mean_losses(4) != pytest.approx(four, rel=1e-5)  # ...and it moves when the weights do


def test_val_timesteps_can_be_listed():
    assert tiny_model(val_timesteps=[100, 900]).val_timesteps == [100, 900]
    with pytest.raises(ConfigError, match="val_timesteps"):
        tiny_model(val_timesteps=[1000])
