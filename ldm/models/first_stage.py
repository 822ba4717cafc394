"""First stages: map images in [-1, 1] to the space the denoiser works in, and back."""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL
from diffusers.utils.torch_utils import randn_tensor

from ldm.models.parts import FirstStage, WeightComponent
from ldm.models.pretrained import build_or_load


class AutoencoderKLFirstStage(FirstStage):
    """The SD VAE, frozen, with the latent scale factor (0.18215 for SD v1, 0.13025 for SDXL).

    Encoding and decoding always run in float32, even under mixed precision: the SD v1 VAE overflows in fp16.
    """

    def __init__(self, config: dict | None = None, pretrained: str | None = None, subfolder: str = "vae",
                 scale_factor: float = 0.18215, sample_posterior: bool = True):
        super().__init__()
        self.vae = build_or_load(AutoencoderKL, config, pretrained, subfolder)
        self.scale_factor = scale_factor
        self.sample_posterior = sample_posterior
        self.freeze()

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def image_channels(self) -> int:
        return self.vae.config.in_channels

    DIFFUSERS = {"vae": "vae."}

    def weight_components(self) -> list[WeightComponent]:
        return [WeightComponent("vae.", "vae", "vae", self.vae)]

    def write_diffusers(self, out: Path) -> dict[str, list]:
        self.vae.register_to_config(scaling_factor=self.scale_factor)  # the pipeline reads the factor here
        self.vae.save_config(out / "vae")
        return {"vae": ["diffusers", "AutoencoderKL"]}

    @torch.no_grad()
    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            dist = self.vae.encode(x.float()).latent_dist
        return torch.cat([dist.mean, dist.std], dim=1)

    @torch.no_grad()
    def sample_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        mean, std = moments.float().chunk(2, dim=1)
        if self.sample_posterior:  # diffusers' DiagonalGaussianDistribution.sample: the same draw
            mean = mean + std * randn_tensor(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return mean * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        with torch.autocast(z.device.type, enabled=False):
            return self.vae.decode(z.float() / self.scale_factor).sample


class IdentityFirstStage(FirstStage):
    """Pixel-space diffusion: the denoiser sees the images themselves.

    With ``channels: 1`` RGB batches (every image file is read as RGB) are averaged to gray, so a gray model
    trains on folders of PNGs such as its own samples or DreamBooth photos."""

    def __init__(self, channels: int = 3, pretrained: str | None = None):
        super().__init__()
        self.latent_channels = self.image_channels = channels
        self.downsample = 1
        self.scale_factor = 1.0

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        if self.latent_channels == 1 and x.shape[1] == 3:
            return x.mean(dim=1, keepdim=True)
        return x

    def encode_moments(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encode(x)
        return torch.cat([z, torch.zeros_like(z)], dim=1)

    def sample_moments(self, moments: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return moments.chunk(2, dim=1)[0]  # no posterior: nothing to draw

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z
