"""The optimizer from ``model.params.optimizer_config``, a ``{target, params}`` block; the learning rate is always the
model's (``base_learning_rate``, scaled by main.py), so ``params`` never holds ``lr``.

Any ``torch.optim`` class works, and so do ``transformers.optimization.Adafactor``, ``prodigyopt.Prodigy`` and
``bitsandbytes.optim.AdamW8bit`` (CUDA only). Without a block the optimizer is AdamW, fused into one kernel when every
parameter is a CUDA float tensor and ``foreach`` (one call over all tensors) otherwise.
"""
from __future__ import annotations

import difflib
import importlib.util
import inspect
import logging
from typing import Iterable, Sequence

import torch

from ldm.util import ConfigError, get_obj_from_str

log = logging.getLogger(__name__)
WHERE = "model.params.optimizer_config"
EXTRA_TARGETS = ("transformers.optimization.Adafactor", "prodigyopt.Prodigy", "bitsandbytes.optim.AdamW8bit")


def default_optimizer_config(weight_decay: float, betas: Sequence[float], eps: float) -> dict:
    """Today's optimizer: AdamW with the model's ``weight_decay``, ``adam_betas`` and ``adam_eps``."""
    return {"target": "torch.optim.AdamW",
            "params": {"weight_decay": weight_decay, "betas": tuple(betas), "eps": eps}}


def known_targets() -> list[str]:
    torch_classes = [f"torch.optim.{name}" for name, obj in vars(torch.optim).items()
                     if inspect.isclass(obj) and issubclass(obj, torch.optim.Optimizer) and obj is not torch.optim.Optimizer]
    return sorted(torch_classes) + list(EXTRA_TARGETS)


def optimizer_class(target: str) -> type:
    """The class ``target`` names, or one line saying why it cannot be had (with the closest known names)."""
    if target.startswith("bitsandbytes."):
        _check_bitsandbytes(target)
    try:
        return get_obj_from_str(target)
    except (ConfigError, ModuleNotFoundError) as err:
        close = difflib.get_close_matches(target, known_targets(), n=2, cutoff=0.6)
        hint = f"; did you mean {' or '.join(close)}?" if close and "did you mean" not in str(err) else ""
        raise ConfigError(f"{WHERE}.target: {err}{hint}") from err


def _check_bitsandbytes(target: str) -> None:
    if not torch.cuda.is_available():
        raise ConfigError(f"{WHERE}.target: {target} runs on CUDA only and this machine has no CUDA device; "
                          f"use torch.optim.AdamW or transformers.optimization.Adafactor here")
    if importlib.util.find_spec("bitsandbytes") is None:
        raise ConfigError(f"{WHERE}.target: {target} needs the bitsandbytes package, which is not installed "
                          f"(pip install bitsandbytes)")


def build_optimizer(params: Iterable[torch.nn.Parameter], lr: float, config: dict) -> torch.optim.Optimizer:
    """``config['target'](params, lr=lr, **config['params'])``, checked: unknown keys and ``lr`` are refused with one
    line, Adafactor is told to use ``lr``, and Prodigy warns when ``lr`` is far from the 1.0 it expects."""
    params = list(params)
    if not isinstance(config, dict) or "target" not in config:
        raise ConfigError(f"{WHERE}: expected a {{target, params}} block, got {config!r}")
    target, kwargs = config["target"], dict(config.get("params") or {})
    if "lr" in kwargs:
        raise ConfigError(f"{WHERE}.params.lr: the learning rate is model.base_learning_rate (scaled by main.py "
                          f"with --scale_lr); remove lr here")
    cls = optimizer_class(target)
    accepted = inspect.signature(cls.__init__).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in accepted.values()):
        for key in kwargs:
            if key not in accepted or key in ("self", "params"):
                close = difflib.get_close_matches(key, [k for k in accepted if k not in ("self", "params")], n=2)
                hint = f"; did you mean {' or '.join(close)}?" if close else ""
                raise ConfigError(f"{WHERE}.params.{key}: not a setting of {target}{hint}")
    if target.startswith("bitsandbytes.") and not all(p.is_cuda for p in params):
        raise ConfigError(f"{WHERE}.target: {target} runs on CUDA only; the parameters are on "
                          f"{sorted({str(p.device) for p in params})[0]} (train with --gpus)")
    origin = (cls.__module__.split(".")[0], cls.__name__)
    if origin == ("transformers", "Adafactor"):
        _adafactor_uses_lr(kwargs)
    if origin == ("prodigyopt", "Prodigy") and not 0.5 <= lr <= 2.0:
        log.warning("Prodigy estimates the step size itself and expects lr 1.0 (model.base_learning_rate: 1.0 "
                    "without --scale_lr); lr %.3g scales its estimate by that factor", lr)
    kwargs.update(_kernel_choice(cls, params, kwargs, accepted))
    return cls(params, lr=lr, **kwargs)


def _adafactor_uses_lr(kwargs: dict) -> None:
    """transformers' Adafactor defaults to its own relative-step schedule; here it takes the model's lr."""
    if kwargs.get("relative_step") or kwargs.get("warmup_init"):
        key = "relative_step" if kwargs.get("relative_step") else "warmup_init"
        raise ConfigError(f"{WHERE}.params.{key}: true makes Adafactor ignore the model's learning rate; "
                          f"this project always passes model.base_learning_rate, so leave {key} false")
    kwargs.setdefault("relative_step", False)
    kwargs.setdefault("scale_parameter", False)
    kwargs.setdefault("warmup_init", False)


def _kernel_choice(cls: type, params: list, kwargs: dict, accepted) -> dict:
    """Adam(W)'s fused kernel where it is supported (CUDA float parameters), else ``foreach``; a setting the config
    gives wins. On the CPU ``foreach`` gives the same numbers as torch's default loop, only faster."""
    if not issubclass(cls, (torch.optim.Adam, torch.optim.AdamW)):
        return {}
    if "fused" in kwargs or "foreach" in kwargs or not {"fused", "foreach"} <= set(accepted):
        return {}
    fused = bool(params) and all(p.is_cuda and p.is_floating_point() for p in params)
    return {"fused": True} if fused else {"foreach": True}
