"""scripts/variations.py: same pixels as diffusers' StableDiffusionImageVariationPipeline for the same weights,
seed and preprocessed input, and a grid with the input first from a run's checkpoint."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.sampling import make_scheduler
from tests.test_variations import save_training_ckpt, tiny_section

ROOT = Path(__file__).resolve().parents[1]


def script():
    spec = importlib.util.spec_from_file_location("variations", ROOT / "scripts" / "variations.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def photo(path: Path, size=(40, 30)) -> Path:
    from skimage import data as skdata

    Image.fromarray(skdata.astronaut()).resize(size).save(path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("var") / "model.ckpt"
    save_training_ckpt(path, tiny_section(), seed=5)
    return path


@pytest.mark.parametrize("sampler", ["ddim", "dpm++"])
def test_matches_diffusers_image_variation_pipeline(checkpoint, tmp_path, sampler):
    from diffusers import StableDiffusionImageVariationPipeline
    from transformers import CLIPImageProcessor

    mod = script()
    from ldm.weights import load_model

    model = load_model(checkpoint)
    image = mod.load_image(photo(tmp_path / "a.png"))
    ours = mod.make_variations(model, image, n=1, seed=11, guidance_scale=3.0, steps=8, sampler=sampler, size=16)

    pipe = StableDiffusionImageVariationPipeline(
        vae=model.first_stage_model.vae, image_encoder=model.cond_stage_model.encoder, unet=model.unet,
        scheduler=make_scheduler(sampler, model.sampler_config), safety_checker=None,
        feature_extractor=CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16}),
        requires_safety_checker=False)
    # The pipeline takes a tensor as already-preprocessed pixel values: feed it ours, the only difference
    # between the two paths is then everything after preprocessing.
    pixels = model.cond_stage_model.preprocess(image)
    theirs = pipe(image=pixels, height=16, width=16, num_inference_steps=8, guidance_scale=3.0,
                  generator=torch.Generator().manual_seed(11), output_type="pt").images
    diff = ((ours + 1) / 2 - theirs).abs().max().item()
    print(f"{sampler}: max abs diff {diff * 255:.4f}/255")
    assert diff < 1 / 255, diff
    # The tiny model's samples vary with the seed (a broken comparison would not notice a constant output).
    other = mod.make_variations(model, image, n=1, seed=12, guidance_scale=3.0, steps=8, sampler=sampler, size=16)
    assert ((other - ours).abs().mean() * 127.5) > 1


def test_our_preprocessing_is_close_to_clip_image_processor(checkpoint, tmp_path):
    """Bicubic + antialias in torch vs CLIPImageProcessor's PIL bicubic resize: close, not bit-equal."""
    from transformers import CLIPImageProcessor

    from ldm.weights import load_model

    mod = script()
    cond = load_model(checkpoint).cond_stage_model
    path = photo(tmp_path / "a.png", size=(80, 60))
    ours = cond.preprocess(mod.load_image(path))
    theirs = CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})(
        images=Image.open(path), return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (1, 3, 16, 16)
    assert (ours - theirs).abs().mean() < 0.1


def test_cli_writes_a_grid_with_the_input_first(checkpoint, tmp_path, capsys):
    mod = script()
    inputs = [photo(tmp_path / "a.png"), photo(tmp_path / "b.png", size=(20, 20))]
    assert mod.main([str(checkpoint), *map(str, inputs), "-n", "3", "--steps", "2", "-o", str(tmp_path / "out")]) == 0
    grid = Image.open(tmp_path / "out" / "a-variations.png")
    assert grid.size == (2 + 4 * (16 + 2), 2 + 16 + 2)  # input + 3 variations, 2 px padding
    assert sorted(p.name for p in (tmp_path / "out").glob("b-*.png")) == ["b-00.png", "b-01.png", "b-02.png",
                                                                          "b-variations.png"]
    assert "3 variations" in capsys.readouterr().out


def test_cli_refuses_a_text_model_in_one_line(tmp_path, capsys):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "tiny" / "tiny-sd.yaml").model, resolve=True)
    cfg["params"]["use_ema"] = False
    save_training_ckpt(tmp_path / "text.ckpt", cfg)
    assert script().main([str(tmp_path / "text.ckpt"), str(photo(tmp_path / "a.png")), "-o", str(tmp_path)]) == 2
    assert "not an image-variations model" in capsys.readouterr().err


def test_cli_missing_input_is_one_line(checkpoint, tmp_path, capsys):
    assert script().main([str(checkpoint), str(tmp_path / "nope.png"), "-o", str(tmp_path)]) == 2
    assert "cannot decode image" in capsys.readouterr().err


