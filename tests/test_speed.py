"""Speed settings of the denoiser and the FLOP counts of ldm.flops: FLOPs are shapes only (meta device), so
full-size SD v1 is counted in seconds and the figures the benchmark and README quote are checked here."""
from __future__ import annotations

from pathlib import Path

import torch

from ldm.config import load_yaml, to_container
from ldm.models.denoiser import unet
from ldm.weights.load import for_inference

ROOT = Path(__file__).resolve().parents[1]


def model_section(name: str) -> dict:
    return to_container(load_yaml(ROOT / "configs" / name).model)


def test_channels_last_and_compile_keep_the_weights_and_their_names():
    config = model_section("tiny/tiny-sd.yaml")["params"]["unet_config"]["params"]["config"]
    torch.manual_seed(0)
    plain = unet(config)
    torch.manual_seed(0)
    fast = unet(config, channels_last=True, compile=True, gradient_checkpointing=True)
    assert fast.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert fast.is_gradient_checkpointing
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints and exports see no difference
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))


def test_speed_settings_do_not_reach_inference():
    section = model_section("tiny/tiny-sd.yaml")
    section["params"]["unet_config"]["params"].update(gradient_checkpointing=True, channels_last=True, compile=True)
    assert set(for_inference(section)["params"]["unet_config"]["params"]) == {"config"}
