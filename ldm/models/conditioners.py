"""Conditioners turn a batch's condition (captions, images) into the cross-attention context.

Each conditioner knows its own condition dropout (``ucg_rate``, for classifier-free guidance) and whether
it is trained, so "freeze this, drop that 10% of the time" is config rather than code. What they offer the
rest of the project is declared in ``ldm.models.parts.Conditioner``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

from ldm.models.parts import Conditioner, WeightComponent
from ldm.models.pretrained import build_or_load
from ldm.models.tokenizer import clip_tokenizer
from ldm.util import ConfigError


class CLIPTextConditioner(Conditioner):
    """CLIP text encoder + tokenizer: captions → (B, 77, D) token embeddings (D = 768 for SD v1).

    Args:
        config: ``CLIPTextConfig`` keyword arguments, used when there is no ``pretrained`` folder.
        pretrained: a diffusers pipeline folder holding ``text_encoder/`` (and ``tokenizer/``).
        tokenizer: a tokenizer folder; by default ``pretrained/tokenizer`` or OpenAI CLIP's rebuilt offline.
        layer: ``last`` (SD v1) or ``penultimate`` (hidden state before the last block, then final layer norm).
        trainable: train the text encoder along with the UNet.
        ucg_rate: probability of replacing a caption with "" during training.
    """

    def __init__(self, config: dict | None = None, pretrained: str | None = None, subfolder: str | None = "text_encoder",
                 tokenizer: str | None = None, pad_token: str = "<|endoftext|>", max_length: int = 77,
                 layer: str = "last", trainable: bool = False, ucg_rate: float = 0.0):
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"CLIPTextConditioner: layer must be 'last' or 'penultimate', got {layer!r}")
        self.transformer = build_or_load(CLIPTextModel, config, pretrained, subfolder, config_class=CLIPTextConfig)
        if tokenizer is None and pretrained is not None and (Path(pretrained) / "tokenizer").is_dir():
            tokenizer = str(Path(pretrained) / "tokenizer")
        self.tokenizer = clip_tokenizer(tokenizer, pad_token=pad_token, max_length=max_length)
        self.max_length = max_length
        self.layer = layer
        self.ucg_rate = ucg_rate
        self.set_trainable(trainable)

    def tokenize(self, captions: Sequence[str]) -> torch.Tensor:
        ids = self.tokenizer(list(captions), padding="max_length", max_length=self.max_length,
                             truncation=True, return_tensors="pt").input_ids
        return ids.to(self.device)

    def forward(self, captions: Sequence[str], drop: torch.Tensor | None = None) -> torch.Tensor:
        """Encode captions; rows where ``drop`` is true are encoded as the empty caption."""
        if drop is not None:
            captions = ["" if d else c for c, d in zip(captions, drop.tolist())]
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            ids = self.tokenize(captions)
            if self.layer == "last":
                return self.transformer(ids).last_hidden_state
            out = self.transformer(ids, output_hidden_states=True)
            final_norm = getattr(self.transformer, "text_model", self.transformer).final_layer_norm
            return final_norm(out.hidden_states[-2])

    kind = "text"
    DIFFUSERS = {"text_encoder": "transformer."}  # pipeline folder component → prefix inside this conditioner

    def unconditional(self, batch_size: int) -> torch.Tensor:
        return self(["" for _ in range(batch_size)])

    def negative(self, prompt: str, batch_size: int) -> torch.Tensor:
        return self([prompt] * batch_size)

    @property
    def is_open_clip(self) -> bool:
        """OpenCLIP's text towers (SD 2.x) use GELU; OpenAI CLIP's (SD v1) quick-GELU."""
        return self.transformer.config.hidden_act == "gelu"

    def description(self) -> str:
        return f"{'OpenCLIP' if self.is_open_clip else 'CLIP'} text encoder"

    def lora_modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.transformer}

    def weight_components(self) -> list[WeightComponent]:
        return [WeightComponent("transformer.", "text_encoder", "open_clip_text" if self.is_open_clip else "clip_text",
                                self.transformer)]

    def prompt_warnings(self, prompts: Sequence[str]) -> list[str]:
        return truncation_warnings(self.tokenizer, self.max_length, prompts)

    def write_diffusers(self, out: Path) -> dict[str, list]:
        from ldm.models.tokenizer import write_clip_vocab

        self.transformer.config.architectures = ["CLIPTextModel"]
        self.transformer.config.save_pretrained(out / "text_encoder")
        self.tokenizer.save_pretrained(out / "tokenizer")
        write_clip_vocab(out / "tokenizer")  # BPE files too, for loaders that do not read tokenizer.json
        return {"_class_name": "StableDiffusionPipeline", "feature_extractor": [None, None],
                "image_encoder": [None, None], "safety_checker": [None, None],
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"]}


def truncation_warnings(tokenizer, limit: int, prompts: Sequence[str]) -> list[str]:
    """One line per distinct prompt longer than the encoder reads, saying where it was cut."""
    lines = []
    for prompt in dict.fromkeys(prompts):
        ids = tokenizer(prompt, truncation=False, verbose=False).input_ids  # start and end tokens included
        if len(ids) <= limit:
            continue
        kept = tokenizer.decode(ids[1:limit - 1]).split()
        dropped = tokenizer.decode(ids[limit - 1:-1])
        dropped = dropped if len(dropped) <= 80 else dropped[:77] + "..."
        lines.append(f"warning: prompt {prompt[:40]!r}... is {len(ids) - 2} tokens but the text encoder reads "
                     f"{limit - 2}: truncated after word {len(kept)} ('... {' '.join(kept[-4:])}'), dropping "
                     f"{len(ids) - limit} tokens: {dropped!r}")
    return lines


# OpenAI CLIP's normalisation (the values in every CLIP ViT's preprocessor_config.json).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_image_preprocess(images: torch.Tensor, size: int = 224, interpolation: str = "bicubic",
                          antialias: bool = True, mean: Sequence[float] = CLIP_MEAN,
                          std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """(B,C,H,W) images in [-1, 1] → CLIP pixel values: shortest side resized to ``size``, centre-cropped to
    ``size``×``size``, then normalised with ``mean``/``std``.

    Done in torch on the model's device, so training and sampling run literally the same code; ``interpolation``
    and ``antialias`` are explicit because a train/sample mismatch there (the original recipe trained without
    antialias and sampled with it) silently blurs every variation.
    """
    x = (images.float() + 1) / 2
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        aa = antialias and interpolation in ("bilinear", "bicubic")  # torch supports antialias for these two only
        kwargs = {} if interpolation in ("nearest", "area") else {"align_corners": False}
        x = F.interpolate(x, size=(new_h, new_w), mode=interpolation, antialias=aa, **kwargs)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0, 1)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean_t) / std_t


class CLIPImageConditioner(Conditioner):
    """CLIP image encoder + projection: images → (B, 1, D) projected image embeddings (D = 768 for ViT-L/14),
    the context of the image-variations model; the unconditional context is zeros of that shape.

    The condition is the batch's image itself in [-1, 1] (``cond_stage_key: image``); the conditioner does its
    own CLIP preprocessing (:func:`clip_image_preprocess`) with the settings given here, which the checkpoint
    stores with the rest of the config, so sampling resizes exactly as training did.

    Args:
        config: ``CLIPVisionConfig`` keyword arguments, used when there is no ``pretrained`` folder.
        pretrained: a diffusers image-variations folder holding ``image_encoder/``.
        image_size: side of the encoder's input (224 for ViT-L/14); defaults to the encoder config's.
        interpolation: ``bicubic``/``bilinear``/``nearest``/``area`` (``torch.nn.functional.interpolate`` modes).
        antialias: antialiased downsizing (bilinear/bicubic only).
        mean, std: per-channel normalisation (OpenAI CLIP's by default).
        trainable: train the image encoder along with the UNet.
        ucg_rate: probability of replacing a row's embedding with zeros during training.
    """

    def __init__(self, config: dict | None = None, pretrained: str | None = None, subfolder: str | None = "image_encoder",
                 image_size: int | None = None, interpolation: str = "bicubic", antialias: bool = True,
                 mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD, trainable: bool = False,
                 ucg_rate: float = 0.0):
        super().__init__()
        if interpolation not in ("bicubic", "bilinear", "nearest", "area"):
            raise ConfigError(f"CLIPImageConditioner: interpolation must be bicubic, bilinear, nearest or area, "
                              f"got {interpolation!r}")
        self.encoder = build_or_load(CLIPVisionModelWithProjection, config, pretrained, subfolder,
                                     config_class=CLIPVisionConfig)
        self.image_size = int(image_size or self.encoder.config.image_size)
        self.interpolation, self.antialias = interpolation, bool(antialias)
        self.mean, self.std = tuple(mean), tuple(std)
        self.ucg_rate = ucg_rate
        self.set_trainable(trainable)

    @property
    def embed_dim(self) -> int:
        return int(self.encoder.config.projection_dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """[-1, 1] images → the encoder's pixel values, exactly as in training."""
        return clip_image_preprocess(images.to(self.device), self.image_size, self.interpolation, self.antialias,
                                     self.mean, self.std)

    def forward(self, images: torch.Tensor, drop: torch.Tensor | None = None) -> torch.Tensor:
        """Encode images; rows where ``drop`` is true become the zero (unconditional) embedding."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            pixels = self.preprocess(images).to(self.encoder.dtype)
            emb = self.encoder(pixel_values=pixels).image_embeds.unsqueeze(1)
        if drop is not None:
            emb = torch.where(drop.to(emb.device).view(-1, 1, 1), torch.zeros_like(emb), emb)
        return emb

    kind = "image"
    DIFFUSERS = {"image_encoder": "encoder."}

    def unconditional(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(batch_size, 1, self.embed_dim, device=self.device, dtype=self.encoder.dtype)

    def description(self) -> str:
        return "CLIP image encoder"

    def input_channels(self) -> int:
        return int(self.encoder.config.num_channels)

    def weight_components(self) -> list[WeightComponent]:
        return [WeightComponent("encoder.", "image_encoder", "clip_visual", self.encoder)]

    def write_diffusers(self, out: Path) -> dict[str, list]:
        """image_encoder/ config and feature_extractor/ (a CLIPImageProcessor with this conditioner's resize
        filter, size and normalisation: what StableDiffusionImageVariationPipeline preprocesses PIL inputs with)."""
        from transformers import CLIPImageProcessor

        self.encoder.config.architectures = ["CLIPVisionModelWithProjection"]
        self.encoder.config.save_pretrained(out / "image_encoder")
        CLIPImageProcessor(size={"shortest_edge": self.image_size},
                           crop_size={"height": self.image_size, "width": self.image_size},
                           resample=PIL_RESAMPLE.get(self.interpolation, 3), image_mean=list(self.mean),
                           image_std=list(self.std)).save_pretrained(out / "feature_extractor")
        return {"_class_name": "StableDiffusionImageVariationPipeline",
                "feature_extractor": ["transformers", "CLIPImageProcessor"],
                "image_encoder": ["transformers", "CLIPVisionModelWithProjection"], "safety_checker": [None, None]}


# PIL filter numbers for CLIPImageProcessor's ``resample``.
PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3}
