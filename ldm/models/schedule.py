"""The DDPM noise schedule, the training target (epsilon or v), the training noise and the loss.

Betas and noising come from diffusers' ``DDPMScheduler`` so training and sampling share one definition of
the schedule; the defaults are SD v1's (scaled-linear 0.00085 → 0.012 over 1000 steps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

from ldm.util import ConfigError

PARAMETERIZATIONS = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


class NoiseSchedule:
    """``noise_offset`` adds ``offset * randn(B, C, 1, 1)`` to the noise (one shift per image and channel), so the
    model can learn images much darker or brighter than average; ``input_perturbation`` noises the input with
    ``noise + γ * randn_like(noise)`` while the target keeps ``noise`` (Ning et al. 2023); ``zero_terminal_snr``
    rescales the betas so the last timestep is pure noise (Lin et al. 2023, diffusers' ``rescale_betas_zero_snr``)."""

    def __init__(self, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", parameterization: str = "eps", snr_gamma: float | None = None,
                 noise_offset: float = 0.0, input_perturbation: float = 0.0, zero_terminal_snr: bool = False):
        if parameterization not in PARAMETERIZATIONS:
            raise ConfigError(f"model.params.parameterization must be one of {sorted(PARAMETERIZATIONS)}, "
                              f"got {parameterization!r}")
        self.prediction_type = PARAMETERIZATIONS[parameterization]
        self.snr_gamma = snr_gamma
        for key, value in (("noise_offset", noise_offset), ("input_perturbation", input_perturbation)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
                raise ConfigError(f"model.params.{key}: expected a number >= 0 (0 is off), got {value!r}")
        self.noise_offset, self.input_perturbation = float(noise_offset), float(input_perturbation)
        self.zero_terminal_snr = bool(zero_terminal_snr)
        self.scheduler = DDPMScheduler(num_train_timesteps=timesteps, beta_start=linear_start, beta_end=linear_end,
                                       beta_schedule=beta_schedule, prediction_type=self.prediction_type,
                                       clip_sample=False, rescale_betas_zero_snr=self.zero_terminal_snr)
        self.num_timesteps = timesteps
        alphas_cumprod = self.scheduler.alphas_cumprod
        self.snr = alphas_cumprod / (1 - alphas_cumprod)

    def scheduler_config(self) -> dict:
        """The settings a sampler (any diffusers scheduler) needs to match this training schedule. A zero-SNR
        schedule also needs its samplers to rescale the same way and to start at the last timestep (``trailing``
        spacing), where the model learnt to start from pure noise."""
        cfg = self.scheduler.config
        settings = {"num_train_timesteps": cfg.num_train_timesteps, "beta_start": cfg.beta_start,
                    "beta_end": cfg.beta_end, "beta_schedule": cfg.beta_schedule, "prediction_type": cfg.prediction_type}
        if self.zero_terminal_snr:
            settings.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
        return settings

    def sample_timesteps(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def training_noise(self, noise: torch.Tensor, generator: torch.Generator | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(target noise, input noise)`` from a standard normal draw, with the offset and the perturbation when
        they are on. Their draws come after every other draw of a training step, and none is made when both are
        off, so a default run draws exactly what it always did."""
        if self.noise_offset:
            shift = torch.randn(noise.shape[:2] + (1,) * (noise.ndim - 2), device=noise.device, dtype=noise.dtype,
                                generator=generator)
            noise = noise + self.noise_offset * shift
        if not self.input_perturbation:
            return noise, noise
        extra = torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
        return noise, noise + self.input_perturbation * extra

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(x0, noise, t)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean squared error, optionally Min-SNR-γ weighted (Hang et al. 2023) per sample, as diffusers'
        train_text_to_image.py weights it: SNR from ``diffusers.training_utils.compute_snr``, weight
        min(SNR, γ) / SNR for epsilon and min(SNR, γ) / (SNR + 1) for v-prediction. The epsilon weight is
        written min(1, γ / SNR), the same number, which is also right (1) where a zero-SNR schedule has SNR 0."""
        if self.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        from diffusers.training_utils import compute_snr

        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        snr = compute_snr(self.scheduler, t)
        if self.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=self.snr_gamma) / (snr + 1)
        else:
            weight = torch.clamp(self.snr_gamma / snr, max=1.0)
        return (per_sample * weight).mean()
