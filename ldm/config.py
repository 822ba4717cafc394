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
    """Import every ``target`` in the config up front, then check the values each block gives it
    (:func:`check_values`), so a typo in a callback stops the run before a multi-gigabyte model has been loaded,
    with one line naming the key."""
    _import_targets(cfg, where)
    if not where:
        check_values(cfg)


def _import_targets(cfg, where: str = "") -> None:
    if isinstance(cfg, DictConfig):
        items = ((str(k), cfg._get_node(k)) for k in cfg.keys())
    else:
        return
    for key, node in items:
        path = f"{where}.{key}" if where else key
        if key == "target" and not isinstance(node, DictConfig):
            if not isinstance(node._value(), str):
                raise ConfigError(f"{path}: expected an import path like 'package.module.Class', got {node._value()!r}")
            try:
                get_obj_from_str(node._value())
            except ConfigError as err:
                raise ConfigError(f"{path}: {err}") from err
        else:
            _import_targets(node, path)


# ---- values against the signature of the class a block builds -------------------------------------------------
# A block's ``config`` mapping is the keyword arguments of a library class the target builds from it; checked
# against that class's signature too, since the library's own error would name neither the key nor the file.
CONFIG_CLASSES = {
    "ldm.models.denoiser.unet": "diffusers.UNet2DConditionModel",
    "ldm.models.first_stage.AutoencoderKLFirstStage": "diffusers.AutoencoderKL",
    "ldm.models.conditioners.CLIPTextConditioner": "transformers.CLIPTextConfig",
    "ldm.models.conditioners.CLIPImageConditioner": "transformers.CLIPVisionConfig",
}


# Counts, sizes and rates that no class here or in the libraries takes outside a range, by parameter name in any
# block (a class's own rules, such as DigitsDataset's size >= 8, stay in the class). Each is (lowest, highest).
RANGES = {
    "batch_size": (1, None), "val_batch_size": (1, None), "num_workers": (0, None), "timesteps": (1, None),
    "max_length": (3, None), "ema_decay": (0, 1), "weight_decay": (0, None), "ucg_rate": (0, 1),
    "threads": (1, None), "channels": (1, None), "every_n_epochs": (0, None), "every_n_train_steps": (0, None),
    "check_val_every_n_epoch": (1, None), "accumulate_grad_batches": (1, None), "base_learning_rate": (0, None),
    "linear_start": (0, 1), "linear_end": (0, 1),
}
# The library config keys that are sizes of tensors: 0 or less (or none) builds a network that cannot run.
SIZE_KEYS = {"sample_size", "in_channels", "out_channels", "latent_channels", "layers_per_block", "block_out_channels",
             "cross_attention_dim", "attention_head_dim", "norm_num_groups", "vocab_size", "hidden_size",
             "num_attention_heads", "max_position_embeddings", "intermediate_size", "image_size",
             "patch_size", "num_channels"}


def _check_range(value: Any, low: float | None, high: float | None, path: str) -> None:
    values = value if isinstance(value, (list, tuple)) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if (low is not None and v < low) or (high is not None and v > high):
            bounds = f"between {low} and {high}" if high is not None else f">= {low}"
            raise ConfigError(f"{path}: must be {bounds}, got {value!r}")


def _hints(obj) -> dict[str, Any]:
    """Resolved annotations of a class's ``__init__`` (a config dataclass's fields) or a function; {} if unreadable."""
    import typing

    import torch

    # A subclass passing **kwargs on (RunCheckpoint to ModelCheckpoint) takes its bases' keywords too.
    targets = [c.__init__ for c in obj.__mro__ if "__init__" in vars(c)] + [obj] if inspect.isclass(obj) else [obj]
    merged: dict[str, Any] = {}
    for target in targets:
        try:
            hints = typing.get_type_hints(target, localns={"torch": torch})
        except Exception:  # annotations naming what the module never imported: nothing to check by
            continue
        for key, hint in hints.items():
            merged.setdefault(key, hint)
    merged.pop("return", None)
    return merged


