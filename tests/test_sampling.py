"""Sampling: txt2img and img2img image for image the same as diffusers' pipelines for every sampler, seeds and
batches as diffusers draws them, PNGs that redraw themselves, one-line refusals, the guidance sweep, both GIFs
and the scripts on a diffusers folder and on a training run of main.py."""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import (DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler,
                       EulerDiscreteScheduler, PNDMScheduler, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline)
from PIL import Image

from ldm import inference, outputs
from ldm.sampling import SAMPLERS
from ldm.util import ConfigError
from tests.conftest import REPO, TINY_MODEL, main_env, main_py, write_image_folder, write_train_yaml

# The reference: diffusers' own pipeline loaded from the same folder, each sampler swapped in the way diffusers
# documents (``X.from_config(pipe.scheduler.config)``). The folder is written by diffusers' save_pretrained, whose
# scheduler_config.json differs from SD v1's published one (timestep_spacing "leading", no clip_sample key).
REFERENCE = {"ddim": DDIMScheduler, "plms": PNDMScheduler, "pndm": PNDMScheduler, "dpm++": DPMSolverMultistepScheduler,
             "euler": EulerDiscreteScheduler, "euler_a": EulerAncestralDiscreteScheduler, "ddpm": DDPMScheduler}
STEPS, SCALE = 6, 7.5


def reference_scheduler(pipe, name: str):
    """``name`` built from the folder's own scheduler config (kept on the pipe as ``folder_scheduler``)."""
    return REFERENCE[name].from_config(pipe.folder_scheduler.config)


def maxdiff(a, b) -> int:
    """Largest absolute difference in 0..255 pixel units."""
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def gen(s: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed(s)


def mad(a, b) -> float:
    """Mean absolute difference in 0..255 pixel units."""
    return float(np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)).mean())


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    make_tiny_sd = script("make_tiny_sd")
    return make_tiny_sd.make_pipeline_folder(make_tiny_sd.TINY_CONFIG, tmp_path_factory.mktemp("tiny") / "tiny-sd")


@pytest.fixture(scope="module")
def model(folder):
    return inference.load(str(folder))


@pytest.fixture(scope="module")
def pipes(folder):
    txt = StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)
    txt.set_progress_bar_config(disable=True)
    img = StableDiffusionImg2ImgPipeline(**txt.components)
    img.set_progress_bar_config(disable=True)
    txt.folder_scheduler = img.folder_scheduler = txt.scheduler
    return txt, img


@pytest.fixture(scope="module")
def init_png(tmp_path_factory) -> Path:
    """An RGBA photo of an odd size: 37x29 becomes 32x24 RGB."""
    from skimage import data

    rgba = Image.fromarray(data.astronaut()).resize((37, 29)).convert("RGBA")
    rgba.putalpha(200)
    path = tmp_path_factory.mktemp("init") / "astronaut.png"
    rgba.save(path)
    return path


def diffusers_txt2img(pipe, sampler, prompts, negative, seed, n=1):
    """``seed`` an int: one generator for the batch; a list: one generator per image."""
    pipe.scheduler = reference_scheduler(pipe, sampler)
    generator = [gen(s) for s in seed] if isinstance(seed, list) else gen(seed)
    return np.stack(pipe(prompts, height=16, width=16, num_inference_steps=STEPS, guidance_scale=SCALE,
                         negative_prompt=[negative] * len(prompts) if negative else None, num_images_per_prompt=n,
                         generator=generator).images)


# ---- parity with diffusers ----------------------------------------------------------------------------------
@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_txt2img_matches_diffusers(model, pipes, sampler, negative):
    prompts = ["a photo of a cat", "a red dog"]
    ours = inference.to_uint8(inference.txt2img(model, prompts, 16, 16, negative, gen(7), sampler, STEPS, SCALE))
    theirs = diffusers_txt2img(pipes[0], sampler, prompts, negative, 7)
    assert maxdiff(ours, theirs) <= 1  # float rounding may flip one 0..255 level; in practice 0
    other_seed = diffusers_txt2img(pipes[0], sampler, prompts, negative, 8)
    assert mad(other_seed, theirs) > 10.0  # far from what a seed changes


