"""Slim exports of a trained model: a diffusers pipeline folder and an original-layout single file.

Both hold weights only (no optimizer state, no second UNet), EMA or raw as chosen, fp32 or fp16, and
record where they came from (config, step, EMA choice) in safetensors metadata and ``sd_finetune.json``.
A training checkpoint is read through a memory map and its tensors written one at a time, so exporting a
14 GB SD v1 checkpoint needs little RAM; other sources (folders, original files) are loaded as a model first.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.util import ConfigError, instantiate_from_config
from ldm.weights.files import write_safetensors
from ldm.weights.load import _ema_onto_unet, for_inference, load_model
from ldm.weights.original import project_to_original
from ldm.weights.source import CONFIG_KEY, open_weights

INFO_FILE = "sd_finetune.json"


@dataclass
class Exportable:
    """What an export needs: tensors under this project's keys, a model (possibly on the meta device) for the
    component configs and tokenizer, and the provenance to record."""
    state: dict[str, torch.Tensor]
    model: torch.nn.Module
    info: dict
    lora: list | None = None  # a LoRA run's adapters (ldm.lora_files.Adapter), taken before they were merged

    def metadata(self) -> dict[str, str]:
        meta = {f"sd_finetune.{k}": str(v) for k, v in self.info.items() if k != "config"}
        meta[CONFIG_KEY] = json.dumps(self.info["config"])
        return meta


def prepare(path: str | Path, ema: bool | None = None, config=None) -> Exportable:
    """Read ``path`` (run dir, training ckpt, diffusers folder, original file); ``ema=None`` means EMA when present."""
    src = open_weights(path)
    has_ema = any(k.startswith("model_ema.") for k in src.state)
    if ema and not has_ema:
        raise ConfigError(f"--ema: {str(src.path)!r} ({src.description}) holds no EMA weights (model_ema.*); "
                          "export with --no-ema")
    use_ema = has_ema if ema is None else ema
    lora = None
    if src.kind == "training" and config is None and (src.config.get("params") or {}).get("lora"):
        # A LoRA run: exports hold base and adapter folded together (what the run samples), as a plain model.
        from ldm.lora import lora_adapters, merge_lora

        model = load_model(src.path, ema=use_ema)
        lora = lora_adapters(model)
        merge_lora(model)
        section, state, n_ema = model.weights_config, model.state_dict(), int(model.weights_ema)
        section = {**section, "params": {k: v for k, v in section["params"].items() if k != "lora"}}
    elif src.kind == "training" and config is None:
        section = src.config
        with torch.device("meta"):  # configs, tokenizer and schedule only: no memory, no initialisation
            model = instantiate_from_config(for_inference(section))
        state, n_ema = _ema_onto_unet(src.state, use_ema)
        state = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    else:
        # Folders and original files: EMA when asked or (ema=None) when the file has a CompVis EMA copy.
        model = load_model(src.path, config=config, ema=ema is not False)
        section, state, n_ema = model.weights_config, model.state_dict(), int(model.weights_ema)
    # The sampler settings travel with the weights, resolved, so every export samples as the model did.
    section = {**section, "params": {**section.get("params", {}), "sampler_config": dict(model.sampler_config)}}
    info = {"source": str(src.path), "kind": src.kind, "step": src.step if src.step is not None else "",
            "ema": str(n_ema > 0).lower(), "config": section}
    return Exportable(state, model, info, lora)


def export_single_file(item: Exportable, out: str | Path, half: bool = False, progress: bool = True) -> Path:
    """An original-layout ``.safetensors`` (A1111, ComfyUI, diffusers ``from_single_file``); an image-variations
    model's CLIP image tower goes under ``cond_stage_model.model.visual.`` as in the original variations files."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"single-file exports are .safetensors (weights only, no pickle); got {str(out)!r}")
    tensors = project_to_original(item.state, item.model.weight_components())
    meta = {"format": "pt", **item.metadata(), "sd_finetune.dtype": "float16" if half else "float32"}
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(out, tensors, meta, progress=progress, half=half)


def export_diffusers(item: Exportable, out: str | Path, half: bool = False, progress: bool = True,
                     force: bool = False) -> Path:
    """A StableDiffusionPipeline folder: configs, tokenizer, PNDM scheduler, and the weights as safetensors; for an
    image-variations model a StableDiffusionImageVariationPipeline folder (image_encoder/, feature_extractor/), for
    SDXL a StableDiffusionXLPipeline folder (text_encoder_2/, tokenizer_2/)."""
    import diffusers
    from transformers import PreTrainedModel

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{str(out)!r} already holds files; pass --force to replace them")
        shutil.rmtree(out)
    model = item.model
    if not model.first_stage_model.has_vae:  # refused before anything is written
        raise ConfigError(f"{item.info['source']!r} is a pixel-space model (no VAE): a diffusers pipeline folder "
                          "needs one; export a single file instead")
    meta = {"format": "pt", **item.metadata()}
    for row in model.weight_components():
        tensors = {k[len(row.prefix):]: v for k, v in item.state.items() if k.startswith(row.prefix)}
        if not tensors:
            continue
        folder = out / row.diffusers
        folder.mkdir(parents=True)
        name = "model.safetensors" if isinstance(row.module, PreTrainedModel) else "diffusion_pytorch_model.safetensors"
        # A text encoder keeps transformers 4's "text_model." prefix, which transformers 5 also reads (a
        # CLIPTextModelWithProjection, SDXL's second encoder, has it in its own keys already).
        lead = "text_model." if row.original.endswith("_text") and not any(
            k.startswith("text_model.") for k in tensors) else ""
        write_safetensors(folder / name, {lead + k: v for k, v in tensors.items()}, meta, progress=progress,
                          desc=f"{row.diffusers}/{name}", half=half)
    model.unet.save_config(out / "unet")
    index = {"_class_name": "", "_diffusers_version": diffusers.__version__, "requires_safety_checker": False,
             "scheduler": ["diffusers", "PNDMScheduler"], "unet": ["diffusers", "UNet2DConditionModel"]}
    index.update(model.first_stage_model.write_diffusers(out))
    index.update(model.cond_stage_model.write_diffusers(out))
    index = {k: v for k, v in sorted(index.items()) if v is not None}  # None: a setting this pipeline lacks
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_scheduler_config(model.sampler_config, out / "scheduler", diffusers.__version__)
    record = {**item.info, "dtype": "float16" if half else "float32"}
    (out / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def write_scheduler_config(sampler_config: dict, folder: Path, version: str) -> Path:
    """The pipeline's PNDM scheduler with exactly the settings the model samples with, including those PNDM
    itself does not take (``clip_sample``) and none it would add (its own ``timestep_spacing`` default): diffusers
    passes them on when a user swaps the scheduler with ``from_config(pipe.scheduler.config)``, so a swapped
    sampler there is built from the same settings as ours here."""
    config = {**sampler_config, "_class_name": "PNDMScheduler", "_diffusers_version": version, "skip_prk_steps": True}
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "scheduler_config.json"
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return path
