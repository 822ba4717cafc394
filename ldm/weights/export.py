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
from ldm.weights.files import DIFFUSERS_COMPONENTS, write_safetensors
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
    if src.kind == "training" and config is None:
        section = src.config
        with torch.device("meta"):  # configs, tokenizer and schedule only: no memory, no initialisation
            model = instantiate_from_config(for_inference(section))
        state, n_ema = _ema_onto_unet(src.state, use_ema)
        state = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
    else:
        # Folders and original files: EMA when asked or (ema=None) when the file has a CompVis EMA copy.
        model = load_model(src.path, config=config, ema=ema is not False)
        section, state, n_ema = model.weights_config, model.state_dict(), int(model.weights_ema)
    info = {"source": str(src.path), "kind": src.kind, "step": src.step if src.step is not None else "",
            "ema": str(n_ema > 0).lower(), "config": section}
    return Exportable(state, model, info)


def text_layout(model) -> str:
    """OpenAI CLIP (SD v1) uses quick-GELU; OpenCLIP's ViT-H (SD 2.x) uses GELU and its own key layout."""
    text = getattr(model.cond_stage_model, "transformer", None)  # image-variations models have none
    return "open_clip" if text is not None and text.config.hidden_act == "gelu" else "clip"


def export_single_file(item: Exportable, out: str | Path, half: bool = False, progress: bool = True) -> Path:
    """An original-layout ``.safetensors`` (A1111, ComfyUI, diffusers ``from_single_file``); an image-variations
    model's CLIP image tower goes under ``cond_stage_model.model.visual.`` as in the original variations files."""
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ConfigError(f"single-file exports are .safetensors (weights only, no pickle); got {str(out)!r}")
    tensors = project_to_original(item.state, text_layout(item.model))
    meta = {"format": "pt", **item.metadata(), "sd_finetune.dtype": "float16" if half else "float32"}
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_safetensors(out, tensors, meta, progress=progress, half=half)


def export_diffusers(item: Exportable, out: str | Path, half: bool = False, progress: bool = True,
                     force: bool = False) -> Path:
    """A StableDiffusionPipeline folder: configs, tokenizer, PNDM scheduler, and the weights as safetensors; for an
    image-variations model a StableDiffusionImageVariationPipeline folder (image_encoder/, feature_extractor/)."""
    import diffusers

    from ldm.sampling import make_scheduler

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"{str(out)!r} already holds files; pass --force to replace them")
        shutil.rmtree(out)
    model = item.model
    unet, vae = model.unet, model.first_stage_model.vae
    vae.register_to_config(scaling_factor=model.first_stage_model.scale_factor)  # the pipeline reads it here
    meta = {"format": "pt", **item.metadata()}
    files = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
             "text_encoder": "model.safetensors", "image_encoder": "model.safetensors"}
    for component, prefix in DIFFUSERS_COMPONENTS.items():
        if not any(k.startswith(prefix) for k in item.state):
            continue  # the conditioner this model does not have (text or image encoder)
        folder = out / component
        folder.mkdir(parents=True)
        # The text encoder keeps transformers 4's "text_model." prefix, which transformers 5 also reads.
        lead = "text_model." if component == "text_encoder" else ""
        tensors = {lead + k[len(prefix):]: v for k, v in item.state.items() if k.startswith(prefix)}
        write_safetensors(folder / files[component], tensors, meta, progress=progress,
                          desc=f"{component}/{files[component]}", half=half)
    unet.save_config(out / "unet")
    vae.save_config(out / "vae")
    make_scheduler("pndm", model.schedule.scheduler_config()).save_config(out / "scheduler")
    if hasattr(model.cond_stage_model, "encoder"):
        _write_image_conditioner(model.cond_stage_model, out, diffusers.__version__)
    else:
        _write_text_conditioner(model, out, diffusers.__version__)
    record = {**item.info, "dtype": "float16" if half else "float32"}
    (out / INFO_FILE).write_text(json.dumps(record, indent=2) + "\n")
    return out


def _write_text_conditioner(model, out: Path, version: str) -> None:
    from ldm.models.tokenizer import write_clip_vocab

    text = model.cond_stage_model.transformer
    text.config.architectures = ["CLIPTextModel"]
    text.config.save_pretrained(out / "text_encoder")
    tokenizer = model.cond_stage_model.tokenizer
    tokenizer.save_pretrained(out / "tokenizer")
    write_clip_vocab(out / "tokenizer")  # BPE files too, for loaders that do not read tokenizer.json
    index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": version,
             "feature_extractor": [None, None], "image_encoder": [None, None], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# PIL filter numbers for CLIPImageProcessor's ``resample``.
PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}


def _write_image_conditioner(cond, out: Path, version: str) -> None:
    """image_encoder/ config and feature_extractor/ (a CLIPImageProcessor with the conditioner's resize filter,
    size and normalisation: what StableDiffusionImageVariationPipeline preprocesses PIL inputs with)."""
    from transformers import CLIPImageProcessor

    cond.encoder.config.architectures = ["CLIPVisionModelWithProjection"]
    cond.encoder.config.save_pretrained(out / "image_encoder")
    CLIPImageProcessor(size={"shortest_edge": cond.image_size},
                       crop_size={"height": cond.image_size, "width": cond.image_size},
                       resample=PIL_RESAMPLE.get(cond.interpolation, 3), image_mean=list(cond.mean),
                       image_std=list(cond.std)).save_pretrained(out / "feature_extractor")
    index = {"_class_name": "StableDiffusionImageVariationPipeline", "_diffusers_version": version,
             "feature_extractor": ["transformers", "CLIPImageProcessor"],
             "image_encoder": ["transformers", "CLIPVisionModelWithProjection"], "requires_safety_checker": False,
             "safety_checker": [None, None], "scheduler": ["diffusers", "PNDMScheduler"],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
