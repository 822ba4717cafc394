"""The ``data:`` block of a training config, as a LightningDataModule.

Datasets are built in ``__init__`` so that a wrong folder, column or transform is reported when
main.py reads the config, not minutes later after the model has been loaded onto the GPU.

Example::

    data:
      target: ldm.data.datamodule.DataModuleFromConfig
      params:
        batch_size: 4
        train:
          target: ldm.data.folder.FolderDataset
          repeats: 20          # a 10-image folder then gives 200 items per epoch
          params: {root: data/cats, image_transforms: [...]}
        validation:
          target: ldm.data.text_only.TextOnly
          params: {captions: ["a photo of a cat"], n_per_caption: 4}
"""
from __future__ import annotations

import logging
import os
from typing import Any, Mapping

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.config import to_container
from ldm.data.images import ImageCaptionDataset
from ldm.util import ConfigError, instantiate_from_config

log = logging.getLogger(__name__)


class Repeated(Dataset):
    """``dataset`` seen ``repeats`` times per epoch, so tiny fine-tuning sets make epochs of a useful length."""

    def __init__(self, dataset: Dataset, repeats: int) -> None:
        self.dataset = dataset
        self.repeats = repeats

    def __len__(self) -> int:
        return len(self.dataset) * self.repeats

    def __getitem__(self, i: int) -> Any:
        return self.dataset[i % len(self.dataset)]


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def build_dataset(split: str, cfg: Mapping[str, Any]) -> Dataset:
    """Instantiate one split's ``{target, params, repeats}`` block, naming the split in errors."""
    cfg = dict(to_container(cfg))
    repeats = cfg.pop("repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"data.params.{split}.repeats must be an integer >= 1, got {repeats!r}")
    try:
        dataset = instantiate_from_config(cfg)
    except TypeError as err:
        if "argument" not in str(err):  # a bug inside the dataset, not a wrong or missing param name
            raise
        raise ConfigError(f"data.params.{split} ({cfg.get('target')}): {err}") from err
    if len(dataset) == 0:
        raise ConfigError(f"data.params.{split} ({cfg.get('target')}) is empty")
    if repeats > 1 and isinstance(dataset, IterableDataset):
        raise ConfigError(f"data.params.{split}: repeats needs an indexable dataset; a streamed one sets its "
                          "epoch size itself (TarShards' length)")
    return Repeated(dataset, repeats) if repeats > 1 else dataset


class DataModuleFromConfig(pl.LightningDataModule):
    """Train/validation/test DataLoaders over datasets given as config blocks.

    ``num_workers`` defaults to min(8, usable CPUs); workers are kept alive between epochs.
    Skipped (undecodable) images from all worker processes are listed by :attr:`skipped_files`
    and summarised in a warning at teardown.
    """

    def __init__(
        self,
        batch_size: int,
        train: Mapping | None = None,
        validation: Mapping | None = None,
        test: Mapping | None = None,
        num_workers: int | None = None,
        shuffle: bool = True,
        val_batch_size: int | None = None,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        if train is None and validation is None and test is None:
            raise ConfigError("data.params: give at least one of train, validation, test (each a {target, params} block)")
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.num_workers = min(8, _cpu_count()) if num_workers is None else int(num_workers)
        self.shuffle = shuffle
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self.datasets = {
            split: build_dataset(split, cfg)
            for split, cfg in (("train", train), ("validation", validation), ("test", test))
            if cfg is not None
        }
        # Lightning decides whether to run validation/testing by whether these hooks exist (CompVis does the same).
        if "train" in self.datasets:
            self.train_dataloader = self._train_dataloader
        if "validation" in self.datasets:
            self.val_dataloader = self._val_dataloader
        if "test" in self.datasets:
            self.test_dataloader = self._test_dataloader

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            self.datasets[split],
            batch_size=batch_size,
            # Streamed (iterable) datasets shuffle themselves; DataLoader refuses shuffle=True for them.
            shuffle=shuffle and not isinstance(self.datasets[split], IterableDataset),
            drop_last=False,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
        )

    def _train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, self.shuffle)

    def _val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.val_batch_size, False)

    def _test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, False)

    @property
    def skipped_files(self) -> dict[str, list[str]]:
        """``{split: [file, ...]}`` of images skipped so far by any process, for splits that skipped any."""
        report = {}
        for split, dataset in self.datasets.items():
            inner = dataset.dataset if isinstance(dataset, Repeated) else dataset
            files = inner.skipped_files if isinstance(inner, ImageCaptionDataset) else []
            if files:
                report[split] = files
        return report

    def teardown(self, stage: str) -> None:
        for split, files in self.skipped_files.items():
            log.warning("%d unreadable image(s) were skipped in the %s data: %s", len(files), split, ", ".join(files))
