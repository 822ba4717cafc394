"""DreamBooth end to end on a base model that follows its prompts: the digits demo model learns "sks digit 3"
(a 3 in dark ink on white paper, which it has never drawn) from five photos, full fine-tune and LoRA, through
main.py with configs/demo/digits-dreambooth.yaml exactly as the README runs it (the base is trained for fewer
steps here: the 400-step run of tests/digits_demo_run.py that tests/test_demo.py checks, the same weights as
this test's own base was before, 86% prompt-following). Stand-in models show that the score's copying figures catch a model that memorised the photos."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from ldm.callbacks.digit_eval import DigitClassifier
from tests.conftest import REPO, main_py, run_dirs
from tests.digits_demo_run import digits_demo_run

DEMO = REPO / "configs" / "demo"
FIGURE = re.compile(r"'a handwritten sks digit 3'\s+samples: ([\d.]+) from the instance images")


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    return digits_demo_run(tmp_path_factory).run


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


class StandIn:
    """A stand-in model for DreamBoothScore whose instance-prompt samples are ``images`` (cycled), class-prompt
    samples the dataset's class images."""

    def __init__(self, images: torch.Tensor, classes: torch.Tensor | None = None):
        self.images, self.classes = images, classes

    def generate(self, prompts, seeds, size, **kwargs):
        source = self.images if "sks" in prompts[0] else self.classes
        return torch.stack([source[i % len(source)] for i in range(len(seeds))])


def test_dreambooth_copying_figures_catch_memorised_photos(tmp_path):
    """Memorising the five photos gives the best closeness (0 from the photos); the copying figures give it away:
    a photo sits well away from the nearest other photo, and one photo repeated has no diversity. New scans of
    the subject (other 3s in the same ink, never seen) land near the photos' own figures."""
    from ldm.callbacks.dreambooth_eval import DreamBoothScore
    from ldm.data.digits import split_digits, to_model_range, write_digit_subject
    from ldm.data.dreambooth import DreamBoothDataset

    write_digit_subject(tmp_path / "sks")
    dataset = DreamBoothDataset(str(tmp_path / "sks"), "a handwritten sks digit 3", with_prior_preservation=False)
    photos = torch.stack([dataset.instance[i]["image"] for i in range(len(dataset.instance))])
    images, labels = split_digits("val")
    new_scans = -to_model_range(images[labels == 3]).expand(-1, photos.shape[1], -1, -1)  # ink on paper
    score = DreamBoothScore(n=10, thumb=8)
    memorised, _ = score.score(StandIn(photos), dataset)
    one_photo, _ = score.score(StandIn(photos[:1]), dataset)
    learned, _ = score.score(StandIn(new_scans), dataset)
    print({name: {k: round(v, 3) for k, v in r.items() if isinstance(v, float)}
           for name, r in (("memorised", memorised), ("one photo", one_photo), ("new scans", learned))})
    nearest_other, spread = memorised["instance_images_nearest_other"], memorised["instance_images_diversity"]
    assert nearest_other > 0.3 and spread > 0.3
    assert memorised["instance_prompt_to_instance_images"] < 1e-6  # the closeness figure's best ...
    assert one_photo["instance_prompt_to_instance_images"] < 1e-6 and one_photo["instance_prompt_diversity"] < 1e-6
    assert learned["instance_prompt_to_instance_images"] > 0.7 * nearest_other  # ... not reached by new scans
    assert learned["instance_prompt_diversity"] > 0.7 * spread
    figure = score.figure(memorised)
    assert f"an instance image is {nearest_other:.3f} from the nearest other one" in figure, figure


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
