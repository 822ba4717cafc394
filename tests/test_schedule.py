"""The training objective against diffusers: Min-SNR-γ weights as train_text_to_image.py applies them, the
v-prediction target as DDPMScheduler.get_velocity gives it, and a v-prediction model that learns and samples as one.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr
from omegaconf import OmegaConf

from ldm.data.digits import split_digits, to_model_range
from ldm.models.schedule import NoiseSchedule
from ldm.util import instantiate_from_config
from tests.conftest import REPO, main_py, run_dirs

DIGITS = REPO / "configs" / "demo" / "digits.yaml"
SCHEDULES = [dict(beta_schedule="scaled_linear", linear_start=0.00085, linear_end=0.012),
             dict(beta_schedule="squaredcos_cap_v2")]


def diffusers_min_snr_loss(pred, target, timesteps, noise_scheduler, snr_gamma):
    """diffusers examples/text_to_image/train_text_to_image.py's Min-SNR branch, written out."""
    snr = compute_snr(noise_scheduler, timesteps)
    mse_loss_weights = torch.stack([snr, snr_gamma * torch.ones_like(timesteps)], dim=1).min(dim=1)[0]
    if noise_scheduler.config.prediction_type == "epsilon":
        mse_loss_weights = mse_loss_weights / snr
    elif noise_scheduler.config.prediction_type == "v_prediction":
        mse_loss_weights = mse_loss_weights / (snr + 1)
    loss = F.mse_loss(pred.float(), target.float(), reduction="none")
    loss = loss.mean(dim=list(range(1, len(loss.shape)))) * mse_loss_weights
    return loss.mean()


def their_scheduler(prediction_type: str, beta_schedule: str, linear_start: float = 0.0001,
                    linear_end: float = 0.02) -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_start=linear_start, beta_end=linear_end,
                         beta_schedule=beta_schedule, prediction_type=prediction_type)


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"])
@pytest.mark.parametrize("parameterization", ["eps", "v"])
@pytest.mark.parametrize("gamma", [1.0, 5.0])
def test_min_snr_loss_is_diffusers_train_text_to_image(parameterization, schedule, gamma):
    ours = NoiseSchedule(parameterization=parameterization, snr_gamma=gamma, **schedule)
    theirs = their_scheduler(ours.prediction_type, **schedule)
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    t = torch.cat([torch.tensor([0, 1, 500, 998, 999]), torch.randint(0, 1000, (59,), generator=g)])
    expected = diffusers_min_snr_loss(pred, target, t, theirs, gamma)
    assert torch.allclose(ours.loss(pred, target, t), expected, rtol=1e-5, atol=0)
    # The weighting does something: neither the plain MSE nor the other parameterization's weights give this.
    assert not torch.allclose(expected, F.mse_loss(pred, target), rtol=1e-2)
    other = their_scheduler("v_prediction" if parameterization == "eps" else "epsilon", **schedule)
    assert not torch.allclose(expected, diffusers_min_snr_loss(pred, target, t, other, gamma), rtol=1e-3)
    # Per sample: a high-SNR (t=0) example is weighted down to gamma/snr (eps) or gamma/(snr+1) (v).
    one = ours.loss(pred[:1], target[:1], t[:1]) / F.mse_loss(pred[:1], target[:1])
    snr0 = compute_snr(theirs, t[:1])
    assert one.item() == pytest.approx((gamma / (snr0 + (parameterization == "v"))).item(), rel=1e-5)


def test_without_gamma_the_loss_is_plain_mse():
    s = NoiseSchedule(parameterization="v")
    pred, target = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    assert torch.equal(s.loss(pred, target, torch.tensor([0, 10, 500, 999])), F.mse_loss(pred, target))


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: s["beta_schedule"])
def test_v_target_is_diffusers_get_velocity(schedule):
    ours = NoiseSchedule(parameterization="v", **schedule)
    theirs = their_scheduler("v_prediction", **schedule)
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    t = torch.tensor([0, 1, 250, 500, 998, 999])
    assert torch.allclose(ours.target(x0, noise, t), theirs.get_velocity(x0, noise, t), atol=1e-6)
    assert torch.allclose(ours.add_noise(x0, noise, t), theirs.add_noise(x0, noise, t), atol=1e-6)
    assert not torch.allclose(ours.target(x0, noise, t), noise, atol=1e-2)  # v is not epsilon
    assert ours.scheduler_config()["prediction_type"] == "v_prediction"
    assert NoiseSchedule(parameterization="eps", **schedule).scheduler_config()["prediction_type"] == "epsilon"


def digits_model(parameterization: str, **params):
    """The digits demo's model (pixel space, 1M parameters) with ``parameterization``."""
    cfg = OmegaConf.to_container(OmegaConf.load(DIGITS).model, resolve=True)
    cfg["params"].update(parameterization=parameterization, use_ema=False, scheduler_config=None, **params)
    torch.manual_seed(0)
    return instantiate_from_config(cfg)


