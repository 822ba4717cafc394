"""Config-to-object plumbing shared by every part of the project."""
from __future__ import annotations

import importlib
import sys
from typing import Any, Callable, Mapping


class ConfigError(ValueError):
    """A user-facing configuration problem; main.py prints it as one line."""


def get_obj_from_str(path: str) -> Any:
    """Import ``package.module.Name`` and return ``Name``."""
    if not isinstance(path, str) or "." not in path:
        raise ConfigError(f"target {path!r} is not an import path like 'package.module.Class'")
    module_name, attr = path.rsplit(".", 1)
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        # Only blame the target when the missing module is the target's own, not one of its imports.
        if err.name and module_name.startswith(err.name):
            raise ConfigError(f"target {path!r}: module {module_name!r} does not import ({err})") from err
        raise
    try:
        return getattr(module, attr)
    except AttributeError as err:
        raise ConfigError(f"target {path!r}: module {module_name!r} has no attribute {attr!r}") from err


def instantiate_from_config(config: Mapping | None, **extra: Any) -> Any:
    """Build ``target(**params, **extra)`` from a ``{target, params}`` mapping.

    The strings ``__is_first_stage__`` and ``__is_unconditional__`` are kept for CompVis compatibility
    and mean "no object".
    """
    if config is None or config in ("__is_first_stage__", "__is_unconditional__"):
        return None
    if "target" not in config:
        raise ConfigError(f"expected a 'target' key in config block with keys {sorted(config)}")
    params = dict(config.get("params") or {})
    params.update(extra)
    return get_obj_from_str(config["target"])(**params)


def count_params(module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def run_cli(action: Callable[..., Any], *args: Any) -> int:
    """A script's exit code for ``action(*args)``: 0, or 2 after one ``error:`` line when the user's input is wrong."""
    try:
        action(*args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