@pytest.mark.filterwarnings("ignore:You have passed 2 text prompts")  # diffusers' own notice for n images per prompt
@pytest.mark.parametrize("negative", ["", "blurry, low quality"])
@pytest.mark.parametrize("sampler", list(SAMPLERS))
def test_img2img_matches_diffusers(model, pipes, init_png, sampler, negative):
    init = outputs.load_init_image(init_png)
    assert init.size == (32, 24) and init.mode == "RGB"
    pipe = pipes[1]
    pipe.scheduler = reference_scheduler(pipe, sampler)
    theirs = np.stack(pipe("an oil painting", image=init, strength=0.6, num_inference_steps=STEPS,
                           guidance_scale=SCALE, negative_prompt=negative or None, num_images_per_prompt=2,
                           generator=gen(3)).images)
    ours = inference.to_uint8(inference.img2img(model, outputs.image_to_tensor(init), ["an oil painting"] * 2, 0.6,
                                                negative, gen(3), sampler, STEPS, SCALE))
    assert ours.shape == theirs.shape == (2, 24, 32, 3)
    assert maxdiff(ours, theirs) <= 1


def test_img2img_strength_one_matches_and_strength_zero_is_the_vae_round_trip(model, pipes, init_png):
    init = outputs.load_init_image(init_png)
    x = outputs.image_to_tensor(init)
    pipe = pipes[1]
    pipe.scheduler = reference_scheduler(pipe, "dpm++")
    theirs = pipe("a castle", image=init, strength=1.0, num_inference_steps=STEPS, guidance_scale=SCALE,
                  generator=gen(1)).images[0]

    def ours(strength, sampler):
        return inference.img2img(model, x, ["a castle"], strength, "", gen(1), sampler, STEPS, SCALE)
    assert maxdiff(inference.to_uint8(ours(1.0, "dpm++"))[0], theirs) <= 1
    z = model.first_stage_model.encode(x, gen(1))
    zero = ours(0.0, "ddim")
    assert torch.allclose(zero, model.first_stage_model.decode(z))


def test_empty_prompt_is_the_unconditional_sample(model):
    def draw(scale):
        return inference.to_uint8(inference.txt2img(model, [""], 16, 16, "", gen(2), "ddim", STEPS, scale))
    assert mad(draw(SCALE), draw(1.0)) < 1.0  # guided: uncond + s * (cond - uncond) with cond = uncond


def test_long_prompt_warns_where_it_was_cut(model):
    long = " ".join(f"word{i}" for i in range(90))
    (line,) = inference.truncation_warnings(model, [long, "short", long])
    assert line.startswith("warning: prompt") and "truncated after word" in line and "dropping" in line
    assert inference.truncation_warnings(model, ["a photo of a cat"]) == []


# ---- the command lines ------------------------------------------------------------------------------------
def cli(argv, img2img=False) -> int:
    """scripts/txt2img.py or scripts/img2img.py, in this process."""
    return script("img2img" if img2img else "txt2img").main([str(a) for a in argv])


