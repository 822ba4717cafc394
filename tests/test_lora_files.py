"""LoRA files in both layouts: the kohya / A1111 file (what ComfyUI, A1111, InvokeAI and stable-diffusion.cpp read)
and diffusers' file each load in diffusers with every tensor applied and our adapter's outputs, alpha ≠ rank
included; they load back here too; the kohya names of SD 1.x layers are the published ones; and the check after
every export counts what applied and names what did not."""
from __future__ import annotations

import json
import types
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.test_lora import tiny_folder  # noqa: F401 (fixture)
from tests.test_model import tiny_model

# Every kind of layer LoRA adapts in an SD UNet, and the text encoder; alpha 8 on rank 4 (scale 2).
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2", "conv1", "conv2",
           "conv_shortcut", "time_emb_proj"]
LORA = {"rank": 4, "alpha": 8, "text_encoder": True, "target_modules": TARGETS}
PROMPT = ["a photo of sks dog"]


def adapted_model(folder: Path, lora: dict = LORA):
    model = tiny_model(**{"params.pretrained": str(folder), "params.use_ema": False, "params.lora": lora})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(len(name)))
    return model.eval()


def outputs(unet, text_encoder, ids):
    """The text encoder's context and the UNet's prediction on it, for fixed noise."""
    x, t = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([500])
    with torch.no_grad():
        ctx = text_encoder(ids)[0]
        return ctx, unet(x, t, encoder_hidden_states=ctx).sample


def pipeline(folder: Path):
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(str(folder), safety_checker=None, requires_safety_checker=False)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_each_layout_loads_in_diffusers_whole_with_our_adapters_outputs(tiny_folder, tmp_path, layout, capsys):
    from ldm.lora import save_lora

    model = adapted_model(tiny_folder)
    path = save_lora(model, tmp_path / f"{layout}.safetensors", layout=layout)
    n = len(load_file(path))
    assert f"{n} of {n} tensors applied" in capsys.readouterr().out  # the export's own check
    pipe = pipeline(tiny_folder)
    pipe.load_lora_weights(str(tmp_path), weight_name=path.name)
    ids = model.cond_stage_model.tokenize(PROMPT)
    ours = outputs(model.unet, model.cond_stage_model.transformer, ids)
    theirs = outputs(pipe.unet, pipe.text_encoder, ids)
    assert torch.allclose(ours[0], theirs[0], atol=1e-5) and torch.allclose(ours[1], theirs[1], atol=1e-5)
    # Every adapted layer came through: diffusers holds as many adapter layers as we trained.
    count = lambda m: sum(1 for x in m.modules() if hasattr(x, "lora_A") and x.lora_A)  # noqa: E731
    assert count(pipe.unet) == count(model.unet) and count(pipe.text_encoder) == count(model.cond_stage_model)
    # Alpha 8 on rank 4 applied at its strength: at alpha = rank (scale 1) the UNet output would differ.
    pipe.unet.set_adapters(pipe.get_active_adapters(), weights=[0.5])
    assert not torch.allclose(outputs(pipe.unet, pipe.text_encoder, ids)[1], ours[1], atol=1e-3)


@pytest.mark.parametrize("layout", ["kohya", "diffusers"])
def test_each_layout_loads_back_here_to_the_same_outputs(tiny_folder, tmp_path, layout):
    from ldm.lora import load_lora, save_lora

    model = adapted_model(tiny_folder)
    path = save_lora(model, tmp_path / "adapter.safetensors", layout=layout, check=False)
    plain = tiny_model(**{"params.pretrained": str(tiny_folder), "params.use_ema": False}).eval()
    load_lora(plain, path)
    ids = model.cond_stage_model.tokenize(PROMPT)
    for a, b in zip(outputs(model.unet, model.cond_stage_model.transformer, ids),
                    outputs(plain.unet, plain.cond_stage_model.transformer, ids)):
        assert torch.allclose(a, b, atol=1e-5)


