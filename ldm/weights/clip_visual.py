"""OpenAI CLIP's image tower in its own layout (``visual.*``, as the ``clip`` and open_clip packages hold it) ↔
transformers' ``CLIPVisionModelWithProjection``.

Original image-variations checkpoints keep the whole OpenAI CLIP model under ``cond_stage_model.model.``: the image
tower under ``visual.`` and, unused, the text tower beside it. The two layouts differ in names, in the fused
q/k/v projection (``attn.in_proj_*``) and in the projection matrix, which OpenAI multiplies from the right
(``x @ proj``, shape (width, dim)) and transformers applies as a bias-free linear layer (its transpose).
"""
from __future__ import annotations

import re

import torch

from ldm.util import ConfigError

FIXED = {"conv1.weight": "vision_model.embeddings.patch_embedding.weight",
         "class_embedding": "vision_model.embeddings.class_embedding",
         "positional_embedding": "vision_model.embeddings.position_embedding.weight",
         "ln_pre.weight": "vision_model.pre_layrnorm.weight", "ln_pre.bias": "vision_model.pre_layrnorm.bias",
         "ln_post.weight": "vision_model.post_layernorm.weight", "ln_post.bias": "vision_model.post_layernorm.bias"}
BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2",
         "attn.out_proj": "self_attn.out_proj"}
HF_LAYER = "vision_model.encoder.layers.{}."


def openai_to_hf(visual: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``visual.*`` tensors (prefix removed) → ``CLIPVisionModelWithProjection`` state dict."""
    out = {}
    for key, value in visual.items():
        if key in FIXED:
            out[FIXED[key]] = value
        elif key == "proj":
            out["visual_projection.weight"] = value.t().contiguous()
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.(.+)\.(weight|bias)", key):
            i, name, kind = m.groups()
            if name not in BLOCK:
                raise ConfigError(f"unknown tensor visual.{key} in the CLIP image encoder (expected OpenAI CLIP's ViT)")
            out[f"{HF_LAYER.format(i)}{BLOCK[name]}.{kind}"] = value
        elif m := re.fullmatch(r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", key):
            i, kind = m.groups()  # q, k and v stacked along the output dimension
            for part, chunk in zip("qkv", value.chunk(3, dim=0)):
                out[f"{HF_LAYER.format(i)}self_attn.{part}_proj.{kind}"] = chunk.contiguous()
        else:
            raise ConfigError(f"unknown tensor visual.{key} in the CLIP image encoder (expected OpenAI CLIP's ViT; "
                              "ResNet image towers are not supported)")
    return out


def hf_to_openai(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``CLIPVisionModelWithProjection`` state dict → ``visual.*`` names (without the ``visual.`` prefix)."""
    back = {v: k for k, v in FIXED.items()}
    out = {}
    for key, value in state.items():
        if key in back:
            out[back[key]] = value
        elif key == "visual_projection.weight":
            out["proj"] = value.t().contiguous()
        elif key.endswith("embeddings.position_ids"):
            continue  # a buffer transformers rebuilds
        elif m := re.fullmatch(r"vision_model\.encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            i, name, kind = m.groups()
            block = f"transformer.resblocks.{i}."
            if name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
                if name.endswith("q_proj"):
                    parts = [state[f"{HF_LAYER.format(i)}self_attn.{p}_proj.{kind}"] for p in "qkv"]
                    out[f"{block}attn.in_proj_{kind}"] = torch.cat(parts)
                continue
            names = {v: k for k, v in BLOCK.items()}
            if name not in names:
                raise ConfigError(f"no OpenAI CLIP name for image encoder tensor {key!r}")
            out[f"{block}{names[name]}.{kind}"] = value
        else:
            raise ConfigError(f"no OpenAI CLIP name for image encoder tensor {key!r}")
    return out
