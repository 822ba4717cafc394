"""LoRA: only adapters train, the saved file is small and diffusers loads it to the same outputs, and merging
(our merge_lora, and scripts/lora.py merge through diffusers) gives the samples of adapter + base."""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

from tests.test_model import TINY, batch, tiny_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

LORA = {"rank": 4, "alpha": 8, "text_encoder": True}


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from make_tiny_sd import make_pipeline_folder

    return make_pipeline_folder(Path(TINY), tmp_path_factory.mktemp("tiny") / "sd")


def trained_lora_model(folder: Path):
    """A LoRA model on the tiny folder after a few steps, adapters then randomised so they matter."""
    model = tiny_model(**{"params.pretrained": str(folder), "params.use_ema": False, "params.lora": LORA})
    opt = model.configure_optimizers()["optimizer"]
    for _ in range(2):
        model.diffusion_loss(batch()).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def test_only_adapters_train_and_base_weights_stay_bit_identical(tiny_folder):
    model = tiny_model(**{"params.pretrained": str(tiny_folder), "params.use_ema": False, "params.lora": LORA})
    before = copy.deepcopy(model.state_dict())
    opt = model.configure_optimizers()["optimizer"]
    for _ in range(2):
        model.diffusion_loss(batch()).backward()
        opt.step()
        opt.zero_grad()
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".lora_" in k for k in changed), sorted(changed)[:5]
    assert any(k.startswith("cond_stage_model.") for k in changed)  # the text encoder's adapters train too
    lora_params = {id(p) for n, p in model.named_parameters() if ".lora_" in n}
    assert {id(p) for p in opt.state} == lora_params


