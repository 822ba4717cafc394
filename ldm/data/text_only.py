"""Prompts with fixed seeds, for sampling the same pictures from every checkpoint.

Each item's seed is ``seed + index`` and never changes, so sample grids logged at different steps
differ only because the weights changed; comparing them is the point of a validation prompt set.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from torch.utils.data import Dataset

from ldm.data.folder import read_text
from ldm.util import ConfigError


class TextOnly(Dataset):
    """Items ``{"caption": str, "seed": int}``; each caption appears ``n_per_caption`` times with its own seed.

    ``output_size`` (pixels, an int or ``[height, width]``) is the size the image logger samples these prompts at;
    by default the model's own. Items then carry it as ``height``/``width``.
    """

    def __init__(
        self,
        captions: Sequence[str] | None = None,
        caption_file: str | None = None,
        seed: int = 0,
        n_per_caption: int = 1,
        output_size: int | Sequence[int] | None = None,
    ) -> None:
        prompts = [str(c) for c in captions or []]
        if caption_file is not None:
            path = Path(caption_file).expanduser()
            if not path.is_file():
                raise ConfigError(f"TextOnly: caption_file '{caption_file}' does not exist")
            prompts += [line.strip() for line in read_text(path).splitlines() if line.strip()]
        if not prompts:
            where = f"caption_file '{caption_file}'" if caption_file is not None else "captions"
            raise ConfigError(f"TextOnly: no prompts given ({where} is empty); set captions: [...] or caption_file")
        if int(n_per_caption) < 1:
            raise ConfigError(f"TextOnly: n_per_caption must be >= 1, got {n_per_caption}")
        self.captions = prompts
        self.seed = int(seed)
        self.n_per_caption = int(n_per_caption)
        if output_size is not None:
            size = [output_size] * 2 if isinstance(output_size, int) else [int(v) for v in output_size]
            if len(size) != 2 or min(size) < 8 or any(v % 8 for v in size):
                raise ConfigError(f"TextOnly: output_size must be a multiple of 8 (or [height, width] of them), "
                                  f"got {output_size!r}")
            output_size = tuple(size)
        self.output_size = output_size

    def __len__(self) -> int:
        return len(self.captions) * self.n_per_caption

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        item = {"caption": self.captions[i // self.n_per_caption], "seed": self.seed + i}
        if self.output_size is not None:
            item["height"], item["width"] = self.output_size
        return item
