"""Conditioners turn a batch's condition (captions, images) into the cross-attention context.

Each conditioner knows its own condition dropout (``ucg_rate``, for classifier-free guidance) and whether
it is trained, so "freeze this, drop that 10% of the time" is config rather than code.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from ldm.models.pretrained import build_or_load
from ldm.models.tokenizer import clip_tokenizer


class CLIPTextConditioner(nn.Module):
    """CLIP text encoder + tokenizer: captions → (B, 77, D) token embeddings (D = 768 for SD v1).

    Args:
        config: ``CLIPTextConfig`` keyword arguments, used when there is no ``pretrained`` folder.
        pretrained: a diffusers pipeline folder holding ``text_encoder/`` (and ``tokenizer/``).
        tokenizer: a tokenizer folder; by default ``pretrained/tokenizer`` or OpenAI CLIP's rebuilt offline.
        layer: ``last`` (SD v1) or ``penultimate`` (hidden state before the last block, then final layer norm).
        trainable: train the text encoder along with the UNet.
        ucg_rate: probability of replacing a caption with "" during training.
    """

    def __init__(self, config: dict | None = None, pretrained: str | None = None, subfolder: str = "text_encoder",
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
        self.trainable = trainable
        self.ucg_rate = ucg_rate
        if not trainable:
            self.transformer.eval()
            self.transformer.requires_grad_(False)

    def train(self, mode: bool = True):
        return super().train(mode and self.trainable)

    @property
    def device(self) -> torch.device:
        return self.transformer.device

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

    def unconditional(self, batch_size: int) -> torch.Tensor:
        return self(["" for _ in range(batch_size)])
