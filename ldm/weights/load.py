"""Put weights from any supported source into a LatentDiffusion: ``load_weights`` for ``--finetune_from``
(into a model the training config built) and ``load_model`` for sampling and export (builds the model too)."""
from __future__ import annotations

import copy
from pathlib import Path

import torch

from ldm.models.ema import EMA
from ldm.util import ConfigError, instantiate_from_config
from ldm.weights.original import has_original_ema, original_to_project
from ldm.weights.source import Source, model_config_from_folder, open_weights

ROOT = Path(__file__).resolve().parents[2]
# The named architectures an unlabelled original file is recognised as (the recipes include the same files).
ARCHITECTURES = ROOT / "configs" / "architectures"
SD_V1_CONFIG = ARCHITECTURES / "sd-v1.yaml"
VARIATIONS_CONFIG = ARCHITECTURES / "sd-v1-image-variations.yaml"  # SD v1 with CLIP ViT-L/14's image tower
SDXL_CONFIG = ARCHITECTURES / "sdxl.yaml"


def model_description(model) -> str:
    """The same kind of name ``describe`` gives a file, for the model a config built."""
    ctx = model.unet.config.cross_attention_dim
    cond = model.cond_stage_model
    if cond.kind == "image":
        return f"an image-variations model ({cond.description()}, {ctx}-d context)"
    if "text_encoder_2" in cond.lora_modules():
        return f"{'SDXL' if ctx == 2048 else 'SDXL-shaped'} ({cond.description()}, {ctx}-d context)"
    encoder = cond.description().split()[0]  # CLIP or OpenCLIP
    name = {(768, "CLIP"): "SD v1", (1024, "OpenCLIP"): "SD 2.x"}.get((ctx, encoder)) or \
        ("SD-v1-shaped" if encoder == "CLIP" else "SD-2-shaped")
    return f"{name} ({cond.description()}, {ctx}-d context)"


def ema_note(ema: bool, n: int) -> str:
    if not ema:
        return "raw weights"
    return f"EMA weights ({n} tensors)" if n else "raw weights (the source has no EMA copy)"


def _ema_onto_unet(state: dict, ema: bool) -> tuple[dict, int]:
    """For this project's checkpoints: the UNet tensors, replaced by their EMA (``model_ema.a__b``) if asked;
    returns the state and how many EMA tensors it used."""
    if not ema:
        return state, 0
    out, n = dict(state), 0
    for key in state:
        if key.startswith("unet.") and (shadow := "model_ema." + EMA.buffer_name(key[5:])) in state:
            out[key], n = state[shadow].to(state[key].dtype), n + 1
    return out, n


def project_state(model, src: Source, ema: bool) -> tuple[dict, int]:
    """``src``'s tensors under this project's keys, UNet raw or EMA; for an original file with an EMA copy and
    a model that keeps EMA, the copy goes to ``model_ema`` (so fine-tuning continues both)."""
    if src.kind != "original":
        return _ema_onto_unet(src.state, ema)
    components = model.weight_components()
    state, n_ema = original_to_project(src.state, components, ema=ema)
    if model.model_ema is not None and has_original_ema(src.state):
        shadow, _ = original_to_project(src.state, [c for c in components if c.original == "unet"], ema=True)
        for key, value in shadow.items():
            state["model_ema." + EMA.buffer_name(key.removeprefix("unet."))] = value
    return state, n_ema


def _onto_lora_layers(state: dict, own: dict) -> dict:
    """A model with LoRA adapters (peft) holds each adapted layer's weights under ``<layer>.base_layer.``: give
    the source's plain ``<layer>.weight`` that name, so ``--finetune_from`` fills the layers the adapters sit on."""
    state = dict(state)
    for key in own:
        plain = key.replace(".base_layer.", ".")
        if plain != key and key not in state and plain in state:
            state[key] = state.pop(plain)
    return state


def _load(model, src: Source, ema: bool, assign: bool = False) -> tuple[str, list[str], int]:
    """Load ``src`` into ``model``: the summary, the tensors the source lacked, and the EMA tensors used.

    ``assign`` makes the model use the source's tensors (memory-mapped from the file) instead of copying them
    into its freshly initialised ones: half the peak memory when a full-size model is built just to be loaded.
    """
    if src.kind == "original" and src.description.startswith("SDXL") != model_description(model).startswith("SDXL"):
        raise ConfigError(f"{str(src.path)!r} is {src.description}; expected {model_description(model)}")
    state, n_ema = project_state(model, src, ema)
    own = model.state_dict()
    state = _onto_lora_layers(state, own)
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if mismatched:
        # The cross-attention key projection shows the context width, the clearest sign of another model family.
        mismatched.sort(key=lambda k: not k.endswith("attn2.to_k.weight"))
        k = mismatched[0]
        raise ConfigError(f"{str(src.path)!r} is another architecture: expected {model_description(model)}, found "
                          f"{src.description}; {len(mismatched)} tensors differ, e.g. {k} is "
                          f"{tuple(state[k].shape)} there but {tuple(own[k].shape)} here")
    matched = {k: v for k, v in state.items() if k in own}
    if not matched:
        raise ConfigError(f"no tensor of {str(src.path)!r} fits this model: expected {model_description(model)} "
                          f"with keys like {next(iter(own))!r}, found {src.description} with keys like {next(iter(state))!r}")
    if assign:  # tensors of another dtype (an fp16 file) are copied into the fp32 model, never converted whole
        model.load_state_dict({k: v for k, v in matched.items() if v.dtype == own[k].dtype}, strict=False, assign=True)
    model.load_state_dict({k: v for k, v in matched.items() if not assign or v.dtype != own[k].dtype}, strict=False)
    if model.model_ema is not None and not any(k.startswith("model_ema.") for k in matched):
        # Start the average at the loaded weights, not at the random initialisation.
        model.model_ema.copy_from(model.unet)
    # LoRA adapters start from their own initialisation; a base checkpoint never holds them.
    missing = [k for k in own if k not in matched and not k.startswith("model_ema.") and ".lora_" not in k]
    # EMA tensors the model has no place for were used (or not) by the EMA choice above.
    unexpected = [k for k in state if k not in own and not k.startswith("model_ema.")]
    note = ema_note(ema, n_ema)
    lines = [f"loaded {len(matched)} tensors from {src.path} ({src.kind}: {src.description}; {note})"]
    for label, keys in (("missing (kept as initialised)", missing), ("unexpected (ignored)", unexpected)):
        if keys:
            lines.append(f"  {label}: {len(keys)}, e.g. {', '.join(keys[:3])}")
    return "\n".join(lines), missing, n_ema