def test_the_sampling_scripts_flags_and_the_earlier_spellings_mean_the_same(checkpoint, tmp_path):
    mod = script()
    parse = mod.build_parser().parse_args
    new = parse(["--ckpt", "run", "a.png", "b.png", "--ddim_steps", "7", "--ddim_eta", "0.5", "--no_ema"])
    old = parse(["run", "a.png", "b.png", "--steps", "7", "--eta", "0.5", "--no-ema"])
    assert mod.weights_and_images(new) == mod.weights_and_images(old) == ("run", ["a.png", "b.png"])
    assert (new.ddim_steps, new.ddim_eta, new.no_ema) == (old.ddim_steps, old.ddim_eta, old.no_ema) == (7, 0.5, True)
    default = parse(["--ckpt", "run", "a.png"])
    assert (default.ddim_steps, default.ddim_eta, default.no_ema, default.scale) == (50, 0.0, False, 3.0)
    assert mod.weights_and_images(default) == ("run", ["a.png"])
    # Both spellings draw the same pictures.
    image = str(photo(tmp_path / "a.png"))
    common = ["-n", "2", "--seed", "3", "--sampler", "dpm++"]
    assert mod.main(["--ckpt", str(checkpoint), image, "--ddim_steps", "3", "--no_ema", "-o", str(tmp_path / "new"),
                     *common]) == 0
    assert mod.main([str(checkpoint), image, "--steps", "3", "--no-ema", "-o", str(tmp_path / "old"), *common]) == 0
    names = sorted(p.name for p in (tmp_path / "new").iterdir())
    assert names == ["a-00.png", "a-01.png", "a-variations.png"] == sorted(p.name for p in (tmp_path / "old").iterdir())
    for name in names:
        assert (tmp_path / "new" / name).read_bytes() == (tmp_path / "old" / name).read_bytes(), name
    # --ddim_steps reaches the sampler: another step count draws other pictures.
    assert mod.main(["--ckpt", str(checkpoint), image, "--ddim_steps", "2", "-o", str(tmp_path / "two"), *common]) == 0
    assert (tmp_path / "two" / "a-00.png").read_bytes() != (tmp_path / "new" / "a-00.png").read_bytes()


def test_cli_without_weights_or_with_a_bad_flag_is_one_line(tmp_path, capsys):
    mod = script()
    assert mod.main([str(photo(tmp_path / "a.png"))]) == 2  # one positional and no --ckpt: no weights
    assert "give the model to sample with" in capsys.readouterr().err
    assert mod.main(["--ckpt", "run", str(tmp_path / "a.png"), "--sampler", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown sampler 'nope'" in err and len(err.splitlines()) == 1


def test_cli_applies_lora_and_sampler_config(checkpoint, tmp_path):
    """--lora puts a UNet adapter trained on the variations model on it (the image equals the adapted model's own
    sample), and --sampler_config reaches the sampler (DDIM with clip_sample=true draws another image)."""
    import numpy as np

    from ldm.lora import save_lora
    from ldm.util import instantiate_from_config
    from ldm.weights import load_model
    from ldm.weights.load import load_weights

    section = tiny_section()
    section["params"]["lora"] = {"rank": 4, "alpha": 4}
    adapted = instantiate_from_config(section)
    load_weights(adapted, checkpoint)
    with torch.no_grad():
        for name, p in adapted.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    adapter = save_lora(adapted.eval(), tmp_path / "lora" / "a.safetensors")
    img = photo(tmp_path / "in.png")
    base = ["--ckpt", str(checkpoint), str(img), "-n", "1", "--ddim_steps", "4", "--size", "16", "--seed", "3"]

    def run(out, *extra):
        assert script().main([*base, "-o", str(tmp_path / out), *extra]) == 0
        return np.asarray(Image.open(tmp_path / out / "in-00.png"), dtype=np.int16)

    plain, with_lora = run("plain"), run("lora", "--lora", str(adapter))
    clipped = run("clip", "--sampler_config", "clip_sample=true")
    mod = script()
    expected = mod.make_variations(adapted, mod.load_image(img), n=1, seed=3, steps=4, size=16)
    expected = ((expected[0].float() + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    assert np.abs(with_lora - expected.astype(np.int16)).max() <= 1
    assert np.abs(with_lora - plain).mean() > 1 and np.abs(clipped - plain).max() > 0
    assert load_model(checkpoint).sampler_config["clip_sample"] is False