def digits_batch(n: int = 64) -> dict:
    images, labels = split_digits("train")
    return {"image": to_model_range(images[:n]), "caption": [f"a handwritten digit {k}" for k in labels[:n]]}


def held_out_loss(model, batch, draws: int = 8) -> float:
    """The loss on ``batch`` averaged over fixed draws of noise and timesteps (no caption dropout)."""
    with torch.no_grad():
        return float(np.mean([model.diffusion_loss(batch, torch.Generator().manual_seed(100 + i), train=False).item()
                              for i in range(draws)]))


def test_v_prediction_training_lowers_the_v_loss():
    """A few optimizer steps on real digits with the v objective (and Min-SNR weights) lower the loss on fixed
    draws; the model is learning v, not just producing a finite number."""
    torch.set_num_threads(1)
    model = digits_model("v", snr_gamma=5.0)
    model.learning_rate = 1e-3
    batch = digits_batch()
    before = held_out_loss(model, batch)
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    model.train()
    for step in range(30):
        loss = model.diffusion_loss(batch, torch.Generator().manual_seed(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
    after = held_out_loss(model, batch)
    print(f"v-prediction loss on fixed draws: {before:.4f} -> {after:.4f} after 30 steps")
    assert after < 0.7 * before, (before, after)


def oracle(model, x0: torch.Tensor, kind: str):
    """Make ``model.unet`` predict exactly what a perfect denoiser of the single image ``x0`` predicts: its noise
    (``kind="epsilon"``) or its velocity (``"v_prediction"``). A forward hook replaces the network's output, so it
    holds however the sampler calls the UNet."""
    acp = model.schedule.scheduler.alphas_cumprod

    def hook(module, args, kwargs, output):
        x = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        t = torch.as_tensor(t).long().flatten().expand(x.shape[0]) if torch.as_tensor(t).numel() == 1 else \
            torch.as_tensor(t).long()
        a = acp[t].to(x).view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        pred = eps if kind == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * x0
        if isinstance(output, tuple):
            return (pred,) + tuple(output[1:])
        output.sample = pred
        return output

    return model.unet.register_forward_hook(hook, with_kwargs=True)


def distance_to(model, x0: torch.Tensor, sampler: str) -> float:
    """Mean |sample - x0| after two sampler steps: too few for a misread prediction to be corrected late."""
    out = model.generate(["a handwritten digit 3"] * 2, [0, 1], size=8, sampler=sampler, steps=2, guidance_scale=1.0)
    return float((out - x0).abs().mean())


@pytest.fixture(scope="module")
def v_run(tmp_path_factory):
    """The digits demo config with v-prediction, a few steps through main.py: a real training checkpoint."""
    root = tmp_path_factory.mktemp("v-digits")
    proc = main_py("-t", "--no-test", "--base", DIGITS, "-l", root, "-n", "v",
                   "model.params.parameterization=v", "model.params.snr_gamma=5.0", "lightning.trainer.max_steps=4",
                   "lightning.trainer.check_val_every_n_epoch=100", "lightning.trainer.enable_progress_bar=false",
                   "lightning.callbacks.image_logger.params.batch_frequency=0",
                   "lightning.callbacks.digit_score.params.n_per_class=1",
                   "lightning.callbacks.digit_score.params.steps=2", timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (run,) = run_dirs(root)
    return run


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_model_loaded_from_a_v_checkpoint_samples_with_v_prediction(v_run, sampler):
    """With its UNet replaced by a perfect predictor of one digit, a model samples that digit only when the predictor
    gives what the model's sampler expects: the model loaded from the v run's checkpoint needs v, the same network
    built as an epsilon model needs noise. So the sampler really takes the checkpoint's prediction type."""
    from ldm.inference import load

    v_model, eps_model = load(str(v_run)), digits_model("eps")
    assert v_model.schedule.prediction_type == "v_prediction"
    x0 = to_model_range(split_digits("val")[0][:1])
    distances = {}
    for name, model in (("v model", v_model), ("eps model", eps_model)):
        for kind in ("v_prediction", "epsilon"):
            handle = oracle(model, x0, kind)
            try:
                distances[name, kind] = distance_to(model, x0, sampler)
            finally:
                handle.remove()
    print(sampler, {f"{m} given {k}": round(d, 4) for (m, k), d in distances.items()})
    # measured (ddim, dpm++): right predictor 0.007, 0.000; wrong one 0.085-0.214, 0.239-0.494
    assert distances["v model", "v_prediction"] < 0.02 and distances["eps model", "epsilon"] < 0.02
    assert distances["v model", "epsilon"] > 0.06 and distances["eps model", "v_prediction"] > 0.06