def test_kohya_file_holds_alpha_tensors_diffusers_file_keeps_alpha_and_old_peft_fields_in_metadata(tiny_folder,
                                                                                                 tmp_path):
    from peft import LoraConfig

    from ldm.lora import save_lora
    from ldm.lora_files import OLD_PEFT_FIELDS

    model = adapted_model(tiny_folder)
    kohya = load_file(save_lora(model, tmp_path / "k.safetensors", check=False))
    alphas = {k: float(v) for k, v in kohya.items() if k.endswith(".alpha")}
    assert len(alphas) * 3 == len(kohya) and set(alphas.values()) == {8.0}
    assert all(v.dim() == 0 for k, v in kohya.items() if k.endswith(".alpha"))
    te = [k for k in kohya if k.startswith("lora_te")]
    assert te and all(k.startswith("lora_te_text_model_encoder_layers_") for k in te)
    path = save_lora(model, tmp_path / "d.safetensors", layout="diffusers", check=False)
    with safe_open(str(path), framework="pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    te = [k for k in keys if k.startswith("text_encoder.")]
    assert te and all(k.startswith("text_encoder.text_model.encoder.layers.") for k in te)
    assert all("lora" in k for k in keys)  # load_lora_weights refuses any other key (so no .alpha tensors here)
    fields = json.loads(meta["lora_adapter_metadata"])
    for prefix in ("unet", "text_encoder"):
        config = {k.split(".", 1)[1]: v for k, v in fields.items() if k.startswith(prefix + ".")}
        assert set(config) == set(OLD_PEFT_FIELDS) and config["lora_alpha"] == 8 and config["r"] == 4
        LoraConfig(**config)


def sd_model(v2: bool = False):
    """Full-size SD 1.x (or 2.x) UNet and text encoder with attention + text-encoder adapters, on uninitialised
    memory (shapes and names are all that matter here), wrapped as the parts save_lora uses."""
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    unet_kw = dict(cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True) if v2 \
        else dict(cross_attention_dim=768, attention_head_dim=8)
    te_kw = dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                 hidden_act="gelu") if v2 else dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                   num_hidden_layers=12, hidden_act="quick_gelu")
    with torch.device("meta"):
        unet = UNet2DConditionModel(sample_size=96 if v2 else 64, **unet_kw)
        te = CLIPTextModel(CLIPTextConfig(**te_kw))
    unet, te = unet.to_empty(device="cpu"), te.to_empty(device="cpu")
    unet.add_adapter(LoraConfig(r=8, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    te.add_adapter(LoraConfig(r=8, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]))
    cond = types.SimpleNamespace(lora_modules=lambda: {"text_encoder": te})
    return types.SimpleNamespace(unet=unet, cond_stage_model=cond, parameterization="v" if v2 else "eps",
                                 first_stage_model=types.SimpleNamespace(downsample=8), ema_scope=torch.no_grad)


def test_kohya_names_of_sd1_layers_are_the_published_ones_and_every_tensor_applies(tmp_path, capsys):
    """kohya's sd-scripts name SD 1.x layers by diffusers' module path (what ComfyUI, A1111, InvokeAI and
    stable-diffusion.cpp map); 528 tensors for attention + text-encoder adapters, as those clients counted."""
    from ldm.lora import save_lora

    path = save_lora(sd_model(), tmp_path / "sd1.safetensors")
    assert "528 of 528 tensors applied" in capsys.readouterr().out
    with safe_open(str(path), framework="pt") as f:
        keys, meta = set(f.keys()), f.metadata()
        shape = lambda k: tuple(f.get_slice(k).get_shape())  # noqa: E731
        assert shape("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight") == (8, 320)
        assert shape("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight") == (320, 8)
        assert shape("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_attn2_to_k.lora_down.weight") == (8, 768)
        assert shape("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight") == (1280, 8)
        assert shape("lora_te_text_model_encoder_layers_11_self_attn_out_proj.lora_up.weight") == (768, 8)
        assert f.get_tensor("lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha").item() == 4.0
    assert len(keys) == 528 and not any("input_blocks" in k or "lora_te1_" in k for k in keys)
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "4.0"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_sd2_files_say_so_for_a1111(tmp_path, capsys):
    from ldm.lora import save_lora

    path = save_lora(sd_model(v2=True), tmp_path / "sd2.safetensors")
    out = capsys.readouterr().out
    with safe_open(str(path), framework="pt") as f:
        meta, n = f.metadata(), len(f.keys())
    assert f"{n} of {n} tensors applied" in out
    assert meta["ss_v2"] == "True" and meta["ss_base_model_version"] == "sd_v2"
    assert meta["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"


def test_the_check_warns_once_for_each_key_that_applies_nowhere(tiny_folder, tmp_path, capsys, caplog):
    from ldm.lora import save_lora
    from ldm.lora_check import check_lora_file

    model = adapted_model(tiny_folder, {"rank": 4, "alpha": 4})
    path = save_lora(model, tmp_path / "k.safetensors", check=False)
    tensors = load_file(path)
    stray = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    tensors = {k.replace(stray, stray.replace("attn1_to_q", "attn1_to_x")): v for k, v in tensors.items()}
    save_file(tensors, path)
    result = check_lora_file(model, path)
    n = len(tensors)
    assert f"{n - 3} of {n} tensors applied" in capsys.readouterr().out
    warned = [r.getMessage() for r in caplog.records if "applied nowhere" in r.getMessage()]
    assert len(warned) == 3 and all("attn1_to_x" in w for w in warned)
    assert sorted(result.unused) == sorted(k for k in tensors if "attn1_to_x" in k)


def test_downloaded_original_sd_names_load_too(tiny_folder, tmp_path):
    """Some A1111-era files name SD 1.x blocks as the original UNet does (input_blocks_1_1_...); loading converts
    them through diffusers (our files never use them: InvokeAI does not read them)."""
    from ldm.lora import load_lora, save_lora

    model = adapted_model(tiny_folder, {"rank": 4, "alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"]})
    tensors = load_file(save_lora(model, tmp_path / "k.safetensors", check=False))
    # The tiny UNet's attention sits in down block 0 (input block 1), the middle block and up block 1 (output
    # blocks 2, 3).
    original = {k.replace("down_blocks_0_attentions_0", "input_blocks_1_1").replace("mid_block_attentions_0",
                                                                                      "middle_block_1")
                 .replace("up_blocks_1_attentions_0", "output_blocks_2_1")
                 .replace("up_blocks_1_attentions_1", "output_blocks_3_1"): v for k, v in tensors.items()}
    assert not any(block in k for k in original for block in ("down_blocks", "mid_block", "up_blocks"))
    save_file(original, tmp_path / "original.safetensors")
    plain = tiny_model(**{"params.pretrained": str(tiny_folder), "params.use_ema": False}).eval()
    load_lora(plain, tmp_path / "original.safetensors")
    ids = model.cond_stage_model.tokenize(PROMPT)
    assert torch.allclose(outputs(model.unet, model.cond_stage_model.transformer, ids)[1],
                          outputs(plain.unet, plain.cond_stage_model.transformer, ids)[1], atol=1e-5)


def test_save_lora_callback_writes_both_layouts_named_after_the_run(tiny_folder, tmp_path, capsys):
    from ldm.lora import SaveLora

    model = adapted_model(tiny_folder)
    run = tmp_path / "2024-05-01T12-00-00_sks-dog"
    SaveLora().on_train_end(types.SimpleNamespace(default_root_dir=str(run), global_step=3), model)
    assert sorted(p.name for p in (run / "lora").iterdir()) == ["pytorch_lora_weights.safetensors",
                                                               "sks-dog.safetensors"]
    assert capsys.readouterr().out.count("tensors applied") == 2
