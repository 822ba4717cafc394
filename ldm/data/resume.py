"""Exact mid-epoch resume: a training item's randomness and its place in the epoch are functions of the seed, the
epoch and its position, never of a process's random state, so a resumed run reads the same batches, cropped and
flipped the same way, as a run that was never stopped.

* :class:`EpochOrder` is the training sampler (every train loader uses it; buckets give it their groups). It yields
  ``(index, item_seed)`` keys, and after :meth:`EpochOrder.resume_at` its next pass starts at a given batch of a given
  epoch.
* :class:`SeededItems` reads each key's item under a random state seeded from ``item_seed`` (torch's CPU generator,
  Python's ``random``, NumPy's legacy global), so torchvision's random crops and flips, caption dropout of a dataset
  and tag shuffling draw the same numbers in the main process, in any worker, with any number of workers, and after a
  resume; the caller's random state is left as it was.
* :class:`ResumableLoader` is a DataLoader whose state Lightning keeps in every checkpoint: :func:`train_position`,
  which batch of which epoch comes next; a resumed run hands it to the sampler before the first batch.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.data.buckets import BucketSampler

_MASK = (1 << 63) - 1


def item_seed(seed: int, epoch: int, position: int) -> int:
    """A 63-bit seed for the item at ``position`` of ``epoch``'s order (positions count over all ranks)."""
    return (((seed * 1_000_003 + epoch) & _MASK) * 1_000_000_007 + position) & _MASK


@contextmanager
def seeded_random_state(seed: int) -> Iterator[None]:
    """Torch's CPU generator, Python's ``random`` and NumPy's global state seeded from ``seed`` inside, restored after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed % (1 << 32))
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


class SeededItems(Dataset):
    """``dataset`` read by :class:`EpochOrder` keys, each item under its own seeded random state."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Any) -> Any:
        index, seed = key
        with seeded_random_state(seed):
            return self.dataset[index]


class EpochOrder(BucketSampler):
    """:class:`BucketSampler`'s batches (one group when there are no buckets), as ``(index, item_seed)`` keys for
    :class:`SeededItems`, and resumable: after :meth:`resume_at` the next pass starts mid-epoch.

    A resumed sampler counts its passes itself (the resumed epoch, then the next, ...) instead of following
    Lightning's ``set_epoch``: after a resume from a checkpoint written in the end-of-epoch hooks or by a
    ``max_steps`` stop, the number Lightning passes is one ahead of the epoch it actually runs."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._resume: tuple[int, int] | None = None
        self._counting = False

    def resume_at(self, epoch: int, batch: int) -> None:
        """The next pass is ``epoch``'s from its ``batch``-th batch of this rank (nothing, if that is its end);
        each later pass is the next epoch's."""
        self._resume, self._counting = (int(epoch), int(batch)), True

    def set_epoch(self, epoch: int) -> None:
        if not self._counting:
            super().set_epoch(epoch)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, skip = self._resume if self._resume is not None else (self.epoch, 0)
        self._resume = None
        self.epoch = epoch + 1 if self._counting else epoch
        for b, batch in enumerate(self.batches(epoch)):
            if b < skip:
                continue
            first = (b * self.num_replicas + self.rank) * self.batch_size  # the batch's place in the global order
            for j, index in enumerate(batch):
                yield index, item_seed(self.seed, epoch, first + j)


def train_position(trainer) -> tuple[int, int]:
    """(epoch, batch) the run continues from if it resumes from a checkpoint written now: the epoch begun last and
    how many of its batches have had their optimizer step (all of them in the end-of-epoch hooks: the resumed pass
    is then empty and the next is the next epoch's).

    From Lightning's progress counters, read as its fit loop reads them when it restarts: ``epoch_progress.started``
    counts epochs begun (the running one included; ``processed`` is no guide, as a ``max_steps`` stop mid-epoch
    counts that epoch processed too); a checkpoint written after an epoch's last step (``on_train_batch_end``, before
    the batch counts as completed) restarts at the next epoch. Under gradient accumulation the position goes back to
    the start of an unfinished accumulation window, whose gradients a checkpoint does not hold."""
    begun = trainer.fit_loop.epoch_progress.current.started
    batches = trainer.fit_loop.epoch_loop.batch_progress.current
    if not begun:
        return 0, 0
    if batches.completed < batches.processed and batches.processed >= trainer.num_training_batches:
        return begun, 0
    done = batches.processed
    if done < trainer.num_training_batches:
        done -= done % max(1, int(trainer.accumulate_grad_batches))
    return begun - 1, done


class ResumableLoader(DataLoader):
    """The training DataLoader, resumable the way Lightning resumes loaders: the fit loop stores its
    ``state_dict`` in every checkpoint and calls ``load_state_dict`` before a resumed run first iterates it.
    ``position`` says where the run is (:func:`train_position`); the sampler is an :class:`EpochOrder`."""

    def __init__(self, *args, position: Callable[[], tuple[int, int]] | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.position = position

    def state_dict(self) -> dict:
        return {"train_position": list(self.position())} if self.position is not None else {}

    def load_state_dict(self, state: dict) -> None:
        if "train_position" in state:
            self.sampler.resume_at(*state["train_position"])
