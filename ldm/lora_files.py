"""LoRA adapter files in the two layouts other tools read, and reading either back.

**kohya / AUTOMATIC1111 layout** (the default download): ``lora_unet_<diffusers module path, . as _>`` and
``lora_te_text_model_<...>`` with ``.lora_down.weight``, ``.lora_up.weight`` and a scalar ``.alpha`` per layer, plus
kohya's ``ss_*`` / ``modelspec.*`` metadata. kohya's sd-scripts write exactly these names for SD 1.x and 2.x, and
ComfyUI (``model_lora_keys_unet`` maps every diffusers UNet name), AUTOMATIC1111 (``convert_diffusers_name_to_compvis``),
InvokeAI, stable-diffusion.cpp and diffusers itself read them. The original-SD names (``lora_unet_input_blocks_1_1_...``)
are read by ComfyUI and A1111 too, but not by InvokeAI, so they are only accepted here, never written.

**diffusers layout** (``pytorch_lora_weights.safetensors``, for ``pipe.load_lora_weights``): what diffusers' training
scripts write, with text-encoder keys under ``text_encoder.text_model.`` (transformers 4's names, which diffusers
also maps onto transformers 5's flattened CLIP) and only the LoRA settings older peft knows in its metadata. Alpha
stays in that metadata: ``.alpha`` tensors would make ``load_lora_weights`` refuse the file ("Invalid LoRA
checkpoint", every key must contain "lora"), so clients that want alpha tensors read the kohya file.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.util import ConfigError

ADAPTER = "default"  # peft's name for the one adapter that training adds
KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
# kohya's SDXL names: its two text encoders are lora_te1_ (CLIP ViT-L) and lora_te2_ (OpenCLIP bigG).
SDXL_KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
# LoraConfig fields peft 0.17 (diffusers 0.35's) accepts; newer peft's full dump makes older peft refuse the file.
OLD_PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "lora_dropout", "bias", "init_lora_weights", "use_rslora",
                   "use_dora")


def is_sdxl(model) -> bool:
    """An SDXL model: its conditioner holds diffusers' ``text_encoder_2`` (the file names and loaders differ)."""
    return "text_encoder_2" in model.cond_stage_model.lora_modules()


def lora_pipeline(sdxl: bool):
    """The diffusers pipeline class whose LoRA loaders read this model's files."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline


@dataclass
class Adapter:
    """One adapted network: its diffusers file prefix, peft state under transformers 4 / diffusers module names
    (``<module>.lora_A.weight``), per-module kohya alpha, and the peft config."""
    prefix: str
    state: dict[str, torch.Tensor]
    alphas: dict[str, float]
    config: object


def module_names(prefix: str, network) -> dict[str, str]:
    """peft module path in ``network`` → the path files use; a flattened (transformers 5) CLIP gets ``text_model.``."""
    lead = "text_model." if prefix != "unet" and not hasattr(network, "text_model") else ""
    return {name: lead + name for name, module in network.named_modules() if hasattr(module, "lora_A")}


def adapter_of(prefix: str, network, adapter: str = ADAPTER) -> Adapter:
    from peft.utils import get_peft_model_state_dict

    names = module_names(prefix, network)
    state = {}
    for key, value in get_peft_model_state_dict(network, adapter_name=adapter, save_embedding_layers=False).items():
        module, part = key.rsplit(".lora_", 1)
        state[f"{names[module]}.lora_{part}"] = value.detach().clone().contiguous()
    alphas = {}
    for name, module in network.named_modules():
        if name in names and adapter in module.lora_A:
            # kohya's strength is alpha / rank; peft's rsLoRA divides by sqrt(rank): store what gives the same scale.
            r, alpha = module.r[adapter], module.lora_alpha[adapter]
            alphas[names[name]] = float(alpha * math.sqrt(r) if module.use_rslora.get(adapter, False) else alpha)
    return Adapter(prefix, state, alphas, network.peft_config[adapter])


def diffusers_layout(adapters: list[Adapter]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a ``pytorch_lora_weights.safetensors`` as diffusers' ``save_lora_weights`` writes it."""
    from diffusers.utils import convert_state_dict_to_diffusers

    tensors, meta = {}, {}
    for a in adapters:
        named = convert_state_dict_to_diffusers(a.state)
        # diffusers' older names ("to_q.lora.down") exist only for attention projections. Adapters on other layers keep
        # peft's names ("lora_A"), and loaders pick one format from the first key: a mixed file would silently lose
        # half its adapters, so then peft's names are used throughout.
        if any(".lora_A." in k or ".lora_B." in k for k in named):
            named = a.state
        tensors.update({f"{a.prefix}.{k}": v for k, v in named.items()})
        config = {k: v for k, v in a.config.to_dict().items() if k in OLD_PEFT_FIELDS}
        config["target_modules"] = sorted(config["target_modules"])
        meta.update({f"{a.prefix}.{k}": v for k, v in config.items()})
    return tensors, {"format": "pt", "lora_adapter_metadata": json.dumps(meta, sort_keys=True)}


