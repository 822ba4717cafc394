"""EMA options: ``ema_device: cpu`` keeps the shadow weights off the accelerator whatever the model is moved to, under
the checkpoint keys EMA always had; ``ema_update_every: N`` averages every N optimizer steps with decay d**N."""
from __future__ import annotations

import io

import pytest
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from ldm.models.ema import EMA
from ldm.util import ConfigError
from tests.test_model import batch, tiny_model, train_steps


def shadows(ema: EMA) -> dict[str, torch.Tensor]:
    return {buf: ema.shadow(buf) for buf in ema.names.values()}


def test_cpu_ema_stays_on_the_cpu_in_fp32_when_the_model_moves():
    """``.to()`` is what Lightning calls to put a module on its device: the UNet follows it, the CPU EMA does not.
    The meta device stands in for an accelerator (a real device move of every parameter and buffer)."""
    model = tiny_model(**{"params.ema_device": "cpu"})
    before = {k: v.clone() for k, v in shadows(model.model_ema).items()}
    model.to(torch.float64)
    assert next(model.unet.parameters()).dtype == torch.float64
    model.to("meta")
    assert next(model.unet.parameters()).device.type == "meta"
    after = shadows(model.model_ema)
    assert all(v.device.type == "cpu" and v.dtype == torch.float32 for v in after.values())
    assert all(torch.equal(after[k], before[k]) for k in before)  # values kept, not re-created
    # The default EMA (buffers) moves with the model, as it always did.
    default = tiny_model()
    default.to("meta")
    assert all(v.device.type == "meta" for v in shadows(default.model_ema).values())


def test_cpu_ema_updates_from_the_model_and_is_saved_under_the_usual_keys():
    cpu, usual = tiny_model(**{"params.ema_device": "cpu", "params.ema_decay": 0.5}), tiny_model(
        **{"params.ema_decay": 0.5})
    for model in (cpu, usual):
        torch.manual_seed(7)  # the same training draws for both
        train_steps(model, 1)
        model.model_ema.update(model.unet)
    cpu_state, usual_state = cpu.state_dict(), usual.state_dict()
    assert list(cpu_state) == list(usual_state)  # same keys, same order: checkpoints and exports read either
    ema_keys = [k for k in cpu_state if k.startswith("model_ema.")]
    assert len(ema_keys) == len(cpu.model_ema.names) + 1  # every shadow and num_updates
    assert all(torch.equal(cpu_state[k], usual_state[k]) for k in ema_keys)
    assert not torch.equal(cpu_state[ema_keys[1]], tiny_model().state_dict()[ema_keys[1]])  # it did average

    # A checkpoint of either loads into either, strictly.
    saved = io.BytesIO()
    torch.save(usual_state, saved)
    saved.seek(0)
    fresh = tiny_model(**{"params.ema_device": "cpu"})
    fresh.load_state_dict(torch.load(saved), strict=True)
    assert all(torch.equal(fresh.state_dict()[k], usual_state[k]) for k in ema_keys)
    tiny_model().load_state_dict(cpu_state, strict=True)
    with pytest.raises(RuntimeError, match=f"Missing key.*{ema_keys[1]}"):
        fresh.load_state_dict({k: v for k, v in cpu_state.items() if k != ema_keys[1]})
    # Sampling with the CPU average swaps it into the UNet and back.
    with fresh.ema_scope():
        name = next(iter(fresh.model_ema.names))
        assert torch.equal(dict(fresh.unet.named_parameters())[name], fresh.model_ema.shadow(EMA.buffer_name(name)))


def test_update_every_n_steps_averages_as_every_step_with_decay_d():
    """With weights that change once every N steps, averaging every N steps with d**N is every-step averaging with
    d, exactly; the per-update weights are the ones the formula says."""
    d, n = 0.9, 3
    every, each = torch.nn.Linear(2, 1, bias=False), torch.nn.Linear(2, 1, bias=False)
    every.weight.data.zero_()
    each.weight.data.zero_()
    ema_n, ema_1 = EMA(every, d, warmup=False, update_every=n), EMA(each, d, warmup=False)
    expected = torch.zeros(1, 2)
    for step in range(1, 13):
        value = float((step - 1) // n + 1) ** 2  # constant within each block of n steps
        every.weight.data.fill_(value)
        each.weight.data.fill_(value)
        ema_1.update(each)
        if ema_n.due(step):
            ema_n.update(every)
            expected = d ** n * expected + (1 - d ** n) * value
    assert int(ema_n.num_updates) == 4 and int(ema_1.num_updates) == 12
    assert torch.allclose(ema_n.weight, expected, rtol=1e-6)
    assert torch.allclose(ema_n.weight, ema_1.weight, rtol=1e-5)
    # Warm-up counts optimizer steps: after 2 updates of 5 steps the decay is min(d, 11/20) ** 5.
    warm = EMA(every, 0.9999, warmup=True, update_every=5)
    warm.num_updates.fill_(2)
    assert warm.current_decay() == pytest.approx((11 / 20) ** 5)


def test_bad_ema_settings_are_one_line():
    with pytest.raises(ConfigError, match="ema_device: 'cuda' is not a place"):
        tiny_model(**{"params.ema_device": "cuda"})
    with pytest.raises(ConfigError, match="ema_update_every: expected a whole number .* got 0"):
        tiny_model(**{"params.ema_update_every": 0})


def test_a_training_run_averages_every_n_steps_on_the_cpu(tmp_path):
    """Through Lightning: 5 optimizer steps with ema_update_every 2 are 2 updates (after steps 2 and 4), and the
    trainer's checkpoint holds the CPU average under model_ema.*."""
    model = tiny_model(**{"params.ema_device": "cpu", "params.ema_update_every": 2, "params.scheduler_config": None})
    rows = [{"image": img, "caption": cap} for img, cap in zip(batch()["image"], batch()["caption"])]
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=5, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(model, DataLoader(rows * 5, batch_size=2))
    assert trainer.global_step == 5 and int(model.model_ema.num_updates) == 2
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=False)["state_dict"]
    buf = next(iter(model.model_ema.names.values()))
    assert torch.equal(state[f"model_ema.{buf}"], model.model_ema.shadow(buf))
    assert int(state["model_ema.num_updates"]) == 2


def test_a_shapes_only_model_gets_shapes_only_cpu_shadows():
    """scripts/memory_table.py and the full-size tests build models on the meta device: no copy is possible there."""
    with torch.device("meta"):
        model = tiny_model(**{"params.ema_device": "cpu"})
    assert all(v.is_meta for v in shadows(model.model_ema).values())
