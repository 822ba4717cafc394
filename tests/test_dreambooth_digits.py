"""DreamBooth end to end on a base model that follows its prompts: the digits demo model learns "sks digit 3"
(a 3 in dark ink on white paper, which it has never drawn) from five photos, full fine-tune and LoRA, through
main.py with configs/demo/digits-dreambooth.yaml exactly as the README runs it (the base is trained for fewer
steps here: 400 instead of 800, about 85% prompt-following)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ldm.callbacks.digit_eval import DigitClassifier
from tests.conftest import REPO, main_py, run_dirs

DEMO = REPO / "configs" / "demo"
FIGURE = re.compile(r"'a handwritten sks digit 3'\s+samples: ([\d.]+) from the instance images")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("digits-base")
    proc = main_py("-t", "--no-test", "--base", DEMO / "digits.yaml", "-l", root, "-n", "base",
                   "lightning.trainer.max_steps=400", "lightning.trainer.check_val_every_n_epoch=100",
                   "lightning.callbacks.digit_score.params.n_per_class=2", timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (run,) = run_dirs(root)
    return run


@pytest.fixture(scope="module")
def subject(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("subject") / "sks-digit"
    assert main_script("digit_subject.py", folder) == 0
    return folder


def main_script(name: str, *args) -> int:
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(REPO / "scripts" / name), *map(str, args)], cwd=REPO).returncode


def dreambooth(base_run: Path, subject: Path, tmp_path: Path, lora: bool):
    extra = [DEMO / "digits-dreambooth-lora.yaml"] if lora else []
    proc = main_py("-t", "--no-test", "--base", DEMO / "digits.yaml", DEMO / "digits-dreambooth.yaml", *extra,
                   "--finetune_from", base_run, "--finetune_ema", "-l", tmp_path / "logs", "-n", "sks",
                   f"data.params.train.params.instance_data_dir={subject}",
                   f"data.params.train.params.class_data_dir={tmp_path / 'class'}",
                   "lightning.trainer.max_steps=150", "lightning.callbacks.digit_score.params.n_per_class=2",
                   timeout=400)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    (run,) = run_dirs(tmp_path / "logs")
    return run, proc.stdout


def class_prompt_samples(run: Path, n: int = 20) -> torch.Tensor:
    from ldm.inference import load

    model = load(run)
    return model.generate(["a handwritten digit 3"] * n, list(range(500, 500 + n)), steps=25, guidance_scale=3.0)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_dreambooth_learns_the_subject_and_keeps_the_class(base_run, subject, tmp_path, lora):
    run, stdout = dreambooth(base_run, subject, tmp_path, lora)
    assert len(list((tmp_path / "class").glob("class-*.png"))) == 50  # sampled by the base before training
    score = json.loads((run / "dreambooth_score.json").read_text())
    print(f"digits DreamBooth ({'lora' if lora else 'full'}):", {k: v for k, v in score.items() if "_to_" in k})
    assert FIGURE.search(stdout), stdout[-2000:]
    # Learned: instance-prompt samples are far closer to the subject's photos than class-prompt samples are.
    assert score["instance_prompt_to_instance_images"] < 0.6 * score["class_prompt_to_instance_images"]
    # No drift of the class: its samples stay near the base's class images, and are still 3s.
    assert score["class_prompt_to_class_images"] < 0.5 * score["class_prompt_to_instance_images"]
    labels = DigitClassifier().predict(class_prompt_samples(run))
    assert (labels == 3).mean() >= 0.6, labels
    header = (run / "metrics.csv").read_text().splitlines()[0]
    assert "train/instance_loss" in header and "train/prior_loss" in header
    if lora:
        check_adapter(run, base_run)


def check_adapter(run: Path, base_run: Path) -> None:
    """The adapter file is small, diffusers' UNet and the sampling scripts' ``--lora`` load it onto the base to
    the same outputs, and merging it gives the same samples as adapter + base."""
    from diffusers import UNet2DConditionModel

    from ldm.inference import load
    from ldm.lora import merge_lora

    adapter = run / "lora" / "pytorch_lora_weights.safetensors"
    model = load(run)
    base_bytes = 4 * sum(p.numel() for n, p in model.unet.named_parameters() if ".lora_" not in n)
    assert adapter.stat().st_size < 0.5 * base_bytes, (adapter.stat().st_size, base_bytes)
    theirs = UNet2DConditionModel(**model.unet.config)
    plain = {k.replace(".base_layer.", "."): v for k, v in model.unet.state_dict().items() if ".lora_" not in k}
    theirs.load_state_dict(plain)
    theirs.load_lora_adapter(str(adapter), prefix="unet")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([300, 700])
    ctx = model.cond_stage_model(["a handwritten sks digit 3"] * 2)
    scripts = load(str(base_run), lora=str(adapter))  # what txt2img --ckpt <base> --lora <adapter> samples with
    with torch.no_grad():
        ours = model.unet(x, t, encoder_hidden_states=ctx).sample
        assert torch.allclose(ours, theirs(x, t, encoder_hidden_states=ctx).sample, atol=1e-5)
        assert torch.allclose(ours, scripts.unet(x, t, encoder_hidden_states=ctx).sample, atol=1e-5)
    kw = {"steps": 10, "guidance_scale": 3.0}
    adapted = model.generate(["a handwritten sks digit 3"] * 4, [1, 2, 3, 4], **kw)
    merge_lora(model)
    assert not any(".lora_" in n for n, _ in model.named_parameters())
    assert torch.allclose(model.generate(["a handwritten sks digit 3"] * 4, [1, 2, 3, 4], **kw), adapted, atol=1e-4)
