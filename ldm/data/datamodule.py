"""The ``data:`` block of a training config, as a LightningDataModule.

Datasets are built in ``__init__`` so that a wrong folder, column or transform is reported when
main.py reads the config, not minutes later after the model has been loaded onto the GPU.

Example::

    data:
      target: ldm.data.datamodule.DataModuleFromConfig
      params:
        batch_size: 4
        buckets: {resolution: 512}    # aspect-ratio buckets (ldm.data.buckets); off when absent
        cache_latents: disk           # encode each image once (ldm.data.cache); memory | disk | false
        cache_text_embeddings: true   # encode each caption once with the frozen text encoder
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
from pytorch_lightning.utilities import rank_zero_only
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from ldm.config import to_container
from ldm.data.buckets import CROPS, RESIZE_FILTERS, SMALL_BUCKETS, BucketCrop, assign_buckets, bucket_sizes
from ldm.data.caption_length import warn_long_captions
from ldm.data.holdout import Indexed, hold_out
from ldm.data.resume import EpochOrder, ResumableLoader, SeededItems, train_position
from ldm.data.images import ImageCaptionDataset
from ldm.data.text_only import TextOnly
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


@rank_zero_only
def _print_once(line: str) -> None:
    print(line)


def _cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


BUCKET_KEYS = {"resolution": 512, "step": 64, "max_aspect": 2.0, "crop": "center", "resize_filter": "bicubic",
               "small_buckets": "merge"}
# A bucket decides the size; a transform that resizes or crops afterwards would undo it.
SIZE_TRANSFORMS = ("Resize", "CenterCrop", "RandomCrop", "RandomResizedCrop", "FiveCrop", "TenCrop", "Pad")
CACHE_MODES = {False: None, None: None, True: "disk", "disk": "disk", "memory": "memory"}


def bucket_settings(given: Mapping | None) -> dict | None:
    """``data.params.buckets`` with defaults, checked: every key known, values in range."""
    if not given:
        return None
    given = dict(to_container(given))
    unknown = sorted(set(given) - set(BUCKET_KEYS))
    if unknown:
        raise ConfigError(f"data.params.buckets: unknown key(s) {unknown}; known: {sorted(BUCKET_KEYS)}")
    spec = {**BUCKET_KEYS, **given}
    bucket_sizes(int(spec["resolution"]), int(spec["step"]), float(spec["max_aspect"]))  # raises on bad values
    for key, allowed in (("crop", CROPS), ("small_buckets", SMALL_BUCKETS), ("resize_filter", tuple(RESIZE_FILTERS))):
        if spec[key] not in allowed:
            raise ConfigError(f"data.params.buckets.{key} must be one of {list(allowed)}, got {spec[key]!r}")
    return spec


def unwrap(dataset: Dataset) -> tuple[Dataset, int]:
    return (dataset.dataset, dataset.repeats) if isinstance(dataset, Repeated) else (dataset, 1)


def inner_dataset(dataset: Dataset, kind: type) -> Dataset | None:
    """The ``kind`` dataset under the wrappers a split may wear (Repeated, CachedDataset, Indexed), or None."""
    while not isinstance(dataset, kind) and isinstance(getattr(dataset, "dataset", None), Dataset):
        dataset = dataset.dataset
    return dataset if isinstance(dataset, kind) else None


def image_datasets(dataset: Dataset) -> list[ImageCaptionDataset]:
    """The image datasets an item draws from (DreamBooth: instance and class images)."""
    found = inner_dataset(dataset, ImageCaptionDataset)
    if found is not None:
        return [found]
    inner = dataset  # the innermost: a DreamBooth dataset holds two image sets
    while isinstance(getattr(inner, "dataset", None), Dataset):
        inner = inner.dataset
    return [d for d in (getattr(inner, "instance", None), getattr(inner, "classes", None)) if d is not None]


def build_dataset(split: str, cfg: Mapping[str, Any]) -> Dataset:
    """Instantiate one split's ``{target, params, repeats}`` block, naming the split in errors."""
    cfg = dict(to_container(cfg))
    repeats = cfg.pop("repeats", 1)
    if not isinstance(repeats, int) or repeats < 1:
        raise ConfigError(f"data.params.{split}.repeats must be an integer >= 1, got {repeats!r}")
    try:
        dataset = instantiate_from_config(cfg)
    except ConfigError as err:  # the dataset's own message, with the key it came from
        raise err if str(err).startswith("data.params.") else ConfigError(f"data.params.{split}: {err}") from err
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
        buckets: Mapping | None = None,
        cache_latents: bool | str = False,
        cache_text_embeddings: bool = False,
        cache_dir: str | None = None,
        seed: int | None = None,
        holdout: float = 0.05,
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
        self.seed = seed
        self._hold_out(holdout)
        self.buckets = bucket_settings(buckets)
        if cache_latents not in CACHE_MODES:
            raise ConfigError(f"data.params.cache_latents must be one of memory, disk, true, false; got {cache_latents!r}")
        self.cache_latents = CACHE_MODES[cache_latents]
        self.cache_text_embeddings = bool(cache_text_embeddings)
        self.cache_dir = cache_dir
        self.groups: list[int] | None = None  # bucket of every training item, once setup() has read the sizes
        self.cached_inputs: frozenset[str] = frozenset()  # "latents", "text": what batches carry ready-made
        self._prepared = False
        if (self.buckets or self.cache_latents or self.cache_text_embeddings) and "train" in self.datasets:
            self._check_train_supports_preparation(train)
        # Lightning decides whether to run validation/testing by whether these hooks exist (CompVis does the same).
        if "train" in self.datasets:
            self.train_dataloader = self._train_dataloader
        if "validation" in self.datasets or "holdout" in self.datasets:
            self.val_dataloader = self._val_dataloader
        if "test" in self.datasets:
            self.test_dataloader = self._test_dataloader

    def _hold_out(self, fraction: float) -> None:
        """Without validation images, set a seeded share of the training images aside for ``val/loss``."""
        validation = self.datasets.get("validation")
        if "train" not in self.datasets or (validation is not None and not isinstance(validation, TextOnly)):
            return
        inner, repeats = unwrap(self.datasets["train"])
        split = hold_out(inner, fraction, self._seed())
        if split is None:
            return
        kept, held, _ = split
        self.datasets["train"] = Repeated(kept, repeats) if repeats > 1 else kept
        self.datasets["holdout"] = held
        _print_once(f"validation loss: {len(held)} of {len(inner)} training images held out (holdout: {fraction}, "
                    f"seed {self._seed()}) and not trained on; data.params.holdout: 0 trains on all of them")

    def _check_train_supports_preparation(self, cfg: Mapping) -> None:
        inner = unwrap(self.datasets["train"])[0]
        wanted = [k for k, on in (("buckets", self.buckets), ("cache_latents", self.cache_latents),
                                  ("cache_text_embeddings", self.cache_text_embeddings)) if on]
        if isinstance(inner, IterableDataset):
            if self.cache_latents or self.cache_text_embeddings:
                raise ConfigError(f"data.params.{wanted[-1]}: the train dataset {to_container(cfg).get('target')} is "
                                  "streamed, so there is nothing to look cached items up by; turn the cache off")
            if not hasattr(inner, "use_stream_buckets"):
                raise ConfigError(f"data.params.buckets: the streamed train dataset {to_container(cfg).get('target')} "
                                  "does not support buckets")
        elif not (hasattr(inner, "slots") and hasattr(inner, "use_buckets")):
            raise ConfigError(f"data.params.{wanted[0]}: the train dataset {to_container(cfg).get('target')} does not "
                              "support it (folder, hf_dataset and DreamBooth datasets do)")
        for ds in image_datasets(inner):
            if self.buckets:
                resizing = [type(t).__name__ for t in getattr(ds.transform, "transforms", [])
                            if type(t).__name__ in SIZE_TRANSFORMS]
                if resizing:
                    raise ConfigError(f"data.params.buckets: {ds.description} has image_transforms {resizing}; buckets "
                                      "resize and crop each image to its bucket, so remove them")
            if self.cache_text_embeddings and not getattr(ds, "fixed_captions", True):
                raise ConfigError(f"data.params.cache_text_embeddings: {ds.description} has several captions per "
                                  "image, one picked at random each time; a cache would freeze one: turn it off")
            if self.cache_text_embeddings and ds.caption_transform is not None:
                raise ConfigError(f"data.params.cache_text_embeddings: {ds.description} changes its captions every "
                                  "epoch (caption_tags); cached embeddings would freeze one version: turn one off")

    # ---- buckets and caches, once the model and the processes exist ---------------------------------------------
    def setup(self, stage: str) -> None:
        if stage != "fit" or self._prepared or "train" not in self.datasets:
            return
        self._prepared = True
        trainer = getattr(self, "trainer", None)
        self.prepare_buckets(trainer.lightning_module if trainer is not None else None)
        if trainer is not None and trainer.is_global_zero:
            warn_long_captions(image_datasets(self.datasets["train"]), trainer.lightning_module)

    def prepare_train(self, model=None, device: torch.device | None = None, run_dir: str | None = None) -> None:
        """Buckets, then caches: what ``setup`` and ``LatentDiffusion.on_fit_start`` do in a run, for scripts and
        tests that use the DataModule without a Trainer."""
        self.prepare_buckets(model)
        self.prepare_caches(model, device, run_dir)

    def prepare_buckets(self, model=None) -> None:
        """Read the image sizes, assign buckets and print the table (rank 0)."""
        from ldm.data.cache import rank_and_world

        if not self.buckets:
            return
        inner, repeats = unwrap(self.datasets["train"])
        spec = self.buckets
        multiple = model.size_multiple() if model is not None else 1
        if int(spec["step"]) % multiple:
            raise ConfigError(f"data.params.buckets.step {spec['step']} must be a multiple of {multiple} (the "
                              "model's pixels per latent cell times its UNet's downsampling)")
        sizes = bucket_sizes(int(spec["resolution"]), int(spec["step"]), float(spec["max_aspect"]))
        crop = BucketCrop(spec["crop"], spec["resize_filter"])
        is_zero = rank_and_world()[0] == 0
        if isinstance(inner, IterableDataset):
            inner.use_stream_buckets(sizes, crop, self.batch_size)
            if is_zero:
                print(f"aspect-ratio buckets, chosen per image as the shards stream: "
                      f"{', '.join(f'{w} x {h}' for h, w in sizes)} (width x height)")
            return
        assignment = assign_buckets(inner.image_sizes(), sizes, self.batch_size, repeats, spec["small_buckets"])
        inner.use_buckets([assignment.target(i) for i in range(len(inner))], crop)
        self.groups = [assignment.of_image[i % len(inner)] for i in range(len(self.datasets["train"]))]
        if is_zero:
            print(f"aspect-ratio buckets (resolution {spec['resolution']}, step {spec['step']}, max aspect "
                  f"{spec['max_aspect']}, {spec['small_buckets']} small buckets):\n" + assignment.table(self.batch_size))

    def prepare_caches(self, model, device: torch.device | None = None, run_dir: str | None = None) -> None:
        """Fill the latent and text caches with ``model``'s encoders (on ``device``) and serve cached items.

        Called by ``LatentDiffusion.on_fit_start``: after the model is on its device and after callbacks such as
        DreamBooth's ``ClassImages`` have made the images to cache. Once per DataModule."""
        if not (self.cache_latents or self.cache_text_embeddings) or self.cached_inputs:
            return
        from ldm.data.cache_setup import cached_dataset

        inner, repeats = unwrap(self.datasets["train"])
        cached, self.cached_inputs = cached_dataset(self, inner, model, device or model.device, run_dir)
        self.datasets["train"] = Repeated(cached, repeats) if repeats > 1 else cached

    def _seed(self) -> int:
        return int(self.seed if self.seed is not None else os.environ.get("PL_GLOBAL_SEED", 0))

    def _loader(self, split: str, batch_size: int, shuffle: bool) -> DataLoader:
        dataset = self.datasets[split]
        common = dict(num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0)
        if split == "train" and not isinstance(dataset, IterableDataset):
            trainer = getattr(self, "trainer", None)
            world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
            groups = self.groups if self.groups is not None else [0] * len(dataset)
            order = EpochOrder(groups, batch_size, self._seed(), shuffle, world, rank)
            if trainer is not None:
                # The epoch a resumed run starts in: Lightning creates the iterator (and workers read the order)
                # before it calls set_epoch, and after an end-of-epoch checkpoint it loads no loader state.
                order.set_epoch(trainer.fit_loop.epoch_progress.current.processed)
            # Its own generator: creating the loader's iterator then draws nothing from torch's global one, which
            # the training step's noise comes from (ldm.data.resume).
            return ResumableLoader(SeededItems(dataset), batch_size=batch_size, sampler=order, drop_last=False,
                                   generator=torch.Generator().manual_seed(self._seed()), **common,
                                   position=lambda: train_position(self.trainer))
        if split != "train" and not isinstance(dataset, IterableDataset):
            dataset = Indexed(dataset)  # each validation item's index seeds its fixed noise
        # Streamed (iterable) datasets shuffle themselves; DataLoader refuses shuffle=True for them.
        return DataLoader(dataset, batch_size=batch_size, shuffle=False, drop_last=False, **common)

    def _train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, self.shuffle)

    def _val_dataloader(self) -> DataLoader | list[DataLoader]:
        # The held-out images (for val/loss) come first; the configured validation set (often prompts) last,
        # which is the one the image logger samples.
        loaders = [self._loader(split, self.val_batch_size, False) for split in ("holdout", "validation")
                   if split in self.datasets]
        return loaders[0] if len(loaders) == 1 else loaders

    def _test_dataloader(self) -> DataLoader:
        return self._loader("test", self.val_batch_size, False)

    @property
    def skipped_files(self) -> dict[str, list[str]]:
        """``{split: [file, ...]}`` of images skipped so far by any process, for splits that skipped any."""
        report = {}
        for split, dataset in self.datasets.items():
            files = sorted({f for ds in image_datasets(dataset) for f in ds.skipped_files})
            if files:
                report[split] = files
        return report

    def teardown(self, stage: str) -> None:
        for split, files in self.skipped_files.items():
            log.warning("%d unreadable image(s) were skipped in the %s data: %s", len(files), split, ", ".join(files))
