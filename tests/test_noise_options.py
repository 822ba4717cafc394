"""The noise options of the training objective: offset noise, input perturbation, zero terminal SNR (with Min-SNR),
each off by default, and a default training step that draws exactly what it always drew."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_snr
from omegaconf import OmegaConf

from ldm.models.schedule import NoiseSchedule
from ldm.sampling import make_scheduler
from ldm.util import ConfigError
from tests.test_model import batch, tiny_model

SD2_V = "configs/sd-v2-768-v.yaml"


def replayed_step(model, x, captions, seed, extra_draws: int = 0):
    """The draws of one training step made by hand, in their documented order: posterior sample, caption-drop
    rand, noise, timesteps, then ``extra_draws`` option draws. Returns z, drop, noise, t and the extra draws."""
    g = torch.Generator().manual_seed(seed)
    z = model.first_stage_model.encode(x, g)
    drop = torch.rand(z.shape[0], generator=g) < model.cond_stage_model.ucg_rate
    noise = torch.randn(z.shape, generator=g, dtype=z.dtype)
    t = torch.randint(0, 1000, (z.shape[0],), generator=g)
    extra = []
    if extra_draws >= 1:
        extra.append(torch.randn(z.shape[:2] + (1, 1), generator=g))
    if extra_draws >= 2:
        extra.append(torch.randn(z.shape, generator=g))
    return z, drop, noise, t, extra


def test_a_default_training_step_draws_what_it_always_drew():
    """Bit for bit the loss of the step written out with the draws in their old order: the options cost nothing
    and move no draw when they are off."""
    model = tiny_model(**{"params.use_ema": False})
    b = batch()
    loss = model.diffusion_loss(b, torch.Generator().manual_seed(3))
    z, drop, noise, t, _ = replayed_step(model, b["image"], b["caption"], 3)
    pred = model.denoise(model.schedule.add_noise(z, noise, t), t, model.conditioning(b, drop))
    assert torch.equal(loss, F.mse_loss(pred.float(), noise.float()))


def test_noise_offset_shifts_each_image_channel_by_offset_times_a_normal_draw():
    s = NoiseSchedule(noise_offset=0.5)
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(512, 4, 8, 8, generator=g)
    target, given = s.training_noise(noise, g)
    shift = target - noise
    assert torch.equal(given, target)  # no perturbation: the input's noise is the target
    # One constant per image and channel: its spread over pixels is rounding only.
    assert float((shift - shift[..., :1, :1]).abs().max()) < 1e-6
    per_channel = shift[..., 0, 0].flatten()  # 2048 draws of offset * N(0, 1)
    assert per_channel.std().item() == pytest.approx(0.5, rel=0.06)
    assert abs(per_channel.mean().item()) < 0.05
    assert target.var().item() == pytest.approx(1 + 0.5 ** 2, rel=0.05)


def test_input_perturbation_noises_the_input_and_keeps_the_target():
    s = NoiseSchedule(input_perturbation=0.1)
    g = torch.Generator().manual_seed(1)
    noise = torch.randn(64, 4, 16, 16, generator=g)
    target, given = s.training_noise(noise, g)
    assert torch.equal(target, noise)
    extra = (given - noise).flatten()
    assert extra.std().item() == pytest.approx(0.1, rel=0.02)
    assert abs(torch.corrcoef(torch.stack([extra, noise.flatten()]))[0, 1].item()) < 0.02  # a fresh draw


def test_both_options_through_a_training_step(monkeypatch):
    """The UNet sees z noised with noise + offset shift + γ draw; the loss compares with noise + offset shift
    (epsilon target); the two new draws come after the old four. Validation (train=False) draws neither."""
    model = tiny_model(**{"params.use_ema": False, "params.noise_offset": 0.05, "params.input_perturbation": 0.1})
    seen = {}
    model.unet.register_forward_hook(lambda m, args, out: seen.update(z_t=args[0]))
    monkeypatch.setattr(model.schedule, "loss", lambda pred, target, t: seen.update(target=target) or pred.mean())
    b = batch()
    model.diffusion_loss(b, torch.Generator().manual_seed(5))
    z, _, noise, t, (shift, extra) = replayed_step(model, b["image"], b["caption"], 5, extra_draws=2)
    target = noise + 0.05 * shift
    assert torch.allclose(seen["target"], target, atol=1e-6)
    assert torch.allclose(seen["z_t"], model.schedule.add_noise(z, target + 0.1 * extra, t), atol=1e-6)
    assert not torch.allclose(seen["z_t"], model.schedule.add_noise(z, target, t), atol=1e-3)

    model.diffusion_loss(b, torch.Generator().manual_seed(5), train=False)
    g = torch.Generator().manual_seed(5)
    z = model.first_stage_model.encode(b["image"], g)
    noise = torch.randn(z.shape, generator=g)
    t = torch.randint(0, 1000, (2,), generator=g)
    assert torch.equal(seen["target"], noise)
    assert torch.allclose(seen["z_t"], model.schedule.add_noise(z, noise, t), atol=1e-6)


def test_zero_terminal_snr_ends_the_schedule_in_pure_noise():
    plain, zero = NoiseSchedule(parameterization="v"), NoiseSchedule(parameterization="v", zero_terminal_snr=True)
    assert plain.scheduler.alphas_cumprod[-1] > 0.004  # SD's schedule leaves signal at its last step
    assert zero.scheduler.alphas_cumprod[-1].item() == 0.0
    assert zero.scheduler.alphas_cumprod[0].item() == pytest.approx(plain.scheduler.alphas_cumprod[0].item())
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([999, 999])
    assert torch.allclose(zero.add_noise(x0, noise, t), noise)  # nothing of the image is left
    assert torch.allclose(zero.target(x0, noise, t), -x0)  # so v asks for the image itself
    assert "rescale_betas_zero_snr" not in plain.scheduler_config()


def sd2_v_model(**params):
    """The tiny SD-shaped model with SD 2.x 768-v's schedule and objective."""
    sd2 = OmegaConf.load(SD2_V).model.params
    keys = ("timesteps", "linear_start", "linear_end", "beta_schedule", "parameterization")
    return tiny_model(**{f"params.{k}": sd2[k] for k in keys}, **{f"params.{k}": v for k, v in params.items()})