def test_adapter_file_is_small_and_diffusers_loads_it_to_the_same_outputs(tiny_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    from ldm.lora import save_lora

    model = trained_lora_model(tiny_folder)
    path = save_lora(model, tmp_path / "pytorch_lora_weights.safetensors", layout="diffusers")
    full = sum(p.numel() for n, p in model.unet.named_parameters() if ".lora_" not in n) * 4
    print(f"adapter {path.stat().st_size:,} bytes vs UNet {full:,} bytes")
    assert path.stat().st_size < 0.1 * full
    pipe = StableDiffusionPipeline.from_pretrained(str(tiny_folder), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    ids = model.cond_stage_model.tokenize(["a photo of sks dog"])
    ours = model.cond_stage_model(["a photo of sks dog"])
    with torch.no_grad():
        theirs = pipe.text_encoder(ids)[0]
        x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
        assert torch.allclose(ours, theirs, atol=1e-5)
        out_ours = model.unet(x, t, encoder_hidden_states=ours).sample
        out_theirs = pipe.unet(x, t, encoder_hidden_states=theirs).sample
        plain = tiny_model(**{"params.pretrained": str(tiny_folder), "params.use_ema": False}).unet(
            x, t, encoder_hidden_states=ours).sample
    assert torch.allclose(out_ours, out_theirs, atol=1e-5)
    assert (out_ours - plain).abs().max() > 1e-3  # the adapter changes the output: the comparison means something


def test_merge_gives_the_samples_of_adapter_plus_base(tiny_folder, tmp_path):
    from diffusers import StableDiffusionPipeline
    from lora import main as lora_cli

    from ldm.lora import load_lora, merge_lora, save_lora

    path = save_lora(trained_lora_model(tiny_folder), tmp_path / "adapter.safetensors")
    # Ours: load at half strength, sample, fold in, sample again.
    model = tiny_model(**{"params.pretrained": str(tiny_folder), "params.use_ema": False}).eval()
    load_lora(model, path, scale=0.5)
    kw = {"steps": 4, "guidance_scale": 3.0, "size": 16}
    adapted = model.generate(["a photo of sks dog", "a dog"], [1, 2], **kw)
    merge_lora(model)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert torch.allclose(model.generate(["a photo of sks dog", "a dog"], [1, 2], **kw), adapted, atol=1e-4)
    # diffusers through scripts/lora.py merge: merged folder == base folder + adapter.
    assert lora_cli(["merge", "--base", str(tiny_folder), "--lora", str(path), "--out", str(tmp_path / "merged")]) == 0
    run = lambda pipe: pipe("a photo of sks dog", num_inference_steps=3, height=16, width=16, output_type="pt",
                            generator=torch.Generator().manual_seed(0)).images
    base = StableDiffusionPipeline.from_pretrained(str(tiny_folder), safety_checker=None, requires_safety_checker=False)
    base.load_lora_weights(str(tmp_path), weight_name=path.name)
    merged = StableDiffusionPipeline.from_pretrained(str(tmp_path / "merged"), safety_checker=None,
                                                     requires_safety_checker=False)
    assert torch.allclose(run(base), run(merged), atol=1e-4)
    assert lora_cli(["merge", "--base", str(tiny_folder), "--lora", str(tmp_path / "none.safetensors"),
                     "--out", str(tmp_path / "x")]) == 2


def test_txt2img_with_lora_draws_the_merged_models_images(tiny_folder, tmp_path):
    """`txt2img.py --lora` on the base folder == txt2img on the merged folder; the adapter is in the PNG's settings."""
    import numpy as np
    from lora import main as lora_cli
    from PIL import Image
    from txt2img import main as txt2img

    from ldm.lora import save_lora
    from ldm.outputs import read_png_meta

    path = save_lora(trained_lora_model(tiny_folder), tmp_path / "adapter.safetensors")
    assert lora_cli(["merge", "--base", str(tiny_folder), "--lora", str(path), "--out", str(tmp_path / "merged")]) == 0
    common = ["--prompt", "a photo of sks dog", "--n_samples", "1", "--n_iter", "1", "--ddim_steps", "3",
              "--H", "16", "--W", "16", "--seed", "3", "--skip_grid"]
    assert txt2img(["--ckpt", str(tiny_folder), "--lora", str(path), "--outdir", str(tmp_path / "a"), *common]) == 0
    assert txt2img(["--ckpt", str(tmp_path / "merged"), "--outdir", str(tmp_path / "b"), *common]) == 0
    assert txt2img(["--ckpt", str(tiny_folder), "--outdir", str(tmp_path / "c"), *common]) == 0
    pixels = {k: np.asarray(Image.open(tmp_path / k / "samples" / "00000.png"), dtype=float) for k in "abc"}
    assert np.abs(pixels["a"] - pixels["b"]).mean() <= 1.0, "adapter + base samples like the merged weights"
    assert np.abs(pixels["a"] - pixels["c"]).mean() > 1.0, "the adapter changes the image"
    meta = read_png_meta(tmp_path / "a" / "samples" / "00000.png")
    assert meta["lora"] == str(path.resolve()) and meta["lora_scale"] == 1.0
    assert txt2img(["--ckpt", str(tiny_folder), "--lora", str(tmp_path / "none.safetensors"),
                    "--outdir", str(tmp_path / "d"), *common]) == 2


def test_lora_freezes_a_trainable_text_encoder_whose_changes_the_adapter_would_lose(caplog):
    model = tiny_model(**{"params.use_ema": False, "params.lora": {"rank": 2},
                          "params.cond_stage_config.params.trainable": True})
    assert "only adapters train" in caplog.text
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n and n.startswith("unet.") for n in trainable)


def test_adapters_on_convolutions_save_in_one_format_diffusers_loads_whole(tmp_path):
    """Adapters beyond the attention projections (resnet convolutions) are saved under peft's names throughout:
    a file mixing two naming schemes loses the adapters of one scheme in diffusers' loader."""
    from diffusers import UNet2DConditionModel

    from ldm.lora import save_lora

    targets = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]
    model = tiny_model(**{"params.use_ema": False, "params.lora": {"rank": 2, "target_modules": targets}}).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    path = save_lora(model, tmp_path / "adapter.safetensors", layout="diffusers")
    theirs = UNet2DConditionModel(**model.unet.config)
    theirs.load_state_dict({k.replace(".base_layer.", "."): v for k, v in model.unet.state_dict().items()
                            if ".lora_" not in k})
    theirs.load_lora_adapter(str(path), prefix="unet")
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    ctx = model.cond_stage_model(["a photo of sks dog"])
    with torch.no_grad():
        assert torch.allclose(model.unet(x, t, encoder_hidden_states=ctx).sample,
                              theirs(x, t, encoder_hidden_states=ctx).sample, atol=1e-5)
