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
    by default the model's own. Items then carry it as ``height``/``width``. A list of sizes
    (``[[512, 512], [384, 640]]``, for a model trained with aspect-ratio buckets) samples every prompt at each, with
    the same seed, and the logger writes one grid per size.
    """

    def __init__(
        self,
        captions: Sequence[str] | None = None,
        caption_file: str | None = None,
        seed: int = 0,
        n_per_caption: int = 1,
        output_size: int | Sequence[int] | Sequence[Sequence[int]] | None = None,
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
        self.sizes = self._sizes(output_size)

    @staticmethod
    def _sizes(output_size) -> list[tuple[int, int]]:
        if output_size is None:
            return []
        many = not isinstance(output_size, int) and all(not isinstance(v, int) for v in output_size)
        sizes = []
        for value in output_size if many else [output_size]:
            size = [value] * 2 if isinstance(value, int) else [int(v) for v in value]
            if len(size) != 2 or min(size) < 8 or any(v % 8 for v in size):
                raise ConfigError(f"TextOnly: output_size must be a multiple of 8, [height, width] of them, or a list "
                                  f"of such sizes; got {output_size!r}")
            sizes.append(tuple(size))
        return sizes

    @property
    def output_size(self) -> tuple[int, int] | None:
        return self.sizes[0] if self.sizes else None

    def __len__(self) -> int:
        return len(self.captions) * self.n_per_caption * max(1, len(self.sizes))

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        k = max(1, len(self.sizes))
        prompt = i // k  # every size of a prompt shares its seed, so the sizes compare like for like
        item = {"caption": self.captions[prompt // self.n_per_caption], "seed": self.seed + prompt}
        if self.sizes:
            item["height"], item["width"] = self.sizes[i % k]
        return item