def test_seed_draws_each_batch_like_a_diffusers_generator(folder, pipes, tmp_path):
    """Batch k of --n_iter uses Generator('cpu').manual_seed(seed + k) for its whole (n_samples, 4, h, w) noise,
    with an ancestral sampler so the per-step draws count too; --fixed_code repeats batch 0."""
    args = ["--ckpt", folder, "--prompt", "a cat", "--n_samples", 2, "--n_iter", 2, "--seed", 5, "--scale", SCALE,
            "--ddim_steps", STEPS, "--sampler", "euler_a"]
    assert cli([*args, "--outdir", tmp_path / "a"]) == 0
    samples = [png(tmp_path / "a" / "samples" / f"{i:05}.png") for i in range(4)]
    for k, seed in enumerate((5, 6)):
        theirs = diffusers_txt2img(pipes[0], "euler_a", ["a cat"], "", seed, n=2)
        assert mad(np.stack(samples[2 * k:2 * k + 2]), theirs) < 1.0
    grid = Image.open(tmp_path / "a" / "grid-0000.png")
    assert grid.size == (2 + 2 * 18, 2 + 2 * 18)  # 2 per row, 2 px padding
    assert cli([*args, "--outdir", tmp_path / "b", "--fixed_code", "--skip_grid"]) == 0
    fixed = [png(tmp_path / "b" / "samples" / f"{i:05}.png") for i in range(4)]
    assert mad(fixed[0], samples[0]) == 0 and mad(fixed[2], fixed[0]) == 0
    assert not (tmp_path / "b" / "grid-0000.png").exists()


