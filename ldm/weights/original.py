"""The original CompVis/Stability single-file layout ↔ this project's state dict.

Original files hold ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
``cond_stage_model.transformer.text_model.*`` (SD v1, OpenAI CLIP in transformers' layout),
``cond_stage_model.model.*`` (SD 2.x, OpenCLIP's own layout) or ``cond_stage_model.model.visual.*`` (image
variations: OpenAI CLIP's image tower, see ``clip_visual``), and optionally ``model_ema.*`` (the UNet's EMA,
names without dots). Reading uses diffusers' own converters (the code behind ``from_single_file``);
diffusers ships no converter for the other direction, so writing uses the mapping below, which the tests
check against diffusers' reading, tensor for tensor.
"""
from __future__ import annotations

import re

import torch
from diffusers.loaders import single_file_utils as sfu

from ldm.util import ConfigError
from ldm.weights import clip_visual

UNET, VAE, CLIP, OPENCLIP = "model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.", \
    "cond_stage_model.model."
VISUAL = OPENCLIP + "visual."  # image variations: the whole OpenAI CLIP model sits under cond_stage_model.model.
# SDXL's GeneralConditioner: CLIP ViT-L in transformers' layout, OpenCLIP bigG (with text_projection) in its own.
XL_CLIP, XL_OPENCLIP = "conditioner.embedders.0.transformer.", "conditioner.embedders.1.model."
# Where each layout a model part names (``WeightComponent.original``) sits in an original file.
ORIGINAL_PREFIX = {"unet": UNET, "vae": VAE, "clip_text": CLIP, "open_clip_text": OPENCLIP, "clip_visual": VISUAL,
                   "sdxl_clip_text": XL_CLIP, "sdxl_open_clip_text": XL_OPENCLIP}


# ---- what a file is ---------------------------------------------------------------------------------------
def _context_dim(state: dict, prefix: str) -> int | None:
    key = next((k for k in state if k.startswith(prefix) and k.endswith("attn2.to_k.weight")), None)
    return int(state[key].shape[1]) if key else None


def describe(state: dict) -> str:
    """A short name for what ``state`` holds, from its keys and shapes (e.g. 'SD 2.x (OpenCLIP ..., 1024-d context)')."""
    keys = list(state)
    if any(k.startswith("conditioner.embedders.") for k in keys):
        if any(k.startswith("conditioner.embedders.0.model.") for k in keys):
            return "an SDXL refiner (one OpenCLIP text encoder under conditioner.embedders.0.model.*)"
        ctx = _context_dim(state, UNET)
        name = "SDXL" if ctx == 2048 else "SDXL-shaped"
        return f"{name} (CLIP + OpenCLIP text encoders{f', {ctx}-d context' if ctx else ''})"
    loras = [k for k in keys if "lora" in k.lower()]
    if loras:
        return f"a LoRA ({len(loras)} low-rank adapter tensors like {loras[0]!r}), not a full model"
    if any(k.startswith(UNET) for k in keys):
        ctx = _context_dim(state, UNET)
        in_ch = state.get(UNET + "input_blocks.0.0.weight")
        extra = f", {in_ch.shape[1]} input channels (inpainting)" if in_ch is not None and in_ch.shape[1] != 4 else ""
        if any(k.startswith(VISUAL) for k in keys):
            name = "SD image variations" if ctx == 768 else "image-variations-shaped"
            return f"{name} (CLIP image encoder, {ctx}-d context{extra})"
        if any(k.startswith(OPENCLIP) for k in keys):
            width = state[OPENCLIP + "token_embedding.weight"].shape[1]
            name = "SD 2.x" if ctx == 1024 and width == 1024 else "SD-2-shaped"
            return f"{name} (OpenCLIP text encoder, {ctx}-d context{extra})"
        if any(k.startswith(CLIP) for k in keys):
            name = "SD v1" if ctx == 768 else "SD-v1-shaped"
            return f"{name} (CLIP text encoder, {ctx}-d context{extra})"
        return f"a UNet-only original checkpoint ({ctx}-d context{extra})"
    if any(k.startswith("unet.") for k in keys):
        return f"SD weights in this project's layout ({_context_dim(state, 'unet.')}-d context)"
    prefixes = sorted({k.split(".")[0] for k in keys})[:6]
    return f"not a Stable Diffusion checkpoint (top-level key prefixes {prefixes})"


def is_original(state: dict) -> bool:
    return any(k.startswith(UNET) for k in state)


def has_original_ema(state: dict) -> bool:
    return any(k.startswith("model_ema.diffusion_model") for k in state)


# ---- original → project (diffusers' converters) -----------------------------------------------------------
def _with_ema(state: dict) -> tuple[dict, int]:
    """``state`` with each UNet tensor replaced by its CompVis EMA copy (``model_ema.<name without dots>``)."""
    out, n = dict(state), 0
    for key in state:
        if key.startswith(UNET):
            ema = "model_ema." + key[len("model."):].replace(".", "")
            if ema in state:
                out[key], n = state[ema], n + 1
    return out, n


