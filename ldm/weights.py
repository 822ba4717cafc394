"""Loading weights into a LatentDiffusion model from checkpoints and diffusers folders (``--finetune_from``)."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file

from ldm.util import ConfigError

# Where each diffusers pipeline component lives inside this project's LatentDiffusion state dict.
DIFFUSERS_COMPONENTS = {"unet": "unet.", "vae": "first_stage_model.vae.", "text_encoder": "cond_stage_model.transformer."}


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    try:
        # weights_only: a checkpoint is data, never code to run.
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"cannot read checkpoint {str(path)!r}: {str(err).splitlines()[0]}") from err
    if isinstance(obj, dict) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ConfigError(f"checkpoint {str(path)!r} holds no state dict of tensors")
    return obj


def read_diffusers_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a diffusers pipeline folder, keyed as in this project's state dict."""
    state = {}
    for component, prefix in DIFFUSERS_COMPONENTS.items():
        files = sorted((folder / component).glob("*.safetensors")) or sorted((folder / component).glob("*.bin"))
        for f in files:
            for key, value in _read_tensors(f).items():
                # transformers < 5 saved the CLIP text encoder under ``text_model.``; 5.x does not.
                key = key.removeprefix("text_model.") if component == "text_encoder" else key
                state[prefix + key] = value
    if not state:
        raise ConfigError(f"{str(folder)!r} is not a diffusers pipeline folder: no weights in {list(DIFFUSERS_COMPONENTS)}")
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"weights {str(path)!r} do not exist")
    state = read_diffusers_folder(path) if path.is_dir() else _read_tensors(path)
    if any(k.startswith("model.diffusion_model.") for k in state):
        raise ConfigError(f"{str(path)!r} is in the original CompVis single-file layout; convert it to a diffusers "
                          "folder first (see README, 'Weights')")
    return state


def load_weights(model: torch.nn.Module, path: str | Path) -> str:
    """Load what matches (non-strict) and return a short summary of what did not."""
    state = read_state_dict(path)
    own = model.state_dict()
    mismatched = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    matched = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not matched:
        raise ConfigError(f"no tensor of {str(path)!r} fits this model: expected keys like {next(iter(own))!r}, "
                          f"found keys like {next(iter(state))!r}")
    if len(mismatched) > len(matched):
        k = mismatched[0]
        raise ConfigError(f"{str(path)!r} is another architecture: {len(mismatched)} tensors differ in shape, e.g. "
                          f"{k} is {tuple(state[k].shape)} there but {tuple(own[k].shape)} in this model")
    model.load_state_dict(matched, strict=False)
    has_ema = any(k.startswith("model_ema.") for k in matched)
    if getattr(model, "model_ema", None) is not None and not has_ema:
        # Start the average at the loaded weights, not at the random initialisation.
        model.model_ema.copy_from(model.unet)
    missing = [k for k in own if k not in matched and not k.startswith("model_ema.")]
    unexpected = [k for k in state if k not in own]
    lines = [f"loaded {len(matched)} tensors from {path}"]
    for label, keys in (("missing (kept as initialised)", missing), ("unexpected (ignored)", unexpected),
                        ("shape mismatch (kept as initialised)", mismatched)):
        if keys:
            lines.append(f"  {label}: {len(keys)}, e.g. {', '.join(keys[:3])}")
    return "\n".join(lines)