def load_weights(model: torch.nn.Module, path: str | Path, ema: bool = False) -> str:
    """Load what matches into ``model`` and return a short summary (for ``--finetune_from``).

    ``ema`` puts the source's EMA weights into the UNet instead of the raw ones; raw weights are the usual
    start for further training, and an EMA copy in the file still seeds the model's own EMA.
    """
    return _load(model, open_weights(path), ema)[0]


def _model_section(config) -> dict:
    """A model section from a dict, a YAML file (its ``model`` section) or a diffusers folder."""
    if isinstance(config, dict):
        return copy.deepcopy(dict(config.get("model", config)))
    path = Path(config)
    if path.is_dir():
        return model_config_from_folder(path)
    from omegaconf import OmegaConf

    from ldm.config import load_yaml

    if not path.exists():
        raise ConfigError(f"config {str(path)!r} does not exist (give a YAML with a model section or a diffusers folder)")
    cfg = load_yaml(path)
    if "model" not in cfg:
        raise ConfigError(f"config {str(path)!r} has no 'model' section")
    return OmegaConf.to_container(cfg.model, resolve=True)


def resolve_config(src: Source, config=None) -> tuple[dict, str]:
    """The model section to build for ``src`` and where it came from."""
    if config is not None:
        return _model_section(config), str(config) if not isinstance(config, dict) else "the given config"
    if src.config is not None:
        return copy.deepcopy(src.config), f"the config stored in {src.path.name}"
    if src.kind == "diffusers":
        return model_config_from_folder(src.path), f"{src.path}'s json configs"
    for name, known in (("SD v1 ", SD_V1_CONFIG), ("SD image variations ", VARIATIONS_CONFIG), ("SDXL ", SDXL_CONFIG)):
        if src.description.startswith(name):
            return _model_section(known), f"{known.relative_to(ROOT)} (detected {src.description})"
    raise ConfigError(f"{str(src.path)!r} is {src.description} and holds no architecture: pass a config "
                      "(configs/sd-v2.yaml for SD 2.x 512 px epsilon, configs/sd-v2-768-v.yaml for 768 px "
                      "v-prediction, any YAML with a model section, or a diffusers folder of the same model)")


def for_inference(section: dict) -> dict:
    """Architecture only: no pretrained folders (the weights come from the source) and no EMA copy."""
    section = copy.deepcopy(section)
    params = section.setdefault("params", {})
    params.update(pretrained=None, use_ema=False)
    for block in ("unet_config", "first_stage_config", "cond_stage_config"):
        sub = (params.get(block) or {}).get("params") or {}
        if sub.get("pretrained") and sub.get("config") is None:
            raise ConfigError(f"model.params.{block} names only a pretrained folder ({sub['pretrained']!r}), not an "
                              "architecture; pass config= a YAML that writes it out, or that diffusers folder")
        sub.pop("pretrained", None)
        for speed_setting in ("gradient_checkpointing", "channels_last", "compile"):  # training-time choices
            sub.pop(speed_setting, None)
    return section


def load_model(path: str | Path, config=None, ema: bool = True, device: str | torch.device = "cpu",
               verbose: bool = False):
    """A LatentDiffusion in eval mode with the weights at ``path``.

    ``path``: a run dir or training ``.ckpt`` (architecture from the config stored inside), a diffusers folder
    (from its json configs), an original single ``.ckpt``/``.safetensors`` (``config`` = a YAML or a diffusers
    folder of the same model; SD v1 is recognised and defaults to configs/architectures/sd-v1.yaml), or an
    export of this project (its config travels in the metadata). ``ema`` uses the EMA UNet weights when the
    source has them. Every tensor the model needs must be in the source.
    """
    src = open_weights(path)
    section, origin = resolve_config(src, config)
    model = instantiate_from_config(for_inference(section))
    summary, missing, n_ema = _load(model, src, ema, assign=True)
    if missing:
        raise ConfigError(f"{str(src.path)!r} ({src.description}) lacks {len(missing)} tensors that "
                          f"{model_description(model)} needs, e.g. {', '.join(missing[:3])}")
    model.eval().requires_grad_(False).to(device)
    model.weights_summary = f"{summary}\n  architecture from {origin}"
    model.weights_config = section
    model.weights_ema = n_ema > 0
    if verbose:
        print(model.weights_summary)
    return model
