"""Model FLOPs of one training step, counted by PyTorch's ``FlopCounterMode`` on the meta device (shapes only:
no weights, no memory, a second or two even for full-size SD v1), and model FLOP utilisation against a GPU's peak.

FLOPs are those of the model's own maths, matmuls, convolutions and attention (``FlopCounterMode`` counts these;
element-wise ops are a rounding error); gradient checkpointing's recomputed forward is not counted, as MFU
conventionally leaves it out. Measured here for SD v1 at 512²: VAE encoder 1.117 TFLOP per image, UNet forward
and backward 2.407 TFLOP, CLIP text encoder 0.013 TFLOP: caching latents removes about a third of a step's FLOPs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peak, TFLOP/s, from the vendors' data sheets (sparsity figures are twice these).
# The first row whose words all appear in torch.cuda.get_device_name() wins, so specific rows come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.0),  # SXM
    ("H200", 989.0),
    ("A100", 312.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),  # with fp32 accumulation, as PyTorch's bf16 matmuls use
    ("A10G", 125.0),
)


def peak_tflops(device_name: str) -> float | None:
    """The table's peak for a CUDA device name such as 'NVIDIA A100-SXM4-80GB', or None if it is not listed."""
    words = set(re.split(r"[\s_-]+", device_name.upper()))
    for name, tflops in PEAK_BF16_TFLOPS:
        if set(name.upper().split()) <= words:
            return tflops
    return None


def mfu(flops_per_step: float, seconds_per_step: float, peak: float) -> float:
    """Model FLOP utilisation: achieved FLOP/s over the peak (in TFLOP/s), as a fraction."""
    return flops_per_step / seconds_per_step / (peak * 1e12)


def count_flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step of ``batch_size`` images: the two frozen encoders, and the UNet's training."""
    batch_size: int
    vae_encode: int
    text_encode: int
    unet_train: int

    @property
    def online(self) -> int:
        """A step that encodes its images and captions itself."""
        return self.vae_encode + self.text_encode + self.unet_train

    @property
    def cached(self) -> int:
        """A step fed cached latents and text embeddings."""
        return self.unet_train

    @property
    def encoder_to_unet(self) -> float:
        """VAE encoder : UNet forward+backward, the share of a step that cached latents save (SD v1 at 512²: 0.46)."""
        return self.vae_encode / self.unet_train


def step_flops(model_config: dict, batch_size: int, size: int) -> StepFlops:
    """Count one step of the ``model`` config block's LatentDiffusion at ``size``² pixels, built on the meta device."""
    from ldm.util import instantiate_from_config

    cfg = {**model_config, "params": {**model_config["params"], "use_ema": False, "pretrained": None}}
    unet_cfg = cfg["params"]["unet_config"]
    # Architecture only: speed settings change time, not the model's FLOPs.
    cfg["params"]["unet_config"] = {**unet_cfg, "params": {"config": unet_cfg["params"]["config"]}}
    with torch.device("meta"):
        model = instantiate_from_config(cfg)
        images = torch.zeros(batch_size, model.first_stage_model.image_channels, size, size)
        latents = torch.zeros(model.latent_shape(batch_size, size, size))
        t = torch.zeros(batch_size, dtype=torch.long)
    captions = ["a photo of object number 0 on a table"] * batch_size
    # With SDXL's size conditioning (time ids) for the sample's size; other conditioners ignore it.
    sizes = torch.tensor([[size, size]] * batch_size)
    context = model.cond_stage_model.with_sizes(model.cond_stage_model(captions), sizes)
    # The library VAE itself: the first stage's encode turns autocast off, which the meta device refuses.
    vae = {row.diffusers: row.module for row in model.weight_components()}.get("vae")

    def unet_train():
        pred = model.denoise(latents, t, context)
        F.mse_loss(pred.float(), latents.float()).backward()

    return StepFlops(batch_size, count_flops(lambda: vae.encode(images).latent_dist.sample()) if vae else 0,
                     count_flops(lambda: model.cond_stage_model(captions)), count_flops(unet_train))
