"""Turn a YAML list of torchvision transforms into the PIL -> [-1, 1] tensor pipeline the model expects."""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

from ldm.config import to_container
from ldm.util import ConfigError, get_obj_from_str

# CompVis configs write PIL's integer filter codes (``interpolation: 3``); torchvision now wants the enum.
_PIL_CODES = {
    0: InterpolationMode.NEAREST,
    1: InterpolationMode.LANCZOS,
    2: InterpolationMode.BILINEAR,
    3: InterpolationMode.BICUBIC,
    4: InterpolationMode.BOX,
    5: InterpolationMode.HAMMING,
}


def _interpolation(target: str, value: Any) -> InterpolationMode:
    if isinstance(value, InterpolationMode):
        return value
    if isinstance(value, int) and value in _PIL_CODES:
        return _PIL_CODES[value]
    if isinstance(value, str) and value.lower() in {m.value for m in InterpolationMode}:
        return InterpolationMode(value.lower())
    raise ConfigError(
        f"transform {target!r}: interpolation {value!r} is not one of PIL codes {sorted(_PIL_CODES)} "
        f"or names {[m.value for m in InterpolationMode]}"
    )


class ToMinusOneOne:
    """Map ToTensor's [0, 1] to the [-1, 1] range the autoencoder was trained on (a class so it pickles)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0 - 1.0

    def __repr__(self) -> str:
        return "ToMinusOneOne()"


def _build_one(cfg: Any) -> Callable:
    cfg = to_container(cfg)
    if not isinstance(cfg, dict) or "target" not in cfg:
        raise ConfigError(f"each image_transforms entry needs a 'target' (and optional 'params'), got {cfg!r}")
    target = cfg["target"]
    params = dict(cfg.get("params") or {})
    if "interpolation" in params:
        params["interpolation"] = _interpolation(target, params["interpolation"])
    cls = get_obj_from_str(target)
    try:
        return cls(**params)
    except (TypeError, ValueError) as err:
        raise ConfigError(f"transform {target!r} with params {params} failed: {err}".replace("\n", " ")) from err


def build_transforms(cfgs: Iterable[Any] | None) -> Callable[[Image.Image], torch.Tensor]:
    """PIL transforms from ``cfgs`` in order, then ToTensor and [-1, 1] scaling: output is float (3, H, W)."""
    steps = [_build_one(c) for c in to_container(cfgs) or []]
    return T.Compose([*steps, T.ToTensor(), ToMinusOneOne()])
