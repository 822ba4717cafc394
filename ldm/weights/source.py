"""Open any supported weights path and say what it is: a training run or checkpoint of this project, a
diffusers folder, an original single-file checkpoint, or this project's own safetensors export."""
from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.util import ConfigError
from ldm.weights.files import read_diffusers_folder, read_file, tensors_only
from ldm.weights.original import describe, is_original

CONFIG_KEY = "sd_finetune.config"  # safetensors metadata of this project's exports: the model section as JSON


@dataclass
class Source:
    path: Path
    kind: str  # training | project | original | diffusers
    state: dict[str, torch.Tensor]
    config: dict | None = None  # the model section, when the source carries one
    step: int | None = None
    metadata: dict = field(default_factory=dict)

    @property
    def description(self) -> str:
        found = describe(self.state)
        return found.replace("SD weights in this project's layout", "a diffusers pipeline") if self.kind == "diffusers" \
            else found


def find_checkpoint(path: Path) -> Path:
    """A run dir means its ``checkpoints/last.ckpt`` (or the newest epoch checkpoint)."""
    ckpts = path / "checkpoints"
    if (ckpts / "last.ckpt").exists():
        return ckpts / "last.ckpt"
    epochs = sorted(ckpts.glob("*.ckpt"))
    if epochs:
        return epochs[-1]
    raise ConfigError(f"run dir {str(path)!r} has no checkpoints/*.ckpt")


def open_weights(path: str | Path) -> Source:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"weights {str(path)!r} do not exist (expected a .ckpt/.safetensors file, "
                          "a diffusers folder or a run dir under logs/)")
    if path.is_dir() and (path / "checkpoints").is_dir():
        path = find_checkpoint(path)
    if path.is_dir():
        return Source(path, "diffusers", read_diffusers_folder(path))
    obj, metadata = read_file(path)
    if isinstance(obj.get("state_dict"), dict) and isinstance(obj.get("config"), dict):
        config = obj["config"].get("model", obj["config"])
        if isinstance(obj.get("sampler_config"), dict):  # the resolved settings the model sampled with in training
            config = {**config, "params": {**config.get("params", {}), "sampler_config": obj["sampler_config"]}}
        return Source(path, "training", tensors_only(obj, path), config, obj.get("global_step"), metadata)
    state = tensors_only(obj, path)
    found = describe(state)
    if found.startswith(("an SDXL refiner", "a LoRA", "not a Stable")):
        raise ConfigError(f"{str(path)!r} is {found}; expected a Stable Diffusion v1/2.x or SDXL base model "
                          "(original single file, diffusers folder or a checkpoint of this project)")
    config = json.loads(metadata[CONFIG_KEY]) if CONFIG_KEY in metadata else None
    step = int(metadata["sd_finetune.step"]) if metadata.get("sd_finetune.step", "").isdigit() else None
    kind = "original" if is_original(state) else "project"
    return Source(path, kind, state, config, step, metadata)


# ---- a model section from a diffusers folder's json files --------------------------------------------------
TEXT_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_hidden_layers",
             "max_position_embeddings", "hidden_act", "projection_dim", "layer_norm_eps")
PARAMETERIZATION = {"epsilon": "eps", "v_prediction": "v"}


def _json(folder: Path, name: str, required: bool = True) -> dict:
    path = folder / name
    if not path.exists():
        if required:
            raise ConfigError(f"{str(folder)!r} is not a diffusers pipeline folder: {name} is missing")
        return {}
    return json.loads(path.read_text())


def _init_args(cls, config: dict) -> dict:
    """The keys of a diffusers config.json that ``cls`` takes (drops ``_class_name`` and retired keys)."""
    accepted = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in config.items() if k in accepted}