def _convert_component(state: dict, row) -> dict[str, torch.Tensor]:
    """One model part's tensors from an original-layout ``state``, in the library network's own keys."""
    layout = row.original
    if layout == "unet":
        return sfu.convert_ldm_unet_checkpoint(state, dict(row.module.config))
    if layout == "vae":
        return sfu.convert_ldm_vae_checkpoint(state, dict(row.module.config))
    if layout == "clip_visual":
        return clip_visual.openai_to_hf({k[len(VISUAL):]: v for k, v in state.items() if k.startswith(VISUAL)})
    if layout == "sdxl_open_clip_text":  # all of bigG's blocks run (its pooled output is the last block's)
        return sfu.convert_open_clip_checkpoint(row.module, state, prefix=XL_OPENCLIP)
    if layout == "open_clip_text":
        layers = row.module.config.num_hidden_layers
        keep = {k: v for k, v in state.items() if not _block_at_or_after(k, layers)}
        text = sfu.convert_open_clip_checkpoint(row.module, keep, prefix=OPENCLIP)
    elif layout in ("clip_text", "sdxl_clip_text"):
        prefix = ORIGINAL_PREFIX[layout]
        text = sfu.convert_ldm_clip_checkpoint({k: v for k, v in state.items() if k.startswith(prefix)})
    else:
        raise ConfigError(f"no original single-file layout {layout!r} (known: {', '.join(ORIGINAL_PREFIX)})")
    # position_ids is a buffer transformers rebuilds; older files carry it, the model has no place for it.
    return {k.removeprefix("text_model."): v for k, v in text.items() if not k.endswith("embeddings.position_ids")}


def original_to_project(state: dict, components, ema: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """Convert an original-layout state dict for a model whose parts declare ``components``
    (``LatentDiffusion.weight_components()``); a part whose tensors the file lacks is left out (a UNet-only file,
    a text tower beside an image tower). Returns the project state and how many EMA tensors it used."""
    n_ema = 0
    if ema:
        state, n_ema = _with_ema(state)
    out = {}
    for row in components:
        if row.original not in ORIGINAL_PREFIX:
            raise ConfigError(f"no original single-file layout {row.original!r} (known: {', '.join(ORIGINAL_PREFIX)})")
        if not any(k.startswith(ORIGINAL_PREFIX[row.original]) for k in state):
            continue
        if row.original in ("clip_text", "open_clip_text") and any(k.startswith(VISUAL) for k in state):
            continue  # an image-variations file's unused text tower is not a text encoder to load
        try:
            converted = _convert_component(state, row)
        except (KeyError, IndexError, RuntimeError, TypeError, ValueError) as err:
            raise ConfigError(f"cannot convert this {describe(state)} file: {type(err).__name__} {err}") from err
        out.update({row.prefix + k: v for k, v in converted.items()})
    return out, n_ema


def _block_at_or_after(key: str, layers: int) -> bool:
    """OpenCLIP blocks the 'penultimate layer' text encoder never runs (SD 2.x: block 23 of 24)."""
    m = re.match(re.escape(OPENCLIP) + r"transformer\.resblocks\.(\d+)\.", key)
    return bool(m) and int(m.group(1)) >= layers


# ---- project → original (own mapping) ---------------------------------------------------------------------
UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
              "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}  # SDXL's vector
UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0", "conv2": "out_layers.3",
               "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}
VAE_FIXED = {"conv_norm_out": "norm_out"}
VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _count(keys, pattern: str) -> int:
    return len({m.group(1) for k in keys if (m := re.match(pattern, k))})


def _unet_key(key: str, per_block: int, up_attn: set[int]) -> str:
    """One diffusers UNet key → its ``model.diffusion_model`` name (SD v1/v2 block structure)."""
    for ours, theirs in UNET_FIXED.items():
        if key.startswith(ours + "."):
            return theirs + key[len(ours):]
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.(.*)", key):
        side, b, kind, j, tail = m.group(1), int(m.group(2)), m.group(3), int(m.group(4)), m.group(5)
        # Each level holds per_block resnets plus a down/upsampler slot (up levels: per_block + 1 resnets).
        first = b * (per_block + 1) + (1 if side == "down" else 0)
        blocks = "input_blocks" if side == "down" else "output_blocks"
        if kind == "resnets":
            return f"{blocks}.{first + j}.0.{_resnet_tail(tail)}"
        if kind == "attentions":
            return f"{blocks}.{first + j}.1.{tail}"
        if kind == "downsamplers":  # conv.weight → op.weight
            return f"input_blocks.{first + per_block}.0.op.{tail.removeprefix('conv.')}"
        return f"output_blocks.{first + per_block}.{2 if b in up_attn else 1}.{tail}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, j, tail = m.groups()
        if kind == "attentions":
            return f"middle_block.1.{tail}"
        return f"middle_block.{2 * int(j)}.{_resnet_tail(tail)}"
    raise ConfigError(f"no original-layout name for UNet tensor {key!r} (only SD v1/v2 and SDXL-style UNets export)")


def _resnet_tail(tail: str) -> str:
    head, _, rest = tail.partition(".")
    return f"{UNET_RESNET.get(head, head)}.{rest}"


def _vae_key(key: str, n_up: int) -> str:
    part, _, rest = key.partition(".")
    if m := re.match(r"(down|up)_blocks\.(\d+)\.(resnets|downsamplers|upsamplers)\.(\d+)\.(.*)", rest):
        side, i, kind, j, tail = m.group(1), int(m.group(2)), m.group(3), m.group(4), m.group(5)
        level = i if side == "down" else n_up - 1 - i
        if kind == "resnets":
            return f"{part}.{side}.{level}.block.{j}.{tail.replace('conv_shortcut', 'nin_shortcut')}"
        return f"{part}.{side}.{level}.{'downsample' if side == 'down' else 'upsample'}.{tail}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{part}.mid.block_{int(m.group(1)) + 1}.{m.group(2).replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)$", rest):
        return f"{part}.mid.attn_1.{VAE_ATTN[m.group(1)]}.{m.group(2)}"
    head, _, tail = rest.partition(".")
    return f"{part}.{VAE_FIXED.get(head, head)}.{tail}" if tail else key