def test_every_png_carries_its_settings_and_redraws_itself(folder, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of a cat\n\na red dog\n")
    out = tmp_path / "out"
    assert cli(["--ckpt", folder, "--from-file", prompts, "--outdir", out, "--n_samples", 2, "--n_iter", 1,
                "--negative_prompt", "blurry", "--sampler", "dpm++", "--ddim_steps", STEPS, "--seed", 11]) == 0
    keys = {"prompt", "negative_prompt", "seed", "steps", "scale", "sampler", "size", "model"}
    for path in [out / "samples" / "00000.png", out / "samples" / "00001.png", out / "grid-0000.png"]:
        text = Image.open(path).text
        assert keys <= set(text), path
        assert text["negative_prompt"] == "blurry" and text["sampler"] == "dpm++" and text["size"] == "16x16"
        assert text["model"] == str(folder.resolve())
    meta = outputs.read_png_meta(out / "samples" / "00001.png")
    assert (meta["prompt"], meta["seed"], meta["batch_size"], meta["batch_index"]) == ("a red dog", 11, 2, 1)
    # Redrawn from the PNG alone: the second image of a batch of two different prompts.
    assert cli(["--from-png", out / "samples" / "00001.png", "--outdir", tmp_path / "again"]) == 0
    (again,) = sorted((tmp_path / "again" / "samples").iterdir())
    assert mad(png(again), png(out / "samples" / "00001.png")) < 1.0
    assert mad(png(again), png(out / "samples" / "00000.png")) > 10.0
    assert outputs.read_png_meta(again)["prompt"] == "a red dog"


def test_img2img_chains_from_the_command_line(folder, init_png, tmp_path):
    """The script on a diffusers folder; its output fed back twice; the last image redrawn from its PNG."""
    out = tmp_path / "chain"
    for i, (init, prompt) in enumerate([(init_png, "a sketch of a castle"), (out / "samples" / "00000.png", "a castle"),
                                        (out / "samples" / "00001.png", "an oil painting of a castle")]):
        assert cli(["--ckpt", folder, "--init-img", init, "--prompt", prompt, "--outdir", out, "--n_samples", 1,
                    "--n_iter", 1, "--ddim_steps", STEPS, "--strength", 0.5 if i else 0.75, "--skip_grid"], True) == 0
    last = out / "samples" / "00002.png"
    assert Image.open(last).size == (32, 24)
    meta = outputs.read_png_meta(last)
    assert meta["init_image"] == str((out / "samples" / "00001.png").resolve()) and meta["strength"] == 0.5
    assert cli(["--from-png", last, "--outdir", tmp_path / "again"], True) == 0
    assert mad(png(tmp_path / "again" / "samples" / "00000.png"), png(last)) < 1.0


P = ["--prompt", "x"]


@pytest.mark.parametrize("img2img, argv, message", [
    (True, [*P, "--init-img", "{tmp}/missing.png"], "init image '{tmp}/missing.png' does not exist"),
    (True, [*P, "--init-img", "{tmp}/prompts.txt"], "is not an image PIL can read"),
    (True, [*P, "--init-img", "{init}", "--strength", "1.5"], "--strength must be between 0 and 1, got 1.5"),
    (True, P, "give the image to start from: --init-img PATH"),
    (False, [*P, "--H", "30"], "--H 30 is not a positive multiple of 8; try 24"),
    (False, [*P, "--W", "0"], "--W 0 is not a positive multiple of 8"),
    (False, [*P, "--sampler", "heun"], "unknown sampler 'heun'; choose one of ddim, plms, pndm, dpm++, euler, euler_a"),
    (False, [*P, "--from-png", "{init}"], "carries no sampling settings"),
    (False, [*P, "--precision", "fp8"], "unknown precision 'fp8'"),
    (False, [], "give a prompt (--prompt TEXT, or --prompt '' for an unconditional sample) or --from-file"),
])
def test_bad_input_is_one_clear_line(folder, init_png, tmp_path, capsys, img2img, argv, message):
    (tmp_path / "prompts.txt").write_text("not an image\n")
    fill = {"tmp": tmp_path, "init": init_png}
    argv = [a.format(**fill) for a in argv]
    rc = cli(["--ckpt", folder, "--outdir", tmp_path / "out", "--ddim_steps", 2, *argv], img2img)
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and message.format(**fill) in err


def test_pixel_space_gray_model_like_the_digits_demo(init_png, tmp_path):
    """configs/demo/digits.yaml's shape (no VAE, 1-channel 8x8 images): gray PNGs out, RGB init images go in as luma."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    section = OmegaConf.to_container(OmegaConf.load(REPO / "configs/demo/digits.yaml").model, resolve=True)
    torch.manual_seed(0)
    ckpt = tmp_path / "demo.ckpt"
    torch.save({"state_dict": instantiate_from_config(section).state_dict(), "config": {"model": section},
                "global_step": 1}, ckpt)
    out = tmp_path / "out"
    base = ["--ckpt", ckpt, "--outdir", out, "--n_samples", 2, "--n_iter", 1, "--ddim_steps", 3, "--skip_grid"]
    assert cli([*base, "--prompt", "a handwritten digit 3"]) == 0
    assert cli([*base, "--prompt", "a handwritten digit 7", "--init-img", init_png, "--H", 8, "--W", 8], True) == 0
    images = [Image.open(out / "samples" / f"{i:05}.png") for i in range(4)]
    assert [(im.mode, im.size) for im in images] == [("L", (8, 8))] * 4


def test_init_images_of_any_mode_and_size(tmp_path):
    gray = tmp_path / "gray.png"
    Image.new("L", (50, 30), 128).save(gray)
    assert outputs.load_init_image(gray).size == (48, 24)
    assert outputs.load_init_image(gray, height=16).size == (24, 16)  # aspect kept, width to a multiple of 8
    assert outputs.load_init_image(gray, 16, 40).size == (40, 16)
    clear = tmp_path / "clear.png"
    Image.new("RGBA", (16, 16), (0, 0, 0, 0)).save(clear)
    assert np.asarray(outputs.load_init_image(clear)).min() == 255  # transparency on white
    tiny = tmp_path / "tiny.png"
    Image.new("RGB", (5, 5)).save(tiny)
    with pytest.raises(ConfigError, match="smaller than 8x8"):
        outputs.load_init_image(tiny)


def test_device_and_precision_choice():
    assert inference.pick_device("auto").type in ("cuda", "mps", "cpu")
    assert inference.pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert inference.pick_dtype("autocast", torch.device("cuda")) == torch.float16
    assert inference.pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    assert inference.precision_name(torch.float32) == "fp32"


# ---- sweep, GIFs, a training run, the benchmark -----------------------------------------------------------
def test_guidance_sweep_rows_are_scales_and_columns_seeds(folder, model, tmp_path, capsys):
    out = tmp_path / "sweep"
    assert script("guidance_sweep").main(["--ckpt", str(folder), "--prompt", "a cat", "--scales", "1", "5", "9",
                                          "--seeds", "0", "3", "--ddim_steps", str(STEPS), "--outdir", str(out)]) == 0
    grid = Image.open(out / "sweep-0000.png")
    assert grid.width > 2 * 128 and grid.height > 3 * 128  # cells enlarged to 128 px, plus labels
    assert grid.text["scales"] == "[1.0, 5.0, 9.0]" and grid.text["seeds"] == "[0, 3]"
    cells = sorted((out / "samples").iterdir())
    assert len(cells) == 6
    meta = outputs.read_png_meta(cells[3])  # row 2 (scale 5), column 2 (seed 3)
    assert (meta["scale"], meta["seed"]) == (5.0, 3)
    direct = inference.txt2img(model, ["a cat"], 16, 16, "", gen(3), "ddim", STEPS, 5.0)
    assert mad(png(cells[3]), inference.to_uint8(direct)[0]) < 1.0
    assert "rows: scales 1, 5, 9; columns: seeds 0, 3" in capsys.readouterr().out


@pytest.mark.parametrize("sampler, every, frames", [("ddim", 1, STEPS), ("euler", 4, 2)])
def test_denoising_gif_has_a_frame_per_k_steps(folder, tmp_path, sampler, every, frames):
    gif = tmp_path / "denoise.gif"
    assert script("make_gifs").main(["denoise", "--ckpt", str(folder), "--prompt", "a cat", "--ddim_steps", str(STEPS),
                                     "--every", str(every), "--sampler", sampler, "--out", str(gif)]) == 0
    assert Image.open(gif).n_frames == frames


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A real main.py run of the tiny model: 2 steps per epoch, 4 steps, so checkpoints at steps 2 and 4."""
    tmp = tmp_path_factory.mktemp("run")
    yaml = write_train_yaml(tmp / "train.yaml", write_image_folder(tmp / "photos"), repeats=1,
                            trainer={"max_steps": 4}, callbacks={"image_logger": {"params": {"disabled": True}}})
    proc = main_py("-t", "--base", TINY_MODEL, yaml, "-l", tmp / "logs", "-n", "tiny", "--no-test")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (run,) = (tmp / "logs").iterdir()
    return run


def test_scripts_run_on_a_training_run(run_dir, tmp_path):
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "txt2img.py"), "--ckpt", str(run_dir), "--prompt",
                           "a photo of a coffee", "--n_samples", "2", "--n_iter", "1", "--ddim_steps", "3",
                           "--outdir", str(tmp_path / "out")], cwd=tmp_path, env=main_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(list((tmp_path / "out" / "samples").glob("*.png"))) == 2
    assert outputs.read_png_meta(tmp_path / "out" / "samples" / "00000.png")["model"] == str(run_dir.resolve())


def test_checkpoint_gifs_have_a_frame_per_checkpoint(run_dir, tmp_path, capsys):
    ckpts = script("make_gifs").run_checkpoints(run_dir)
    assert [(p.name, step) for p, step, _ in ckpts] == [("epoch=000000.ckpt", 2), ("epoch=000001.ckpt", 4)]
    out = tmp_path / "gifs"
    assert script("make_gifs").main(["checkpoints", str(run_dir), "--prompt", "a cat", "--prompt", "a rocket",
                                     "--ddim_steps", "3", "--outdir", str(out)]) == 0
    gifs = sorted(out.glob("*.gif"))
    assert [g.name for g in gifs] == ["00-a-cat.gif", "01-a-rocket.gif"]
    assert all(Image.open(g).n_frames == 2 for g in gifs)


def test_benchmark_prints_both_timings_and_the_ratio(folder, capsys):
    assert script("benchmark_sampling").main(["--ckpt", str(folder), "--steps", "2", "--batch", "1",
                                              "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "this project:" in out and "diffusers:" in out and "ratio" in out
    assert "maximum absolute difference 0/255" in out
