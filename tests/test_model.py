"""The LatentDiffusion parts a fine-tuning user relies on: what trains, what stays frozen, EMA, schedules, conditioning."""
import copy

import pytest
import torch
from omegaconf import OmegaConf

from ldm.lr_scheduler import LambdaLinearScheduler
from ldm.models.ema import EMA
from ldm.models.schedule import NoiseSchedule
from ldm.models.trainable import select_trainable
from ldm.util import ConfigError, instantiate_from_config

TINY = "configs/tiny/tiny-sd.yaml"


def tiny_model(**overrides):
    cfg = OmegaConf.load(TINY).model
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value, force_add=True)
    torch.manual_seed(0)
    return instantiate_from_config(OmegaConf.to_container(cfg, resolve=True))


def batch(n=2, size=16):
    g = torch.Generator().manual_seed(1)
    return {"image": torch.rand(n, 3, size, size, generator=g) * 2 - 1, "caption": ["a red circle", "a blue square"][:n]}


def train_steps(model, steps=2):
    opt = model.configure_optimizers()
    opt = opt["optimizer"] if isinstance(opt, dict) else opt
    for _ in range(steps):
        loss = model.diffusion_loss(batch())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return opt


def test_cross_attention_only_training_leaves_everything_else_bit_identical():
    model = tiny_model(**{"params.trainable": "attn2", "params.use_ema": False})
    before = copy.deepcopy(model.state_dict())
    opt = train_steps(model)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed, "cross-attention weights should change"
    assert all(".attn2." in k for k in changed), sorted(changed)[:5]
    assert any(k.startswith("unet.") and ".attn2.to_k" in k for k in changed)
    # The optimizer holds state only for the trained parameters.
    trained = {id(p) for n, p in model.unet.named_parameters() if ".attn2." in n}
    assert {id(p) for p in opt.state} == trained


def test_frozen_vae_and_text_encoder_get_no_gradients_and_stay_in_eval_mode():
    model = tiny_model()
    model.train()
    assert not model.first_stage_model.training and not model.cond_stage_model.transformer.training
    model.diffusion_loss(batch()).backward()
    assert all(p.grad is None for p in model.first_stage_model.parameters())
    assert all(p.grad is None for p in model.cond_stage_model.parameters())
    assert any(p.grad is not None for p in model.unet.parameters())


def test_trainable_text_encoder_gets_gradients_and_optimizer_state():
    model = tiny_model(**{"params.cond_stage_config.params.trainable": True})
    model.train()
    assert model.cond_stage_model.transformer.training
    opt = train_steps(model, 1)
    te = {id(p) for p in model.cond_stage_model.parameters()}
    assert te & {id(p) for p in opt.state}


def test_trainable_patterns_and_bad_preset():
    unet = tiny_model().unet
    names = select_trainable(unet, ["*attn2.to_k*", "*attn2.to_v*"])
    assert names and all(("attn2.to_k" in n or "attn2.to_v" in n) for n in names)
    with pytest.raises(ConfigError, match="unknown preset"):
        select_trainable(unet, "attn3")
    with pytest.raises(ConfigError, match="match no parameter"):
        select_trainable(unet, ["*nothing*"])


def test_conditioner_gives_77_tokens_and_drops_captions_to_empty():
    cond = tiny_model().cond_stage_model
    ctx = cond(["a photo of a dog", "a painting"])
    assert ctx.shape == (2, 77, 32)
    dropped = cond(["a photo of a dog", "a painting"], drop=torch.tensor([True, False]))
    assert torch.allclose(dropped[0], cond.unconditional(1)[0])
    assert torch.allclose(dropped[1], ctx[1])


def test_ema_tracks_weights_and_swaps_in_and_out_exactly():
    model = tiny_model(**{"params.ema_decay": 0.5})
    ema = model.model_ema
    train_steps(model, 1)
    raw = {k: v.clone() for k, v in model.unet.state_dict().items()}
    ema.update(model.unet)
    with model.ema_scope():
        inside = {k: v.clone() for k, v in model.unet.state_dict().items()}
    after = model.unet.state_dict()
    assert all(torch.equal(after[k], raw[k]) for k in raw), "training weights must come back exactly"
    assert any(not torch.equal(inside[k], raw[k]) for k in raw), "EMA weights differ from the raw ones"
    assert "model_ema.num_updates" in model.state_dict()


def test_ema_decay_warmup_and_average():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(lin, decay=0.9, warmup=False)
    start = lin.weight.detach().clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)
    assert torch.allclose(ema.weight, start + 0.1)
    assert EMA(lin, decay=0.9999, warmup=True).current_decay() == pytest.approx(0.1)


def test_warmup_then_constant_learning_rate():
    f = LambdaLinearScheduler(warm_up_steps=[100], f_start=[1e-6], f_max=[1.0], f_min=[1.0], cycle_lengths=[10**13])
    assert f(0) == pytest.approx(1e-6)
    assert f(50) == pytest.approx(0.5, abs=1e-5)
    assert f(100) == f(10_000) == 1.0


@pytest.mark.parametrize("parameterization", ["eps", "v"])
def test_training_target_matches_parameterization(parameterization):
    s = NoiseSchedule(parameterization=parameterization)
    x0, noise = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    t = torch.tensor([0, 500, 999])
    target = s.target(x0, noise, t)
    if parameterization == "eps":
        assert torch.equal(target, noise)
    else:
        a = s.scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
        b = (1 - s.scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
        assert torch.allclose(target, a * noise - b * x0, atol=1e-6)
    # SD v1 defaults: scaled-linear 0.00085 → 0.012 over 1000 steps.
    assert s.scheduler.betas[0].item() == pytest.approx(0.00085) and s.scheduler.betas[-1].item() == pytest.approx(0.012)


def test_generate_is_reproducible_per_seed_and_shaped():
    model = tiny_model()
    a = model.generate(["a cat", "a dog"], seeds=[3, 4], steps=3)
    b = model.generate(["a cat"], seeds=[3], steps=3)
    assert a.shape == (2, 3, 16, 16) and a.min() >= -1 and a.max() <= 1
    assert torch.allclose(a[0], b[0], atol=1e-5), "the same prompt and seed give the same image in any batch"
