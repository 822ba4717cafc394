"""Choose which denoiser parameters train: all of them, only cross-attention, or names matching patterns."""
from __future__ import annotations

import fnmatch
from typing import Iterable

from torch import nn

from ldm.util import ConfigError

PRESETS = {
    "all": ["*"],
    # diffusers names the cross-attention block of every transformer layer ``attn2``.
    "attn2": ["*attn2.*"],
    "cross_attention": ["*attn2.*"],
}


def select_trainable(model: nn.Module, spec: str | Iterable[str] = "all") -> list[str]:
    """Freeze every parameter of ``model`` but those matching ``spec``; return the trained names.

    ``spec`` is a preset (``all``, ``attn2``/``cross_attention``) or a list of glob patterns over parameter
    names, e.g. ``["*attn2.to_k*", "*attn2.to_v*"]``. Frozen parameters get no gradient and, since the
    optimizer is built from trainable parameters only, no optimizer state.
    """
    if isinstance(spec, str):
        if spec not in PRESETS:
            raise ConfigError(f"trainable: unknown preset {spec!r}; use one of {sorted(PRESETS)} or a list of name patterns")
        patterns = PRESETS[spec]
    else:
        patterns = list(spec)
    names = []
    for name, param in model.named_parameters():
        keep = any(fnmatch.fnmatchcase(name, pat) for pat in patterns)
        param.requires_grad_(keep)
        if keep:
            names.append(name)
    if not names:
        raise ConfigError(f"trainable: patterns {patterns} match no parameter of {type(model).__name__}")
    return names
