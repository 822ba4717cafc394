"""SDXL's conditioner: two CLIP text encoders and the size micro-conditioning, as one ``Conditioner``.

SDXL (Podell et al. 2023; Stability-AI/generative-models' ``GeneralConditioner``) reads a caption with OpenAI CLIP
ViT-L/14 and OpenCLIP ViT-bigG/14. The cross-attention context is both encoders' penultimate hidden states (no
final layer norm) side by side, 768 + 1280 = 2048 wide; bigG's pooled, projected embedding (1280) is the UNet's
``text_embeds``. Each image's original size, crop top-left and target size, ``(h, w, top, left, h, w)``, are its
``time_ids``, which the UNet embeds itself (diffusers' ``addition_embed_type: text_time``).

Caption dropout zeroes what SDXL's training zeroes: the whole text conditioning of a dropped row (context and
pooled vector) is set to zero, not encoded from ""; the size conditioning is never dropped. The unconditional
baseline for guidance is the same zeros (diffusers' ``force_zeros_for_empty_prompt``, SDXL's default). One draw
per row drops both encoders together: ``GeneralConditioner`` draws per embedder, so with both at one rate a row
would be wholly unconditional, the baseline guidance uses, only rate² of the time.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from ldm.models.conditioners import truncation_warnings
from ldm.models.parts import Conditioner, Conditioning, WeightComponent, context_of
from ldm.models.pretrained import build_or_load
from ldm.models.tokenizer import clip_tokenizer
from ldm.util import ConfigError

ENCODERS = ("text_encoder", "text_encoder_2")  # diffusers' component names, also the names ``trainable`` takes


class SDXLTextConditioner(Conditioner):
    """Captions → ``{"context": (B, 77, D1 + D2), "text_embeds": (B, P)}``; ``with_sizes`` adds ``time_ids``.

    Args:
        config, config_2: ``CLIPTextConfig`` keyword arguments of the CLIP ViT-L (``text_encoder``) and OpenCLIP
            bigG (``text_encoder_2``, with its projection) towers, used when there is no ``pretrained`` folder.
        pretrained: a diffusers SDXL pipeline folder (``text_encoder/``, ``text_encoder_2/``, ``tokenizer*/``).
        tokenizer, tokenizer_2: tokenizer folders; by default the pretrained folder's, or OpenAI CLIP's rebuilt
            offline (bigG pads with ``!``, id 0, as SDXL's ``tokenizer_2`` does).
        trainable: ``false``, ``true`` (both encoders) or a list of ``text_encoder`` / ``text_encoder_2``.
        ucg_rate: probability of zeroing a row's text conditioning during training (classifier-free guidance).
        sample_original_size, sample_crop_top_left: the size conditioning samples are drawn with; by default
            the sample's own size and crop (0, 0) (diffusers' default: (1024, 1024, 0, 0, 1024, 1024) at 1024 px).
    """

    kind = "text"
    DIFFUSERS = {"text_encoder": "transformer.", "text_encoder_2": "transformer_2."}

    def __init__(self, config: dict | None = None, config_2: dict | None = None, pretrained: str | None = None,
                 tokenizer: str | None = None, tokenizer_2: str | None = None, max_length: int = 77,
                 trainable: bool | Sequence[str] = False, ucg_rate: float = 0.0,
                 sample_original_size: Sequence[int] | None = None, sample_crop_top_left: Sequence[int] = (0, 0)):
        super().__init__()
        self.transformer = build_or_load(CLIPTextModel, config, pretrained, "text_encoder",
                                         config_class=CLIPTextConfig)
        self.transformer_2 = build_or_load(CLIPTextModelWithProjection, config_2, pretrained, "text_encoder_2",
                                           config_class=CLIPTextConfig)
        self.tokenizer = clip_tokenizer(_tokenizer_folder(tokenizer, pretrained, "tokenizer"), "<|endoftext|>",
                                        max_length)
        self.tokenizer_2 = clip_tokenizer(_tokenizer_folder(tokenizer_2, pretrained, "tokenizer_2"), "!", max_length)
        self.max_length, self.ucg_rate = max_length, ucg_rate
        self.sample_original_size = _pair(sample_original_size, "sample_original_size")
        self.sample_crop_top_left = _pair(sample_crop_top_left, "sample_crop_top_left")
        self.set_trainable(trainable)

    # ---- which encoders train -------------------------------------------------------------------------------
    def encoders(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.transformer, "text_encoder_2": self.transformer_2}

    def set_trainable(self, trainable) -> None:
        if isinstance(trainable, str):
            trainable = [trainable]
        names = set(ENCODERS) if trainable is True else set(trainable or ())
        if names - set(ENCODERS):
            raise ConfigError(f"SDXLTextConditioner: trainable takes true, false or a list of {', '.join(ENCODERS)}; "
                              f"got {sorted(names - set(ENCODERS))}")
        self.trained = names
        self.trainable = bool(names)
        for name, encoder in self.encoders().items():
            encoder.requires_grad_(name in names)
        self.train(self.training)

    def train(self, mode: bool = True):
        nn.Module.train(self, mode and self.trainable)
        for name, encoder in self.encoders().items():
            # LoRA on the text encoders (ldm.lora) marks the conditioner trainable without naming an encoder.
            encoder.train(mode and self.trainable and (not self.trained or name in self.trained))
        return self

    # ---- encoding ---------------------------------------------------------------------------------------------
    @property
    def pooled_dim(self) -> int:
        return int(self.transformer_2.config.projection_dim)

    @property
    def context_dim(self) -> int:
        return int(self.transformer.config.hidden_size + self.transformer_2.config.hidden_size)

    def _ids(self, tokenizer, captions: Sequence[str]) -> torch.Tensor:
        return tokenizer(list(captions), padding="max_length", max_length=self.max_length, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)

    def forward(self, captions: Sequence[str], drop: torch.Tensor | None = None) -> Conditioning:
        """Encode captions; rows where ``drop`` is true are zeros (context and pooled vector), as in SDXL."""
        with torch.set_grad_enabled(self.trainable and torch.is_grad_enabled()):
            first = self.transformer(self._ids(self.tokenizer, captions), output_hidden_states=True)
            second = self.transformer_2(self._ids(self.tokenizer_2, captions), output_hidden_states=True)
            context = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
            pooled = second.text_embeds
            if drop is not None:
                keep = (~drop.to(context.device)).to(context.dtype)
                context, pooled = context * keep.view(-1, 1, 1), pooled * keep.view(-1, 1)
        return {"context": context, "text_embeds": pooled}

    def unconditional(self, batch_size: int) -> Conditioning:
        dtype = self.transformer_2.dtype
        return {"context": torch.zeros(batch_size, self.max_length, self.context_dim, device=self.device, dtype=dtype),
                "text_embeds": torch.zeros(batch_size, self.pooled_dim, device=self.device, dtype=dtype)}

    def negative(self, prompt: str, batch_size: int) -> Conditioning:
        return self([prompt] * batch_size)

    def with_sizes(self, cond: Conditioning, target_size: torch.Tensor, original_size: torch.Tensor | None = None,
                   crop_top_left: torch.Tensor | None = None) -> Conditioning:
        """``time_ids`` = original ``(h, w)``, crop ``(top, left)``, target ``(h, w)`` per row, in that order."""
        context = context_of(cond)
        target = torch.as_tensor(target_size).to(context.device).view(-1, 2)
        original = target if original_size is None else torch.as_tensor(original_size).to(context.device).view(-1, 2)
        crop = torch.zeros_like(target) if crop_top_left is None else \
            torch.as_tensor(crop_top_left).to(context.device).view(-1, 2)
        # fp32 whatever the context's dtype: bf16 would round an original size such as 667 to 668 (the UNet embeds
        # the ids in fp32 anyway).
        return {**cond, "time_ids": torch.cat([original, crop, target], dim=1).float()}

    def sample_sizes(self, height: int, width: int) -> tuple[tuple[int, int], tuple[int, int]]:
        return self.sample_original_size or (height, width), self.sample_crop_top_left or (0, 0)

    def prompt_warnings(self, prompts: Sequence[str]) -> list[str]:
        return truncation_warnings(self.tokenizer, self.max_length, prompts)  # one vocabulary for both

    # ---- declarations -----------------------------------------------------------------------------------------
    def description(self) -> str:
        return "CLIP + OpenCLIP text encoders (SDXL)"

    def lora_modules(self) -> dict[str, nn.Module]:
        return dict(self.encoders())

    def weight_components(self) -> list[WeightComponent]:
        return [WeightComponent("transformer.", "text_encoder", "sdxl_clip_text", self.transformer),
                WeightComponent("transformer_2.", "text_encoder_2", "sdxl_open_clip_text", self.transformer_2)]

    def write_diffusers(self, out: Path) -> dict[str, list]:
        from ldm.models.tokenizer import write_clip_vocab

        self.transformer.config.architectures = ["CLIPTextModel"]
        self.transformer.config.save_pretrained(out / "text_encoder")
        self.transformer_2.config.architectures = ["CLIPTextModelWithProjection"]
        self.transformer_2.config.save_pretrained(out / "text_encoder_2")
        for name, tokenizer in (("tokenizer", self.tokenizer), ("tokenizer_2", self.tokenizer_2)):
            tokenizer.save_pretrained(out / name)
            write_clip_vocab(out / name)  # BPE files too, for loaders that do not read tokenizer.json
        return {"_class_name": "StableDiffusionXLPipeline", "feature_extractor": [None, None],
                "image_encoder": [None, None], "force_zeros_for_empty_prompt": True,
                "requires_safety_checker": None,  # no such setting in an SDXL pipeline
                "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer_2": ["transformers", "CLIPTokenizer"]}


def _tokenizer_folder(given: str | None, pretrained: str | None, name: str) -> str | None:
    if given is None and pretrained is not None and (Path(pretrained) / name).is_dir():
        return str(Path(pretrained) / name)
    return given


def _pair(value, key: str) -> tuple[int, int] | None:
    if value is None:
        return None
    if len(value) != 2:
        raise ConfigError(f"SDXLTextConditioner: {key} is (h, w) or (top, left), two numbers; got {list(value)}")
    return int(value[0]), int(value[1])