def _openclip(text: dict, prefix: str = OPENCLIP) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel keys → OpenCLIP's (q/k/v projections fused into ``in_proj``); SDXL's bigG
    (``CLIPTextModelWithProjection``: keys under ``text_model.``) also has ``text_projection``, stored transposed
    as OpenCLIP multiplies by it from the right."""
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    parts = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
             "self_attn.out_proj": "attn.out_proj"}
    out = {}
    if "text_projection.weight" in text:
        out[prefix + "text_projection"] = text["text_projection.weight"].T.contiguous()
    text = {k.removeprefix("text_model."): v for k, v in text.items() if k != "text_projection.weight"}
    for key, value in text.items():
        if key in fixed:
            out[prefix + fixed[key]] = value
            continue
        m = re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)$", key)
        if not m:
            raise ConfigError(f"no OpenCLIP name for text encoder tensor {key!r}")
        i, name, kind = m.groups()
        block = f"{prefix}transformer.resblocks.{i}."
        if name.startswith("self_attn.") and name[-6:] in ("q_proj", "k_proj", "v_proj"):
            if name.endswith("q_proj"):
                qkv = [text[f"encoder.layers.{i}.self_attn.{p}_proj.{kind}"] for p in "qkv"]
                out[f"{block}attn.in_proj_{kind}"] = torch.cat(qkv)
            continue
        out[block + parts[name] + "." + kind] = value
    return out


def project_to_original(state: dict, components) -> dict[str, torch.Tensor]:
    """This project's tensors in the original layout, each model part as its ``components`` row says."""
    out = {}
    for row in components:
        part = {k[len(row.prefix):]: v for k, v in state.items() if k.startswith(row.prefix)}
        if part:
            out.update(_to_original(part, row.original))
    return out


def _to_original(part: dict, layout: str) -> dict[str, torch.Tensor]:
    if layout == "unet":
        per_block = _count(part, r"down_blocks\.0\.resnets\.(\d+)\.")
        up_attn = {int(m.group(1)) for k in part if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
        return {UNET + _unet_key(k, per_block, up_attn): v for k, v in part.items()}
    if layout == "vae":
        n_up, out = _count(part, r"decoder\.up_blocks\.(\d+)\."), {}
        for key, value in part.items():
            new = VAE + _vae_key(key, n_up)
            # The original VAE's mid-block attention uses 1x1 convolutions where diffusers has linear layers.
            out[new] = value[:, :, None, None] if ".mid.attn_1." in new and value.ndim == 2 else value
        return out
    if layout == "clip_visual":
        return {VISUAL + k: v for k, v in clip_visual.hf_to_openai(part).items()}
    if layout in ("open_clip_text", "sdxl_open_clip_text"):
        return _openclip(part, ORIGINAL_PREFIX[layout])
    if layout in ("clip_text", "sdxl_clip_text"):
        prefix = ORIGINAL_PREFIX[layout]
        out = {prefix + "text_model." + k: v for k, v in part.items()}
        positions = part["embeddings.position_embedding.weight"].shape[0]
        # Older loaders (transformers 4, A1111) expect this buffer in the file.
        out[prefix + "text_model.embeddings.position_ids"] = torch.arange(positions)[None]
        return out
    raise ConfigError(f"no original single-file layout {layout!r} (known: {', '.join(ORIGINAL_PREFIX)})")
