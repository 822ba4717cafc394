"""LoRA through peft, saved in the layouts ComfyUI, AUTOMATIC1111, InvokeAI, stable-diffusion.cpp and diffusers read.

Training: ``model.params.lora: {rank: 4, alpha: 4}`` in a config calls :func:`add_lora`, which freezes the
UNet (and optionally the text encoder) and adds rank-``rank`` adapters to the attention projections; only
they train, so checkpoints, optimizer state and EMA shrink to the adapters.

Files (layouts in ``ldm.lora_files``): :func:`save_lora` writes one file in the kohya / A1111 layout (ComfyUI,
AUTOMATIC1111, InvokeAI, stable-diffusion.cpp, diffusers) or the diffusers one (``pipe.load_lora_weights``), then
reads it back through diffusers' loader and prints how many of its tensors applied (``ldm.lora_check``);
:func:`save_lora_files` writes both. :func:`load_lora` puts a file of either layout (ours or downloaded) on a
LatentDiffusion for sampling at a chosen scale and :func:`merge_lora` folds it into the weights. The
:class:`SaveLora` callback writes both files during and after training.
"""
from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Sequence

import pytorch_lightning as pl
from pytorch_lightning.utilities import rank_zero_only

from ldm.util import ConfigError

log = logging.getLogger(__name__)

UNET_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
DIFFUSERS_NAME = "pytorch_lora_weights.safetensors"  # diffusers' file name, what load_lora_weights(folder) reads


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


def has_lora(module) -> bool:
    return bool(getattr(module, "peft_config", None))


def lora_adapters(model) -> list:
    """The model's trained adapters (EMA weights when sampling uses them), as ``ldm.lora_files.Adapter``s."""
    from ldm.lora_files import adapter_of

    adapted = {prefix: m for prefix, m in model.cond_stage_model.lora_modules().items() if has_lora(m)}
    if set(adapted) - {"text_encoder", "text_encoder_2"}:
        raise ConfigError(f"save_lora: adapters on {sorted(adapted)}; these file layouts hold the UNet and the "
                          "text encoders (text_encoder, and SDXL's text_encoder_2)")
    with model.ema_scope():
        return [adapter_of("unet", model.unet)] + [adapter_of(p, m) for p, m in adapted.items()]


def save_lora(model, path: str | Path, layout: str = "kohya", check: bool = True, adapters: list | None = None) -> Path:
    """Write the model's adapters (EMA weights when sampling uses them) to the ``.safetensors`` file ``path`` in the
    ``kohya`` layout (ComfyUI, A1111, InvokeAI, stable-diffusion.cpp, diffusers) or the ``diffusers`` one
    (``pipe.load_lora_weights``); ``check`` reads it back through diffusers and prints how much of it applied."""
    from ldm.lora_files import diffusers_layout, is_sdxl, kohya_layout, kohya_metadata
    from ldm.weights.files import write_safetensors

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ConfigError(f"LoRA file {str(path)!r}: the name must end in .safetensors")
    adapters = adapters or lora_adapters(model)
    if layout == "kohya":
        tensors, meta = kohya_layout(adapters, kohya_metadata(model, adapters, title=path.stem), is_sdxl(model))
    elif layout == "diffusers":
        tensors, meta = diffusers_layout(adapters)
    else:
        raise ConfigError(f"save_lora: layout {layout!r}; expected 'kohya' or 'diffusers'")
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(path, tensors, meta)
    if check:
        from ldm.lora_check import check_lora_file

        check_lora_file(model, path)
    return path


def save_lora_files(model, folder: str | Path, name: str, check: bool = True) -> dict[str, Path]:
    """Both layouts into ``folder``: ``<name>.safetensors`` (kohya, the file to hand around) and diffusers'
    ``pytorch_lora_weights.safetensors`` (the name ``load_lora_weights(folder)`` looks for)."""
    adapters = lora_adapters(model)
    folder = Path(folder)
    if name == Path(DIFFUSERS_NAME).stem:
        raise ConfigError(f"LoRA name {name!r} is the diffusers file's own name; choose another")
    return {"kohya": save_lora(model, folder / f"{name}.safetensors", "kohya", check, adapters),
            "diffusers": save_lora(model, folder / DIFFUSERS_NAME, "diffusers", check, adapters)}


def load_lora(model, path: str | Path, scale: float = 1.0, adapter_name: str = "lora") -> None:
    """Add the adapters in ``path`` (a LoRA file in the kohya or diffusers layout: ours, or one downloaded) to a
    LatentDiffusion, active at ``scale``."""
    from diffusers.loaders.lora_base import set_adapters_for_text_encoder

    from ldm.lora_files import for_another_model, is_sdxl, lora_pipeline, read_lora
    from ldm.weights.load import model_description

    pipeline = lora_pipeline(is_sdxl(model))
    state, alphas, meta = read_lora(path, unet_config=model.unet.config, sdxl=is_sdxl(model))
    if not any(k.startswith("unet.") for k in state):
        raise ConfigError(f"{str(path)!r} holds no UNet adapters (keys like {next(iter(state), '-')!r}); "
                          "expected a Stable Diffusion LoRA")
    try:
        pipeline.load_lora_into_unet(state, alphas, model.unet, adapter_name=adapter_name, metadata=meta)
    except RuntimeError as err:  # torch's load_state_dict: adapters shaped for another model's layers
        raise for_another_model(err, path, f"{model_description(model)} here") from None
    model.unet.set_adapters([adapter_name], weights=[scale])
    for prefix in ("text_encoder", "text_encoder_2"):
        if not any(k.startswith(prefix + ".") for k in state):
            continue
        text_encoder = model.cond_stage_model.lora_modules().get(prefix)
        if text_encoder is None:
            raise ConfigError(f"{str(path)!r} holds adapters for {prefix}, but this model's conditioner "
                              f"({model.cond_stage_model.description()}) has no such text encoder")
        pipeline.load_lora_into_text_encoder(state, alphas, text_encoder, prefix=prefix, adapter_name=adapter_name,
                                             metadata=meta)
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


def run_name(run: Path) -> str:
    """``logs/2024-05-01T12-00-00_sks-dog`` → ``sks-dog`` (``lora`` when the run dir has no name of its own)."""
    return re.sub(r"^\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d_?", "", Path(run).name) or "lora"


class SaveLora(pl.Callback):
    """Write the adapter in both layouts into ``<run dir>/lora/`` every ``every_n_train_steps`` steps (0: never) and
    at the end: ``<name>.safetensors`` (kohya layout; ``name`` defaults to the run's name, the run dir without its
    timestamp) and ``pytorch_lora_weights.safetensors`` (diffusers layout), each checked through diffusers' loader."""

    def __init__(self, every_n_train_steps: int = 0, name: str | None = None, dirpath: str | None = None):
        super().__init__()
        self.every, self.name, self.dirpath = every_n_train_steps, name, dirpath

    @rank_zero_only
    def _save(self, trainer, pl_module) -> None:
        if has_lora(pl_module.unet):
            run = Path(trainer.default_root_dir)
            save_lora_files(pl_module, Path(self.dirpath or run / "lora"), self.name or run_name(run))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step
        if self.every > 0 and step > 0 and step % self.every == 0:
            self._save(trainer, pl_module)

    def on_train_end(self, trainer, pl_module):
        self._save(trainer, pl_module)
