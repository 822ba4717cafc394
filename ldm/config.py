"""Merging YAML configs and command-line overrides, refusing overrides that would be silently ignored."""
from __future__ import annotations

import difflib
import inspect
from pathlib import Path
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from ldm.callbacks import IMPLICIT_TARGETS
from ldm.util import ConfigError, get_obj_from_str

_MISSING = object()


def to_container(value: Any) -> Any:
    """OmegaConf's DictConfig/ListConfig as plain dicts and lists with every interpolation resolved (what classes
    built from a config expect: torchvision checks ``isinstance(size, (list, tuple))``); anything else as it is."""
    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    return value


def load_yaml(path: str | Path, seen: tuple | None = None) -> DictConfig:
    """A YAML config as a DictConfig, with its ``base`` files merged in; one-line errors for missing or bad files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, ValueError, OSError) as err:  # yaml.YAMLError subclasses ValueError? no: catch below
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from err
    except Exception as err:  # PyYAML's scanner/parser errors
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(cfg, DictConfig):
        raise ConfigError(f"config file {str(path)!r} must hold a mapping at the top level")
    return _with_bases(cfg, path, seen=(path.resolve(),) if seen is None else seen)


def _with_bases(cfg: DictConfig, path: Path, seen: tuple) -> DictConfig:
    """A top-level ``base: [file, ...]`` (paths relative to this file) is merged first, this file over it: how a
    recipe names the architecture it trains (``base: [architectures/sd-v1.yaml]``) without writing it out."""
    bases = cfg.pop("base", None)
    if bases is None:
        return cfg
    bases = [bases] if isinstance(bases, str) else list(bases)
    merged = OmegaConf.create()
    for name in bases:
        base = (path.parent / str(name)).resolve()
        if base in seen:
            raise ConfigError(f"config file {str(path)!r}: base {name!r} includes itself")
        later = load_yaml(base, seen=seen + (base,))
        _drop_retargeted(merged, later)
        merged = OmegaConf.merge(merged, later)
    _drop_retargeted(merged, cfg)
    return OmegaConf.merge(merged, cfg)


def _flat_keys(cfg, prefix: str = "") -> list[str]:
    keys = []
    if isinstance(cfg, DictConfig):
        for k in cfg.keys():
            full = f"{prefix}{k}"
            keys.append(full)
            node = cfg._get_node(k)
            if isinstance(node, DictConfig):
                keys += _flat_keys(node, full + ".")
    return keys


def _keywords_of_parent(cfg: DictConfig, key: str) -> tuple[list[str], bool]:
    """The keyword names the class behind ``key``'s block accepts (``<block>.params.<name>``, or Lightning's
    ``Trainer`` for ``lightning.trainer.<name>``), and whether it also takes ``**kwargs``."""
    parent, _, _ = key.rpartition(".")
    if parent == "lightning.trainer":
        import pytorch_lightning as pl

        return [n for n in inspect.signature(pl.Trainer.__init__).parameters if n != "self"], False
    block, _, last = parent.rpartition(".")
    if last != "params":
        return [], False
    target = OmegaConf.select(cfg, f"{block}.target" if block else "target", default=None) or IMPLICIT_TARGETS.get(block)
    if target is None:
        return [], False
    try:
        params = inspect.signature(get_obj_from_str(target)).parameters
    except (ConfigError, TypeError, ValueError):
        return [], False
    return list(params), any(p.kind is p.VAR_KEYWORD for p in params.values())


def apply_overrides(cfg: DictConfig, overrides: Iterable[str]) -> DictConfig:
    """Apply ``a.b.c=value`` overrides. An unknown key is refused with its close matches, unless it is a new
    keyword of the class its block builds, or the user marks it as a deliberate addition with ``+a.b.c=v``."""
    known = _flat_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, value = item.split("=", 1)
        add = key.startswith("+")
        key = key.lstrip("+")
        exists = OmegaConf.select(cfg, key, default=_MISSING) is not _MISSING
        keywords, any_keyword = _keywords_of_parent(cfg, key)
        if not (exists or add or any_keyword or key.rpartition(".")[2] in keywords):
            parent = key.rpartition(".")[0]
            candidates = list(dict.fromkeys(known + [f"{parent}.{k}" for k in keywords]))
            close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.75)
            hint = f"; did you mean {' or '.join(close)}?" if close else ""
            raise ConfigError(f"override {key!r} is not a key of the merged config{hint} "
                              f"(write '+{key}={value}' to add it deliberately)")
        OmegaConf.update(cfg, key, OmegaConf.from_dotlist([f"_v={value}"])._v, merge=True, force_add=True)
    return cfg


def _drop_retargeted(base: DictConfig, later: DictConfig) -> None:
    """Remove from ``base`` every block whose ``target`` ``later`` changes: the later block replaces it whole,
    since the old class's params mean nothing to the new class (a DreamBooth dataset over a digits dataset)."""
    for key, value in later.items_ex(resolve=False) if isinstance(later, DictConfig) else ():
        old = base.get(key) if isinstance(base, DictConfig) else None
        if not isinstance(value, DictConfig) or not isinstance(old, DictConfig):
            continue
        if "target" in value and "target" in old and old.target != value.target:
            base[key] = None
        else:
            _drop_retargeted(old, value)


def merge_configs(paths: Iterable[str | Path], overrides: Iterable[str] = ()) -> DictConfig:
    """Merge YAML files left to right, then apply overrides. A later file that gives a block another ``target``
    replaces that block instead of merging into it."""
    paths = list(paths)
    if not paths:
        raise ConfigError("no config given: pass one or more YAML files with --base")
    cfg = OmegaConf.create()
    for path in paths:
        later = load_yaml(path)
        _drop_retargeted(cfg, later)
        cfg = OmegaConf.merge(cfg, later)
    cfg = apply_overrides(cfg, overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(f"{', '.join(missing)}: required but not set ('???' in the config); "
                          f"add {missing[0]}=<value> to the command line")
    return cfg


def check_targets(cfg, where: str = "") -> None:
    """Import every ``target`` in the config up front, so a typo in a callback stops the run before a
    multi-gigabyte model has been loaded, with one line naming the key."""
    if isinstance(cfg, DictConfig):
        items = ((str(k), cfg._get_node(k)) for k in cfg.keys())
    else:
        return
    for key, node in items:
        path = f"{where}.{key}" if where else key
        if key == "target" and isinstance(node._value(), str):
            try:
                get_obj_from_str(node._value())
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from err
        else:
            check_targets(node, path)
