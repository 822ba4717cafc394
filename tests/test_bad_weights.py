"""Bad weights files through every door they come in by (``--finetune_from``, ``-r``, ``scripts/txt2img.py --ckpt``,
``scripts/convert.py``, ``scripts/lora.py merge``): a truncated safetensors, a .ckpt holding a list, a .ckpt holding
a pickled object whose unpickling would run code, another architecture's checkpoint, a LoRA for another model.
Each stops with one ``error:`` line naming the file, and no pickled code ever runs."""
from __future__ import annotations

import contextlib
import io
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from ldm.util import run_cli
from ldm.weights import export_diffusers, prepare
from ldm.weights.files import write_safetensors
from tests.conftest import REPO, TINY_MODEL, write_train_yaml
from tests.test_weights import script, section, write_training_ckpt

DIGITS = REPO / "configs/demo/digits.yaml"


class RunsCode:
    """Unpickling this calls ``Path.write_text(marker, "ran")``: the side effect a malicious checkpoint would have."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return Path.write_text, (self.marker, "ran")


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("weights")
    good, _ = write_training_ckpt(tmp / "tiny.ckpt", section())
    single = tmp / "tiny.safetensors"
    from ldm.weights import export_single_file

    export_single_file(prepare(good, ema=False), single, progress=False)
    out = {"marker": tmp / "code-ran.txt", "good": good, "folder": export_diffusers(prepare(good), tmp / "folder")}
    out["truncated.safetensors"] = tmp / "truncated.safetensors"
    out["truncated.safetensors"].write_bytes(single.read_bytes()[: single.stat().st_size // 2])
    torch.save([1, 2, 3], tmp / "list.ckpt")
    out["list.ckpt"] = tmp / "list.ckpt"
    torch.save({"state_dict": {"x": torch.zeros(2)}, "hook": RunsCode(out["marker"])}, tmp / "code.ckpt")
    out["code.ckpt"] = tmp / "code.ckpt"
    out["digits.ckpt"], _ = write_training_ckpt(tmp / "digits.ckpt", section(DIGITS))
    # A kohya LoRA for a model whose attention is 320 wide (SD v1's first block), not the tiny model's 32.
    out["lora.safetensors"] = write_safetensors(tmp / "lora.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(4, 320),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(320, 4),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.alpha": torch.tensor(4.0)})
    return out


BAD = ("truncated.safetensors", "list.ckpt", "code.ckpt", "digits.ckpt")


def one_error(command) -> str:
    """The one ``error:`` line ``command()`` (a script's exit code) prints, with exit code 2; else a failure."""
    err = io.StringIO()
    saved = dict(os.environ)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = command()
    finally:
        os.environ.clear()
        os.environ.update(saved)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1, (code, err.getvalue()[-2000:])
    return lines[0]


@pytest.mark.parametrize("bad", BAD)
def test_finetune_from_a_bad_file_is_one_line(files, bad, tmp_path, image_folder):
    import main

    train = write_train_yaml(tmp_path / "train.yaml", image_folder)
    line = one_error(lambda: run_cli(main.run, ["-t", "--base", str(TINY_MODEL), str(train), "-l",
                                                str(tmp_path / "logs"), "--finetune_from", str(files[bad])]))
    assert str(files[bad]) in line
    if bad == "digits.ckpt":
        assert "is another architecture" in line
    assert not files["marker"].exists()


def resume_run(tmp_path: Path, ckpt: Path) -> Path:
    """A run dir whose saved config is the tiny model on docs/'s pictures and whose last.ckpt is ``ckpt``."""
    run = tmp_path / "run"
    (run / "configs").mkdir(parents=True)
    (run / "checkpoints").mkdir()
    merged = {**yaml.safe_load(TINY_MODEL.read_text()),
              **yaml.safe_load(write_train_yaml(tmp_path / "train.yaml", REPO / "docs").read_text())}
    (run / "configs" / "2026-01-01T00-00-00-project.yaml").write_text(yaml.safe_dump(merged))
    shutil.copy(ckpt, run / "checkpoints" / "last.ckpt")
    return run


RESUMED = ("list.ckpt", "code.ckpt", "digits.ckpt")  # -r reads the run's own .ckpt files only


@pytest.mark.parametrize("bad", RESUMED)
def test_resume_never_runs_pickled_code(files, bad, tmp_path):
    import main

    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            run_cli(main.run, ["-r", str(resume_run(tmp_path, files[bad]))])
        except Exception:
            pass  # the next test is about how it stops; this one about what never runs
    assert not files["marker"].exists()


@pytest.mark.parametrize("bad", RESUMED)
def test_resume_from_a_bad_last_ckpt_is_one_line(files, bad, tmp_path):
    import main

    line = one_error(lambda: run_cli(main.run, ["-r", str(resume_run(tmp_path, files[bad]))]))
    assert "last.ckpt" in line
    # (digits.ckpt here is a weights file without Lightning's loops; tests/test_kill.py resumes a real training
    # checkpoint into another architecture)
    expected = {"list.ckpt": "not a training checkpoint", "code.ckpt": "refuses",
                "digits.ckpt": "not a training checkpoint"}[bad]
    assert expected in line, line


# (digits.ckpt is not bad here: a training checkpoint carries its own architecture, and the scripts build that.)
@pytest.mark.parametrize("bad", ["truncated.safetensors", "list.ckpt", "code.ckpt"])
def test_sampling_and_convert_from_a_bad_file_are_one_line(files, bad, tmp_path):
    config = ["--config", str(TINY_MODEL)] if bad.endswith(".safetensors") else []
    txt2img = one_error(lambda: script("txt2img").main(["--ckpt", str(files[bad]), "--prompt", "x", "--outdir",
                                                        str(tmp_path / "out"), "--ddim_steps", "1", *config]))
    convert = one_error(lambda: script("convert").main([str(files[bad]), "--single-file",
                                                        str(tmp_path / "x.safetensors")]))
    for line in (txt2img, convert):
        assert str(files[bad]) in line
    assert not files["marker"].exists() and not (tmp_path / "x.safetensors").exists()


def test_a_lora_for_another_model_is_one_line(files, tmp_path):
    line = one_error(lambda: script("lora").main(["merge", "--base", str(files["folder"]), "--lora",
                                                  str(files["lora.safetensors"]), "--out", str(tmp_path / "merged")]))
    assert str(files["lora.safetensors"]) in line
    txt2img = one_error(lambda: script("txt2img").main(["--ckpt", str(files["good"]), "--lora",
                                                        str(files["lora.safetensors"]), "--prompt", "x", "--outdir",
                                                        str(tmp_path / "out"), "--ddim_steps", "1"]))
    assert str(files["lora.safetensors"]) in txt2img


def test_the_pickled_code_would_run_if_unpickled_fully(files):
    """The marker tests above can fail: loading the same file without weights_only does run the code."""
    torch.load(files["code.ckpt"], weights_only=False)
    assert files["marker"].read_text() == "ran"
    files["marker"].unlink()