VISION_KEYS = ("image_size", "patch_size", "num_channels", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_hidden_layers", "hidden_act", "projection_dim", "layer_norm_eps")
RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL's filter numbers in preprocessor_config.json


def _image_conditioner(folder: Path) -> dict:
    """An image-variations folder's conditioner: image_encoder/config.json for the tower, feature_extractor/
    (CLIPImageProcessor's preprocessor_config.json) for the resize filter and normalisation. PIL resizes with
    antialiasing, so antialias is on."""
    vision = _json(folder, "image_encoder/config.json")
    vision = vision.get("vision_config", vision)
    prep = _json(folder, "feature_extractor/preprocessor_config.json", required=False)
    params = {"config": {k: vision[k] for k in VISION_KEYS if k in vision}, "antialias": True,
              "interpolation": RESAMPLE.get(prep.get("resample", 3), "bicubic")}
    size = prep.get("crop_size", prep.get("size"))
    if isinstance(size, dict):
        size = size.get("height", size.get("shortest_edge"))
    if size:
        params["image_size"] = int(size)
    if "image_mean" in prep:
        params.update(mean=list(prep["image_mean"]), std=list(prep["image_std"]))
    return {"target": "ldm.models.conditioners.CLIPImageConditioner", "params": params}


def _pad_token(folder: Path, tokenizer: str = "tokenizer") -> str:
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        pad = _json(folder / tokenizer, name, required=False).get("pad_token")
        if pad:
            return pad["content"] if isinstance(pad, dict) else pad
    return "<|endoftext|>"


def _sdxl_conditioner(folder: Path) -> dict:
    """An SDXL folder's two text encoders and tokenizers (the OpenCLIP one pads with ``!`` there)."""
    params = {}
    for suffix in ("", "_2"):
        text = _json(folder, f"text_encoder{suffix}/config.json")
        params[f"config{suffix}"] = {k: text[k] for k in TEXT_KEYS if k in text}
        if (folder / f"tokenizer{suffix}").is_dir():
            params[f"tokenizer{suffix}"] = str(folder / f"tokenizer{suffix}")
    return {"target": "ldm.models.sdxl.SDXLTextConditioner", "params": params}


def model_config_from_folder(folder: str | Path) -> dict:
    """The LatentDiffusion model section matching a diffusers SD folder (architecture only, no weights).

    The folder needs its json configs (and tokenizer files); weights are not read here.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel

    folder = Path(folder)
    unet = _init_args(UNet2DConditionModel, _json(folder, "unet/config.json"))
    vae = _init_args(AutoencoderKL, _json(folder, "vae/config.json"))
    sched = _json(folder, "scheduler/scheduler_config.json", required=False)
    if (folder / "image_encoder").is_dir() and not (folder / "text_encoder").is_dir():
        cond_config, cond_key = _image_conditioner(folder), "image"
    elif (folder / "text_encoder_2").is_dir():
        cond_config, cond_key = _sdxl_conditioner(folder), "caption"
    else:
        text = _json(folder, "text_encoder/config.json")
        cond = {"config": {k: text[k] for k in TEXT_KEYS if k in text}, "pad_token": _pad_token(folder)}
        if (folder / "tokenizer").is_dir():
            cond["tokenizer"] = str(folder / "tokenizer")
        cond_config, cond_key = {"target": "ldm.models.conditioners.CLIPTextConditioner", "params": cond}, "caption"
    return {
        "target": "ldm.models.diffusion.LatentDiffusion",
        "params": {
            "timesteps": sched.get("num_train_timesteps", 1000), "linear_start": sched.get("beta_start", 0.00085),
            "linear_end": sched.get("beta_end", 0.012), "beta_schedule": sched.get("beta_schedule", "scaled_linear"),
            "parameterization": PARAMETERIZATION.get(sched.get("prediction_type", "epsilon"), "eps"),
            # The folder's scheduler settings whole (with its _class_name), so every sampler is built as diffusers'
            # from_config builds it.
            "sampler_config": {k: v for k, v in sched.items() if k != "_diffusers_version"} or None,
            "unet_config": {"target": "ldm.models.denoiser.unet", "params": {"config": unet}},
            "first_stage_config": {"target": "ldm.models.first_stage.AutoencoderKLFirstStage",
                                   "params": {"scale_factor": vae.get("scaling_factor", 0.18215), "config": vae}},
            "cond_stage_key": cond_key, "cond_stage_config": cond_config,
        },
    }
