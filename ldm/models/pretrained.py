"""Build a diffusers/transformers network from YAML params, or load it from a local pretrained folder.

The YAML keeps the architecture readable in one place; a pretrained folder (the layout
``StableDiffusionPipeline.save_pretrained`` writes) supplies weights. When both are given, the folder's
config must agree with the YAML on every key the YAML names, so a wrong folder fails with one line.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from ldm.util import ConfigError


def _check_folder(folder: str, subfolder: str | None) -> Path:
    root = Path(folder)
    if not root.exists():
        raise ConfigError(f"pretrained folder {folder!r} does not exist (see models/README.md for where weights go)")
    path = root / subfolder if subfolder else root
    if not (path / "config.json").exists():
        found = sorted(p.name for p in root.iterdir())[:12]
        raise ConfigError(f"pretrained folder {folder!r} has no {subfolder or '.'}/config.json; found {found}")
    return path


def _compare(cls_name: str, yaml_cfg: Mapping[str, Any], loaded: Mapping[str, Any], where: str) -> None:
    for key, want in yaml_cfg.items():
        have = loaded.get(key, "<missing>")
        if isinstance(have, (list, tuple)) and isinstance(want, (list, tuple)):
            have, want = list(have), list(want)
        if have != want:
            raise ConfigError(f"{cls_name} in {where}: config key {key!r} is {have!r} there but {want!r} in the YAML")


def build_or_load(cls, config: Mapping[str, Any] | None, pretrained: str | None, subfolder: str | None,
                  config_class=None):
    """Return ``cls`` built from ``config`` or loaded from ``pretrained/subfolder`` (weights included)."""
    config = dict(config or {})
    if pretrained is None:
        if not config:
            raise ConfigError(f"{cls.__name__}: give either 'config' (architecture) or 'pretrained' (a local folder)")
        return cls(config_class(**config)) if config_class is not None else cls(**config)
    path = _check_folder(os.fspath(pretrained), subfolder)
    module = cls.from_pretrained(str(Path(pretrained)), subfolder=subfolder) if subfolder else cls.from_pretrained(str(path))
    loaded = module.config.to_dict() if hasattr(module.config, "to_dict") else dict(module.config)
    _compare(cls.__name__, config, loaded, str(path))
    return module
