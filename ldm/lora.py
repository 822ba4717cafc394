"""LoRA through peft, in diffusers' conventions, so adapters trained here load anywhere diffusers does.

Training: ``model.params.lora: {rank: 4, alpha: 4}`` in a config calls :func:`add_lora`, which freezes the
UNet (and optionally the text encoder) and adds rank-``rank`` adapters to the attention projections; only
they train, so checkpoints, optimizer state and EMA shrink to the adapters.

Files: :func:`save_lora` writes ``pytorch_lora_weights.safetensors`` exactly as diffusers' LoRA training scripts
do (``convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))`` + ``save_lora_weights`` with the peft
config as metadata), so ``StableDiffusionPipeline.load_lora_weights`` reads it, alpha included.
:func:`load_lora` puts such a file on a LatentDiffusion for sampling at a chosen scale and :func:`merge_lora`
folds it into the weights. The :class:`SaveLora` callback writes the file during and after training.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities import rank_zero_only

from ldm.util import ConfigError

log = logging.getLogger(__name__)

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
ADAPTER = "default"  # peft's name for the one adapter that training adds


def _config(rank: int, alpha: float | None, targets: Sequence[str], dropout: float):
    from peft import LoraConfig

    # Gaussian A and zero B: the adapter starts as the identity, so step 0 samples are the base model's.
    return LoraConfig(r=int(rank), lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                      init_lora_weights="gaussian", target_modules=list(targets))


def add_lora(model, rank: int = 4, alpha: float | None = None, target_modules: Sequence[str] = UNET_TARGETS,
             dropout: float = 0.0, text_encoder: bool = False,
             text_encoder_target_modules: Sequence[str] = TEXT_ENCODER_TARGETS) -> list[str]:
    """Freeze ``model.unet`` and add LoRA adapters to it (and to the text encoder with ``text_encoder``).

    ``alpha`` defaults to ``rank`` (scale 1). Returns the UNet's trainable parameter names (the adapters).
    """
    model.unet.requires_grad_(False)
    model.unet.add_adapter(_config(rank, alpha, target_modules, dropout))
    cond = model.cond_stage_model
    if getattr(cond, "trainable", False):
        # A fully trained text encoder would not be in the adapter file: its changes would be lost on export.
        log.warning("lora: the conditioner's trainable: true is ignored; only adapters train "
                    "(lora.text_encoder: true adds adapters to the text encoder)")
        cond.set_trainable(False)
    if text_encoder:
        modules = cond.lora_modules()
        if not modules:
            raise ConfigError(f"lora.text_encoder: true, but the conditioner {cond.description()} has no network "
                              "LoRA can adapt; set lora.text_encoder: false (the UNet's adapters still train)")
        for module in modules.values():
            module.add_adapter(_config(rank, alpha, text_encoder_target_modules, dropout))
        cond.trainable = True  # the conditioner then runs with gradients (only the adapters have them)
    return [n for n, p in model.unet.named_parameters() if p.requires_grad]


def _adapter_state(module) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(module)
    named = convert_state_dict_to_diffusers(state)
    # diffusers' older names ("to_q.lora.down") exist only for attention projections. Adapters on other layers keep
    # peft's names ("lora_A"), and loaders pick one format from the first key: a mixed file would silently lose
    # half its adapters, so then peft's names are used throughout.
    if any(".lora_A." in k or ".lora_B." in k for k in named):
        named = state
    return {k: v.detach().clone().contiguous() for k, v in named.items()}


def has_lora(module) -> bool:
    return bool(getattr(module, "peft_config", None))


def save_lora(model, path: str | Path) -> Path:
    """Write the model's adapters (EMA weights when sampling uses them) to the ``.safetensors`` file ``path``."""
    from diffusers import StableDiffusionPipeline

    path = Path(path)
    adapted = {prefix: m for prefix, m in model.cond_stage_model.lora_modules().items() if has_lora(m)}
    if set(adapted) - {"text_encoder"}:
        raise ConfigError(f"save_lora: adapters on {sorted(adapted)}; this file format holds the UNet and one "
                          "text encoder")
    text_encoder = adapted.get("text_encoder")
    with model.ema_scope():
        unet_layers = _adapter_state(model.unet)
        te_layers = _adapter_state(text_encoder) if text_encoder is not None else None
    meta = {"unet_lora_adapter_metadata": model.unet.peft_config[ADAPTER].to_dict()}
    if te_layers:
        meta["text_encoder_lora_adapter_metadata"] = text_encoder.peft_config[ADAPTER].to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    StableDiffusionPipeline.save_lora_weights(str(path.parent), unet_lora_layers=unet_layers,
                                              text_encoder_lora_layers=te_layers, weight_name=path.name,
                                              safe_serialization=True, **meta)
    return path


def load_lora(model, path: str | Path, scale: float = 1.0, adapter_name: str = "lora") -> None:
    """Add the adapters in ``path`` (a diffusers LoRA file) to a LatentDiffusion, active at ``scale``."""
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    state, alphas, meta = StableDiffusionPipeline.lora_state_dict(str(path), return_lora_metadata=True)
    StableDiffusionPipeline.load_lora_into_unet(state, alphas, model.unet, adapter_name=adapter_name, metadata=meta)
    model.unet.set_adapters([adapter_name], weights=[scale])
    if any(k.startswith("text_encoder.") for k in state):
        text_encoder = model.cond_stage_model.lora_modules().get("text_encoder")
        if text_encoder is None:
            raise ConfigError(f"{str(path)!r} holds text-encoder adapters, but this model's conditioner "
                              f"({model.cond_stage_model.description()}) has no text encoder")
        StableDiffusionPipeline.load_lora_into_text_encoder(state, alphas, text_encoder, prefix="text_encoder",
                                                            adapter_name=adapter_name, metadata=meta)
        set_adapters_for_text_encoder([adapter_name], text_encoder, [scale])


def merge_lora(model) -> None:
    """Fold the adapters into the base weights at their current scale (``load_lora``'s ``scale``; 1.0 after
    training) and remove them: plain weights remain, giving the same outputs."""
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora

    model.unet.fuse_lora(lora_scale=1.0)  # on top of the adapter's own weight: 1.0 keeps it as set
    model.unet.unload_lora()
    for module in model.cond_stage_model.lora_modules().values():
        if has_lora(module):
            fuse_text_encoder_lora(module, lora_scale=1.0)
            _remove_text_encoder_monkey_patch(module)


class SaveLora(pl.Callback):
    """Write ``<run dir>/lora/<weight_name>`` every ``every_n_train_steps`` steps (0: never) and at the end."""

    def __init__(self, every_n_train_steps: int = 0, weight_name: str = "pytorch_lora_weights.safetensors",
                 dirpath: str | None = None):
        super().__init__()
        self.every, self.weight_name, self.dirpath = every_n_train_steps, weight_name, dirpath

    @rank_zero_only
    def _save(self, trainer, pl_module) -> None:
        if has_lora(pl_module.unet):
            save_lora(pl_module, Path(self.dirpath or Path(trainer.default_root_dir) / "lora") / self.weight_name)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module)
