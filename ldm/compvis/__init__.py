"""Configs written for CompVis/stable-diffusion and its fine-tuning fork (justinpinkney/stable-diffusion: the
Pokémon guide, image variations), run unchanged on this project's classes.

``translate(config)`` rewrites every section that names a CompVis class (``ldm.models.diffusion.ddpm.
LatentDiffusion``, ``main.DataModuleFromConfig``, ``ldm.data.simple.*``, ``main.ImageLogger``, ...) into this
project's blocks, one module per section (``model`` with ``networks``, ``data``, ``lightning``). Every CompVis key is
translated, listed as ignored (it changes nothing here), or refused with one line naming it. main.py applies it to
the merged config (``translate_for_run``); the sampling scripts to a ``--config`` YAML (``model_section_of``).
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from ldm.compvis.keys import Record

# Modules that exist only in CompVis's code base: a target under one of them marks a block to translate.
COMPVIS_MODULES = ("main.", "ldm.models.diffusion.ddpm.", "ldm.models.autoencoder.", "ldm.modules.",
                   "ldm.data.simple.", "ldm.data.laion.")
ORIGINAL_KEY = "original_config"  # SetupCallback's param that saves the config as written


def _targets(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "target" and isinstance(value, str):
                yield value
            else:
                yield from _targets(value)
    elif isinstance(node, list):
        for value in node:
            yield from _targets(value)


def _names_compvis(node: Any) -> bool:
    return any(t.startswith(COMPVIS_MODULES) for t in _targets(node))


def _lightning_is_compvis(section: Any) -> bool:
    if not isinstance(section, dict):
        return False
    trainer = section.get("trainer") or {}
    return _names_compvis(section) or "find_unused_parameters" in section or "find_unused_parameters" in trainer


def _plain(config: Any) -> dict:
    from ldm.config import to_container

    return copy.deepcopy(to_container(config)) if config is not None else {}


def is_compvis(config: Any) -> bool:
    """Whether any section of ``config`` is written for CompVis's code."""
    config = _plain(config)
    return _names_compvis(config.get("model")) or _names_compvis(config.get("data")) or \
        _lightning_is_compvis(config.get("lightning"))


@dataclass
class Translation:
    config: dict  # the config in this project's terms
    original: dict  # as written (merged, overrides applied)
    record: Record

    def lines(self) -> list[str]:
        return self.record.lines()


def _model_facts(model: dict) -> tuple[str, int]:
    """The conditioner's kind and the schedule length of a model section in this project's terms."""
    params = model.get("params") or {}
    cond = (params.get("cond_stage_config") or {}).get("target", "")
    return ("image" if cond.endswith("CLIPImageConditioner") else "text"), int(params.get("timesteps", 1000))


def translate(config: Any, weights_given: bool = False, logdir: str | os.PathLike | None = None) -> Translation:
    """``config`` (a DictConfig or dict) with its CompVis sections in this project's terms.

    ``weights_given``: the weights come from elsewhere (``--finetune_from``, ``-r``, ``--ckpt``), so a block's
    ``ckpt_path`` is not read and need not exist. ``logdir``: the run dir, for callbacks that write into it.
    """
    from ldm.compvis.data import translate_data
    from ldm.compvis.lightning import translate_lightning
    from ldm.compvis.model import translate_model

    original = _plain(config)
    cfg, record, model_keys = copy.deepcopy(original), Record(), None
    if _names_compvis(cfg.get("model")):
        cfg["model"], model_keys = translate_model(cfg["model"], record, weights_given)
    if _names_compvis(cfg.get("data")):
        cfg["data"] = translate_data(cfg["data"], record, model_keys)
    if _lightning_is_compvis(cfg.get("lightning")):
        kind, timesteps = _model_facts(cfg.get("model") or {})
        cfg["lightning"], model_params = translate_lightning(cfg["lightning"], record, kind, timesteps,
                                                             str(logdir) if logdir is not None else None)
        if model_params and isinstance(cfg.get("model"), dict):
            cfg["model"].setdefault("params", {}).update(model_params)
    return Translation(cfg, original, record)


def translate_for_run(config, weights_given: bool, logdir: str | os.PathLike):
    """main.py's step after merging: a CompVis config comes back translated (as a DictConfig), with one printed line
    per translated block and one listing the ignored keys, and the original handed to SetupCallback, which saves it
    as ``configs/compvis/<now>-original.yaml`` in the run dir. Any other config comes back as it is."""
    if not is_compvis(config):
        return config
    from omegaconf import OmegaConf

    done = translate(config, weights_given, logdir)
    if os.environ.get("LOCAL_RANK", "0") == "0":  # DDP workers re-run main.py: the first process prints
        print("\n".join(done.lines()))
    callbacks = done.config.setdefault("lightning", {}).setdefault("callbacks", {})
    setup = callbacks.setdefault("setup_callback", {})
    # As YAML text: a nested copy would have its CompVis targets imported by check_targets and merged by OmegaConf.
    setup.setdefault("params", {})[ORIGINAL_KEY] = OmegaConf.to_yaml(OmegaConf.create(done.original))
    return OmegaConf.create(done.config)


def model_section_of(path: str | os.PathLike) -> tuple[dict | None, Translation | None]:
    """For ``--config`` of the sampling scripts: a YAML whose model section is CompVis's → (that section
    translated, the translation); any other file → (None, None), to be read as before."""
    from ldm.config import load_yaml

    path = Path(path)
    if path.is_dir() or path.suffix not in (".yaml", ".yml") or not path.is_file():
        return None, None
    cfg = _plain(load_yaml(path))
    if not _names_compvis(cfg.get("model")):
        return None, None
    done = translate({"model": cfg["model"]}, weights_given=True)
    return done.config["model"], done