def kohya_layout(adapters: list[Adapter], info: dict[str, str],
                 sdxl: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of the kohya / A1111 file; ``info`` from :func:`kohya_metadata`."""
    from diffusers.utils import convert_state_dict_to_kohya

    prefixes = SDXL_KOHYA_PREFIX if sdxl else KOHYA_PREFIX
    tensors = {}
    for a in adapters:
        named = convert_state_dict_to_kohya({f"{a.prefix}.{k}": v for k, v in a.state.items()})
        for key, value in named.items():
            if key.endswith(".alpha"):
                continue  # diffusers writes alpha = rank there; the adapter's own alpha follows below
            # diffusers names SDXL's first text encoder lora_te1_ (kohya's SDXL name); SD 1.x/2.x files (and A1111's
            # SD2 path) use lora_te_.
            tensors[key.replace("lora_te1_", prefixes["text_encoder"], 1)] = value
        dtype = next(iter(a.state.values())).dtype
        for module, alpha in a.alphas.items():
            tensors[prefixes[a.prefix] + module.replace(".", "_") + ".alpha"] = torch.tensor(alpha, dtype=dtype)
    return tensors, {"format": "pt", **info}


def kohya_metadata(model, adapters: list[Adapter], title: str) -> dict[str, str]:
    """kohya's own keys that clients read: A1111 tells SD 2 from ``ss_v2`` and shows ``ss_*``; ``modelspec.*`` is the
    Stability model spec sd-scripts writes. The base model is SD 2.x when the context is 1024 wide."""
    unet = next(a for a in adapters if a.prefix == "unet")
    v2 = model.unet.config.cross_attention_dim == 1024 and not is_sdxl(model)
    v_pred = getattr(model, "parameterization", "eps") == "v"
    size = model.unet.config.sample_size * model.first_stage_model.downsample
    arch = "stable-diffusion-v1" if not v2 else f"stable-diffusion-v2-{size}{'-v' if v_pred else ''}"
    alphas = set(unet.alphas.values())
    meta = {"ss_network_module": "networks.lora", "ss_network_dim": str(unet.config.r),
            "ss_network_alpha": str(alphas.pop() if len(alphas) == 1 else unet.config.lora_alpha),
            "ss_base_model_version": "sd_v2" if v2 else "sd_v1", "ss_v2": str(v2),
            "ss_v_parameterization": str(v_pred), "ss_resolution": f"({size}, {size})",
            "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": f"{arch}/lora",
            "modelspec.implementation": "diffusers", "modelspec.title": title,
            "modelspec.resolution": f"{size}x{size}", "modelspec.prediction_type": "v" if v_pred else "epsilon"}
    if is_sdxl(model):  # the names kohya's sdxl_train_network.py writes
        meta.update({"ss_base_model_version": "sdxl_base_v1-0",
                     "modelspec.architecture": "stable-diffusion-xl-v1-base/lora"})
    return meta


def layout_of(keys) -> str:
    """``kohya`` when every key is a kohya name (diffusers' own test for that layout), else ``diffusers``."""
    prefixes = tuple(KOHYA_PREFIX.values()) + tuple(SDXL_KOHYA_PREFIX.values())
    keys = list(keys)
    return "kohya" if keys and all(k.startswith(prefixes) for k in keys) else "diffusers"


def read_lora(path: str | Path, unet_config=None, sdxl: bool = False):
    """``(state, network_alphas, metadata)`` of a LoRA file in either layout, through diffusers' own reader (which
    converts kohya names, original-SD block names too when ``unet_config`` is given, and pops ``.alpha`` tensors);
    ``sdxl``: the SDXL pipeline's reader, which knows both text encoders."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"LoRA file {str(path)!r} does not exist")
    try:
        return lora_pipeline(sdxl).lora_state_dict(str(path), unet_config=unet_config, return_lora_metadata=True)
    except (ValueError, KeyError, OSError) as err:
        raise ConfigError(f"{str(path)!r} is not a LoRA file diffusers reads (kohya or diffusers layout): {err}")


def for_another_model(err: RuntimeError, path: str | Path, here: str) -> ConfigError:
    """The one-line error for torch's ``size mismatch`` while loading adapters (a LoRA of a model whose layers are
    shaped otherwise); re-raises ``err`` when it is anything else."""
    mismatch = next((line.strip() for line in str(err).splitlines() if "size mismatch" in line), None)
    if mismatch is None:
        raise err
    return ConfigError(f"{str(path)!r} is a LoRA for another model ({here}): {mismatch}")
