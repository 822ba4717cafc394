"""Tag shuffle and tag dropout for comma-separated captions (``"sks dog, grass, sunny, photo"``).

Trained on tags in one fixed order, a model ties meaning to position and learns every tag only together with
the others; shuffling all but the first tags (usually the subject or trigger word) and dropping a few each time
the caption is read teaches each tag on its own. The datasets build this from their ``caption_tags`` param with
``build_caption_transform``.
"""
from __future__ import annotations

import difflib
import inspect
import random
from typing import Callable

from ldm.util import ConfigError


class TagShuffle:
    """``caption -> caption``: the first ``keep_first`` tags stay in place and are never dropped; each other tag is
    dropped with probability ``dropout``, and what is left is shuffled (``shuffle``). Tags are split on
    ``separator``, stripped of whitespace (empty ones go) and joined with ``separator + " "``. A caption without
    the separator, or an empty one, comes back unchanged.

    Draws come from ``random.Random(seed)`` when a seed is given, else from Python's ``random``, which the
    DataLoader seeds differently in each worker (a seeded instance would repeat itself in every worker).
    Picklable, so it travels to spawned workers.
    """

    def __init__(self, keep_first: int = 1, shuffle: bool = True, dropout: float = 0.0, separator: str = ",",
                 seed: int | None = None):
        if isinstance(keep_first, bool) or not isinstance(keep_first, int) or keep_first < 0:
            raise ConfigError(f"caption_tags.keep_first: expected a whole number of tags >= 0, got {keep_first!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise ConfigError(f"caption_tags.dropout: expected a probability in [0, 1), got {dropout!r}")
        if not isinstance(separator, str) or not separator.strip():
            raise ConfigError(f"caption_tags.separator: expected a non-blank string such as ',', got {separator!r}")
        self.keep_first, self.shuffle, self.dropout = keep_first, bool(shuffle), float(dropout)
        self.separator = separator.strip()
        self.rng = random.Random(seed) if seed is not None else None

    def __call__(self, caption: str, rng: random.Random | None = None) -> str:
        if self.separator not in caption:
            return caption
        rng = rng or self.rng or random
        tags = [t for t in (tag.strip() for tag in caption.split(self.separator)) if t]
        kept, rest = tags[:self.keep_first], tags[self.keep_first:]
        if self.dropout:
            rest = [tag for tag in rest if rng.random() >= self.dropout]
        if self.shuffle:
            rng.shuffle(rest)
        return f"{self.separator} ".join(kept + rest)

    def __repr__(self) -> str:
        return (f"TagShuffle(keep_first={self.keep_first}, shuffle={self.shuffle}, dropout={self.dropout}, "
                f"separator={self.separator!r})")


def build_caption_transform(cfg: dict | Callable | None) -> Callable[[str], str] | None:
    """A dataset's ``caption_tags`` param as a callable: ``None`` → None (captions are used as written, which a
    text-embedding cache relies on); ``{keep_first, shuffle, dropout, separator, seed}`` → a ``TagShuffle``; a
    ``{target, params}`` block → that class; a callable → itself."""
    from ldm.config import to_container

    cfg = to_container(cfg)
    if cfg is None:
        return None
    if callable(cfg):
        return cfg
    if not isinstance(cfg, dict):
        raise ConfigError(f"caption_tags: expected a mapping such as {{keep_first: 1, shuffle: true, dropout: 0.1}}, "
                          f"got {cfg!r}")
    if "target" in cfg:
        from ldm.util import instantiate_from_config

        return instantiate_from_config(cfg)
    known = [name for name in inspect.signature(TagShuffle.__init__).parameters if name != "self"]
    for key in cfg:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"caption_tags.{key}: not a setting of TagShuffle ({', '.join(known)}){hint}")
    return TagShuffle(**cfg)
