"""Training captions longer than the text encoder reads: CLIP sees 77 tokens (75 words' worth) and drops the rest,
silently unless someone says so. Checked once before the first step, one warning per caption naming its files."""
from __future__ import annotations

import logging
from typing import Iterable

from torch.utils.data import Dataset

log = logging.getLogger(__name__)
SHOWN_FILES = 3  # a caption shared by thousands of files names a few of them and counts the rest


def long_caption_warnings(named_captions: Iterable[tuple[str, str]], conditioner) -> list[str]:
    """One line per distinct caption that ``conditioner`` truncates, naming the files that carry it."""
    files: dict[str, list[str]] = {}
    limit = getattr(conditioner, "max_length", None)
    for name, caption in named_captions:
        # A token covers at least one character, so a caption shorter than the limit cannot be cut.
        if limit is None or len(caption) > limit - 2:
            files.setdefault(caption, []).append(name)
    lines = []
    for caption, names in files.items():
        for line in conditioner.prompt_warnings([caption]):
            shown = ", ".join(names[:SHOWN_FILES]) + (f" and {len(names) - SHOWN_FILES} more" if len(names) > SHOWN_FILES else "")
            lines.append(f"caption of {shown}: {line.removeprefix('warning: ')}")
    return lines


def warn_long_captions(datasets: Iterable[Dataset], model) -> None:
    """Log :func:`long_caption_warnings` for the image datasets of a split (see ``ImageCaptionDataset.named_captions``)."""
    conditioner = getattr(model, "cond_stage_model", None)
    if conditioner is None:
        return
    for dataset in datasets:
        for line in long_caption_warnings(dataset.named_captions(), conditioner):
            log.warning(line)