def _fits(value: Any, hint: Any) -> bool:
    """Whether a YAML value (None, bool, int, float, str, list, dict) can be what ``hint`` says; True for any hint
    this cannot judge (a class, a callable, a type variable)."""
    import collections.abc as abc
    import typing

    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any or isinstance(hint, typing.TypeVar):
        return True
    if hint is type(None):
        return value is None
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return any(_fits(value, a) for a in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    base = origin or hint
    if base in (list, tuple, abc.Sequence, abc.MutableSequence, set, frozenset):
        if not isinstance(value, (list, tuple)):
            return False
        items = [a for a in args if a is not Ellipsis]
        return not items or all(any(_fits(v, a) for a in items) for v in value)
    if base in (dict, abc.Mapping, abc.MutableMapping):
        return isinstance(value, dict)
    return True


def _hint_name(hint: Any) -> str:
    return hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")


def _check_required(params: dict, target: Any, path: str) -> None:
    """Keywords ``target`` cannot be built without (for model and data blocks: nothing else supplies them)."""
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return
    for name, p in signature.parameters.items():
        if name == "params" and path.endswith("optimizer_config.params"):
            continue  # an optimizer's first argument: the model hands it the weights to train (ldm.optim)
        if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in params:
            raise ConfigError(f"{path}.{name} is required by {getattr(target, '__name__', target)} and not set")


def _check_params(params: Any, target: Any, path: str, sizes: bool = False) -> None:
    """Each value of ``params`` (a block's params, or lightning.trainer) against ``target``'s annotations and
    :data:`RANGES` (``sizes``: a library config, where :data:`SIZE_KEYS` must be >= 1 and nothing negative)."""
    if not isinstance(params, dict):
        raise ConfigError(f"{path}: expected a mapping of keyword arguments, got {type(params).__name__} {params!r}")
    hints = _hints(target)
    for key, value in params.items():
        hint = hints.get(key)
        if hint is not None and not _fits(value, hint):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise ConfigError(f"{path}.{key}: expected {_hint_name(hint)}, got {type(value).__name__} {shown}")
        if key == "sampler" and isinstance(value, str):  # the image logger's and the eval callbacks' sampler
            from ldm.sampling import SAMPLERS

            if value not in SAMPLERS:
                raise ConfigError(f"{path}.{key}: unknown sampler {value!r}; choose one of {', '.join(SAMPLERS)}")
        if key in RANGES:
            _check_range(value, *RANGES[key], f"{path}.{key}")
        elif sizes and key in SIZE_KEYS and value is None:
            raise ConfigError(f"{path}.{key}: the network's size cannot be left unset (null)")
        elif sizes:
            _check_range(value, 1 if key in SIZE_KEYS else 0, None, f"{path}.{key}")


# Sections that must be mappings when present (``*``: any name); a list or a number there has no keys to read.
MAPPINGS = ("model", "model.params", "data", "data.params", "lightning", "lightning.trainer", "lightning.modelcheckpoint",
            "lightning.modelcheckpoint.params", "lightning.callbacks", "lightning.callbacks.*",
            "lightning.callbacks.*.params", "lightning.logger")


def _check_mappings(plain: dict) -> None:
    def nodes(node: Any, parts: list[str], path: str):
        if not parts:
            yield path, node
        elif isinstance(node, dict):
            keys = list(node) if parts[0] == "*" else [parts[0]] if parts[0] in node else []
            for key in keys:
                yield from nodes(node[key], parts[1:], f"{path}.{key}" if path else str(key))

    for pattern in MAPPINGS:
        for path, node in nodes(plain, pattern.split("."), ""):
            if node is not None and not isinstance(node, dict):
                raise ConfigError(f"{path}: expected a mapping (key: value lines), got {type(node).__name__} "
                                  f"{str(node)[:60]}")


def check_values(cfg: DictConfig) -> None:
    """Every block's params, ``lightning.trainer`` and the library ``config`` mappings against the annotations of
    what they build, so a string where a number belongs stops with one line naming the key, before anything is
    built. Only what annotations say is checked; ranges are each class's own business."""
    plain = to_container(cfg)
    _check_mappings(plain)

    def walk(node: Any, path: str) -> None:
        if isinstance(node, list):
            for i, item in enumerate(node):
                walk(item, f"{path}.{i}")
            return
        if not isinstance(node, dict):
            return
        target = node.get("target") if isinstance(node.get("target"), str) else IMPLICIT_TARGETS.get(path)
        if target is not None and (node.get("params") is not None or path.startswith(("model", "data"))):
            built = get_obj_from_str(target)
            _check_params(node.get("params") or {}, built, f"{path}.params")
            if path.startswith(("model", "data")) and isinstance(node.get("params") or {}, dict):
                _check_required(node.get("params") or {}, built, f"{path}.params")
            config = (node.get("params") or {}).get("config") if isinstance(node.get("params") or {}, dict) else None
            if isinstance(config, dict) and target in CONFIG_CLASSES:
                _check_params(config, get_obj_from_str(CONFIG_CLASSES[target]), f"{path}.params.config", sizes=True)
        for key, value in node.items():
            walk(value, f"{path}.{key}" if path else str(key))

    walk(plain, "")
    model = plain.get("model") or {}
    rate = model.get("base_learning_rate", 1e-4)
    if not _fits(rate, float):
        raise ConfigError(f"model.base_learning_rate: expected a number, got {type(rate).__name__} {rate!r}")
    _check_range(rate, *RANGES["base_learning_rate"], "model.base_learning_rate")
    trainer = (plain.get("lightning") or {}).get("trainer") if isinstance(plain.get("lightning"), dict) else None
    if trainer is not None:
        import pytorch_lightning as pl

        _check_params(trainer, pl.Trainer, "lightning.trainer")