def test_the_sd2_v_zero_snr_model_samples_with_the_matching_scheduler_settings():
    model = sd2_v_model(zero_terminal_snr=True)
    assert model.schedule.prediction_type == "v_prediction"
    cfg = model.sampler_config
    assert cfg["rescale_betas_zero_snr"] is True and cfg["timestep_spacing"] == "trailing"
    ddim = make_scheduler("ddim", cfg)
    ddim.set_timesteps(50)
    assert int(ddim.timesteps[0]) == 999  # sampling starts where training saw pure noise
    assert ddim.alphas_cumprod[-1].item() == 0.0
    assert torch.allclose(ddim.alphas_cumprod, model.schedule.scheduler.alphas_cumprod)
    for name in ("euler", "dpm++"):  # sigma-based: diffusers caps the last sigma (acp 2**-24) to stay finite
        other = make_scheduler(name, cfg)
        other.set_timesteps(10)
        assert int(other.timesteps[0]) == 999 and other.alphas_cumprod[-1].item() == 2.0 ** -24
    images = model.generate(["a red circle"], [0], size=16, steps=3)
    assert torch.isfinite(images).all()
    # Without the option the same model starts at 981 (leading spacing, SD's offset) with signal left.
    plain = make_scheduler("ddim", sd2_v_model().sampler_config)
    plain.set_timesteps(50)
    assert int(plain.timesteps[0]) == 981 and plain.alphas_cumprod[-1].item() > 0


def test_zero_terminal_snr_needs_v_prediction_and_a_sampler_that_rescales():
    with pytest.raises(ConfigError, match="zero_terminal_snr: true needs parameterization: v"):
        tiny_model(**{"params.zero_terminal_snr": True})
    with pytest.raises(ConfigError, match="'plms' has no rescale_betas_zero_snr"):
        make_scheduler("plms", sd2_v_model(zero_terminal_snr=True).sampler_config)


@pytest.mark.parametrize("key, value", [("noise_offset", -0.1), ("input_perturbation", "0.1")])
def test_a_bad_noise_setting_is_one_line(key, value):
    with pytest.raises(ConfigError, match=f"model.params.{key}: expected a number >= 0 .*got {value!r}"):
        NoiseSchedule(**{key: value})


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_min_snr_weights_stay_finite_at_the_snr_zero_step(parameterization):
    """SNR is 0 at the last step of a zero-SNR schedule: min(SNR, γ) / SNR would be 0/0 for epsilon. The epsilon
    weight there is its limit 1 (what trainers set with ``weights[snr == 0] = 1``); v's min(SNR, γ)/(SNR+1) is 0."""
    s = NoiseSchedule(parameterization=parameterization, snr_gamma=5.0, zero_terminal_snr=True)
    g = torch.Generator().manual_seed(2)
    pred, target = torch.randn(3, 4, 8, 8, generator=g), torch.randn(3, 4, 8, 8, generator=g)
    t = torch.tensor([999, 998, 10])
    assert compute_snr(s.scheduler, t)[0].item() == 0.0
    pred.requires_grad_(True)
    loss = s.loss(pred, target, t)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(pred.grad).all()
    last = s.loss(pred[:1], target[:1], t[:1])
    expected = F.mse_loss(pred[:1], target[:1]) if parameterization == "eps" else torch.tensor(0.0)
    assert last.item() == pytest.approx(expected.item(), rel=1e-6)
