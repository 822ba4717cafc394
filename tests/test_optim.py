"""model.params.optimizer_config: any torch.optim class, Adafactor, Prodigy and AdamW8bit from one block; each
resumes bit-exactly from its state_dict; mistakes are one line before training; the default is today's AdamW."""
from __future__ import annotations

import copy
import io
import logging

import pytest
import torch
from omegaconf import OmegaConf

from ldm.config import check_targets
from ldm.optim import build_optimizer, default_optimizer_config
from ldm.util import ConfigError
from tests.test_model import batch, tiny_model

CONFIGS = {
    "adamw": {"target": "torch.optim.AdamW", "params": {"weight_decay": 0.01}},
    "adafactor": {"target": "transformers.optimization.Adafactor", "params": {"weight_decay": 0.01}},
    "prodigy": {"target": "prodigyopt.Prodigy", "params": {"weight_decay": 0.01, "d0": 1e-4}},
}
LR = {"adamw": 1e-3, "adafactor": 1e-3, "prodigy": 1.0}


def mlp(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))


def step(model, opt, i: int) -> None:
    g = torch.Generator().manual_seed(i)
    x, y = torch.randn(16, 8, generator=g), torch.randn(16, 4, generator=g)
    torch.nn.functional.mse_loss(model(x), y).backward()
    opt.step()
    opt.zero_grad()


def flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("name", list(CONFIGS))
def test_each_optimizer_resumes_bit_exactly_from_its_state_dict(name):
    """Three steps, a checkpoint (weights and optimizer state through torch.save), a fresh model and optimizer
    restored from it: the fourth step is bit-identical to the fourth step of the run that never stopped."""
    lr, config = LR[name], CONFIGS[name]
    model = mlp(0)
    opt = build_optimizer(model.parameters(), lr, config)
    for i in range(3):
        step(model, opt, i)
    saved = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, saved)
    restarted = copy.deepcopy(model)  # what a fresh optimizer would do from these weights
    step(model, opt, 3)

    saved.seek(0)
    ckpt = torch.load(saved, weights_only=False)
    resumed = mlp(1)
    resumed.load_state_dict(ckpt["model"])
    opt2 = build_optimizer(resumed.parameters(), lr, config)
    opt2.load_state_dict(ckpt["opt"])
    step(resumed, opt2, 3)
    assert torch.equal(flat(resumed), flat(model))
    # The state matters: the same step from the same weights without it goes elsewhere.
    step(restarted, build_optimizer(restarted.parameters(), lr, config), 3)
    assert not torch.equal(flat(restarted), flat(model))


def test_the_default_is_todays_adamw_with_the_model_settings():
    model = tiny_model(**{"params.use_ema": False, "params.weight_decay": 0.02, "params.adam_eps": 1e-6})
    model.learning_rate = 1e-3
    out = model.configure_optimizers()
    opt = out["optimizer"]
    assert "lr_scheduler" in out  # the tiny config's LambdaLR warm-up is kept
    assert type(opt) is torch.optim.AdamW
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["eps"], group["betas"]) == (1e-3 * 1e-6, 0.02, 1e-6, (0.9, 0.999))
    assert group["foreach"] is True and not group["fused"]  # CPU parameters: no fused kernel
    # foreach gives the numbers torch's default loop gives on the CPU: the default run is unchanged.
    theirs = mlp(0)
    ours = copy.deepcopy(theirs)
    a = torch.optim.AdamW(theirs.parameters(), lr=1e-3, weight_decay=0.02, eps=1e-6)
    b = build_optimizer(ours.parameters(), 1e-3, default_optimizer_config(0.02, (0.9, 0.999), 1e-6))
    for i in range(5):
        step(theirs, a, i)
        step(ours, b, i)
    assert torch.equal(flat(theirs), flat(ours))


def test_a_config_block_picks_the_optimizer_and_keeps_the_lr_schedule():
    model = tiny_model(**{"params.use_ema": False, "params.optimizer_config": CONFIGS["adafactor"]})
    model.learning_rate = 1e-3
    out = model.configure_optimizers()
    from transformers.optimization import Adafactor

    assert isinstance(out["optimizer"], Adafactor)
    assert out["lr_scheduler"]["scheduler"].optimizer is out["optimizer"]
    model.diffusion_loss(batch()).backward()
    out["optimizer"].step()


def test_adafactor_steps_with_the_models_learning_rate():
    """transformers' Adafactor would compute its own step size; built here it moves weights in proportion to lr."""
    moved = {}
    for lr in (1e-4, 1e-3):
        model = mlp(0)
        before = flat(model)
        opt = build_optimizer(model.parameters(), lr, {"target": "transformers.optimization.Adafactor"})
        assert opt.param_groups[0]["relative_step"] is False and opt.param_groups[0]["scale_parameter"] is False
        step(model, opt, 0)
        moved[lr] = (flat(model) - before).abs().max().item()
    assert moved[1e-3] / moved[1e-4] == pytest.approx(10, rel=1e-3)
    with pytest.raises(ConfigError, match="relative_step: true makes Adafactor ignore"):
        build_optimizer(mlp(0).parameters(), 1e-3, {"target": "transformers.optimization.Adafactor",
                                                    "params": {"relative_step": True}})


def test_prodigy_warns_when_lr_is_not_about_one(caplog):
    with caplog.at_level(logging.WARNING, logger="ldm.optim"):
        build_optimizer(mlp(0).parameters(), 1.0, CONFIGS["prodigy"])
        assert not caplog.records
        build_optimizer(mlp(0).parameters(), 1e-4, CONFIGS["prodigy"])
    assert len(caplog.records) == 1 and "expects lr 1.0" in caplog.records[0].getMessage()


@pytest.mark.parametrize("config, message", [
    ({"target": "torch.optim.AdamWW"}, r"has no attribute 'AdamWW'; did you mean AdamW"),
    ({"target": "prodigy.Prodigy"}, r"does not import .*did you mean prodigyopt.Prodigy\?"),
    ({"target": "torch.optim.AdamW", "params": {"betass": [0.9, 0.99]}}, r"params.betass: not a setting .*betas"),
    ({"target": "torch.optim.SGD", "params": {"lr": 0.1}}, r"params.lr: the learning rate is model.base_learning_rate"),
    ({"params": {}}, r"expected a \{target, params\} block"),
])
def test_mistakes_are_one_line_naming_the_key(config, message):
    with pytest.raises(ConfigError, match=message) as err:
        build_optimizer(mlp(0).parameters(), 1e-3, config)
    assert "\n" not in str(err.value) and str(err.value).startswith("model.params.optimizer_config")


def test_a_misspelt_target_stops_main_py_before_the_model_is_built():
    cfg = OmegaConf.create({"model": {"params": {"optimizer_config": {"target": "torch.optim.Adafactorr"}}}})
    with pytest.raises(ConfigError, match=r"optimizer_config.target: .*did you mean Adafactor\?"):
        check_targets(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_adamw8bit_is_refused_without_cuda_before_any_step():
    with pytest.raises(ConfigError, match="AdamW8bit runs on CUDA only and this machine has no CUDA device"):
        build_optimizer(mlp(0).parameters(), 1e-4, {"target": "bitsandbytes.optim.AdamW8bit"})
    model = tiny_model(**{"params.use_ema": False,
                          "params.optimizer_config": {"target": "bitsandbytes.optim.AdamW8bit"}})
    with pytest.raises(ConfigError, match="CUDA only"):  # Lightning calls this before the first batch
        model.configure_optimizers()
