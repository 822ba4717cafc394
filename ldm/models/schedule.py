"""The DDPM noise schedule, the training target (epsilon or v) and the loss.

Betas and noising come from diffusers' ``DDPMScheduler`` so training and sampling share one definition of
the schedule; the defaults are SD v1's (scaled-linear 0.00085 → 0.012 over 1000 steps).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler

PARAMETERIZATIONS = {"eps": "epsilon", "epsilon": "epsilon", "v": "v_prediction", "v_prediction": "v_prediction"}


class NoiseSchedule:
    def __init__(self, timesteps: int = 1000, linear_start: float = 0.00085, linear_end: float = 0.012,
                 beta_schedule: str = "scaled_linear", parameterization: str = "eps", snr_gamma: float | None = None):
        if parameterization not in PARAMETERIZATIONS:
            raise ValueError(f"parameterization must be one of {sorted(PARAMETERIZATIONS)}, got {parameterization!r}")
        self.prediction_type = PARAMETERIZATIONS[parameterization]
        self.snr_gamma = snr_gamma
        self.scheduler = DDPMScheduler(num_train_timesteps=timesteps, beta_start=linear_start, beta_end=linear_end,
                                       beta_schedule=beta_schedule, prediction_type=self.prediction_type,
                                       clip_sample=False)
        self.num_timesteps = timesteps
        alphas_cumprod = self.scheduler.alphas_cumprod
        self.snr = alphas_cumprod / (1 - alphas_cumprod)

    def scheduler_config(self) -> dict:
        """The settings a sampler (any diffusers scheduler) needs to match this training schedule."""
        cfg = self.scheduler.config
        return {"num_train_timesteps": cfg.num_train_timesteps, "beta_start": cfg.beta_start, "beta_end": cfg.beta_end,
                "beta_schedule": cfg.beta_schedule, "prediction_type": cfg.prediction_type}

    def sample_timesteps(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (batch_size,), device=device, generator=generator)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.scheduler.add_noise(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return noise
        return self.scheduler.get_velocity(x0, noise, t)

    def loss(self, pred: torch.Tensor, target: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Mean squared error, optionally Min-SNR-γ weighted (Hang et al. 2023) per sample, as diffusers'
        train_text_to_image.py weights it: SNR from ``diffusers.training_utils.compute_snr``, weight
        min(SNR, γ) / SNR for epsilon and min(SNR, γ) / (SNR + 1) for v-prediction."""
        if self.snr_gamma is None:
            return F.mse_loss(pred.float(), target.float())
        from diffusers.training_utils import compute_snr

        per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=tuple(range(1, pred.ndim)))
        snr = compute_snr(self.scheduler, t)
        weight = torch.clamp(snr, max=self.snr_gamma) / (snr + 1 if self.prediction_type == "v_prediction" else snr)
        return (per_sample * weight).mean()
