"""scripts/memory_table.py: the parameter counts it prints are the model's, and its optimizer-state arithmetic is
the number of bytes the real optimizers hold after a step."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import math

import pytest
import torch

from ldm.optim import build_optimizer
from tests.conftest import REPO
from tests.test_model import TINY, tiny_model

spec = importlib.util.spec_from_file_location("memory_table", REPO / "scripts" / "memory_table.py")
memory_table = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory_table)


def run(*argv: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert memory_table.main(list(argv)) == 0
    return out.getvalue()


def test_it_prints_the_tiny_models_counts_and_exact_bytes():
    model = tiny_model()
    unet = sum(p.numel() for p in model.unet.parameters())
    text = run("--config", TINY, "--unit", "B")
    assert f"UNet {unet:,}," in text
    every = sum(p.numel() for p in model.parameters())  # EMA shadows are buffers, not parameters
    row = next(line for line in text.splitlines() if line.startswith("| AdamW |")).split("|")
    weights, grads, state, ema = (int(cell.replace(",", "")) for cell in row[2:6])
    n_tensors = sum(1 for _ in model.unet.parameters())
    assert weights == 4 * every and grads == ema == 4 * unet and state == 8 * unet + 4 * n_tensors
    # Training only cross-attention shrinks what scales with the trained weights, not the weights.
    attn = run("--config", TINY, "--unit", "B", "model.params.trainable=attn2")
    n_attn = sum(p.numel() for n, p in model.unet.named_parameters() if ".attn2." in n)
    assert f"{n_attn:,} trained" in attn


@pytest.mark.parametrize("name, target", [("AdamW", "torch.optim.AdamW"),
                                          ("Adafactor", "transformers.optimization.Adafactor"),
                                          ("Prodigy", "prodigyopt.Prodigy")])
def test_the_arithmetic_is_what_the_optimizer_holds_after_a_step(name, target):
    unet = tiny_model(**{"params.use_ema": False}).unet
    params = [p for p in unet.parameters() if p.requires_grad]
    with torch.no_grad():
        for p in params:  # no all-zero tensor (Prodigy keeps no starting copy of one)
            p.normal_()
            p.grad = torch.randn_like(p)
    opt = build_optimizer(params, 1e-4, {"target": target})
    opt.step()
    held = sum(v.nbytes for state in opt.state.values() for v in state.values() if torch.is_tensor(v))
    assert held == memory_table.optimizer_state_bytes(name, [tuple(p.shape) for p in params])


def test_adamw8bit_keeps_small_tensors_in_fp32_and_quantizes_large_ones_blockwise():
    small, large = memory_table.optimizer_state_bytes("AdamW8bit", [(4095,)]), \
        memory_table.optimizer_state_bytes("AdamW8bit", [(320, 320, 3, 3)])
    assert small == 8 * 4095
    n = 320 * 320 * 9
    assert large == 2 * n + 8 * math.ceil(n / 256) + 2 * 256 * 4


def test_help_runs():
    with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(io.StringIO()) as out:
        memory_table.main(["--help"])
    assert done.value.code == 0 and "meta device" in out.getvalue()
