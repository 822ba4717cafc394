"""Weights in and out (ldm/weights, scripts/convert.py): round trips between this project, diffusers folders and
original single files; diffusers' own loaders as the judge of the exports; SD 2.x; one-line errors.

Tiny random models, made in-test; the full-size SD v1 round trips are marked slow."""
from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.config import load_yaml
from ldm.util import ConfigError, instantiate_from_config
from ldm.weights import describe, export_diffusers, export_single_file, load_model, load_weights, prepare
from ldm.weights.export import Exportable
from ldm.weights.files import read_safetensors, write_safetensors

from .conftest import main_env

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "configs/tiny/tiny-sd.yaml"
PARTS = {"unet": "unet.", "vae": "first_stage_model.vae.", "text_encoder": "cond_stage_model.transformer."}


def script(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def section(path: Path = TINY) -> dict:
    return OmegaConf.to_container(load_yaml(path).model, resolve=True)


def tiny_sd2_section() -> dict:
    """The tiny model reshaped like SD 2.x: OpenCLIP-style (GELU) text encoder, linear projections, 64-d context,
    '!' padding, v-prediction."""
    cfg = section()
    params = cfg["params"]
    params["parameterization"] = "v"
    params["unet_config"]["params"]["config"].update(cross_attention_dim=64, use_linear_projection=True)
    params["cond_stage_config"]["params"]["config"].update(hidden_size=64, hidden_act="gelu", projection_dim=64)
    params["cond_stage_config"]["params"]["pad_token"] = "!"
    return cfg


def write_training_ckpt(path: Path, cfg: dict, seed: int = 0, step: int = 7) -> tuple[Path, dict]:
    """A checkpoint shaped like main.py's: state_dict (EMA different from the raw UNet), config, global_step."""
    torch.manual_seed(seed)
    model = instantiate_from_config(cfg)
    with torch.no_grad():
        for name, buf in model.model_ema.names.items():
            getattr(model.model_ema, buf).add_(0.01)
    state = model.state_dict()
    torch.save({"state_dict": state, "config": {"model": cfg, "data": {}}, "global_step": step,
                "optimizer_states": [{"state": {}}]}, path)
    return path, state


def tensors(path: Path) -> dict[str, torch.Tensor]:
    return read_safetensors(path)[0]


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    bad = [k for k in a if a[k].dtype != b[k].dtype or not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def read_each(path: Path):
    """(name, tensor) pairs read with plain reads, one at a time: a full-size file is never mapped or held whole."""
    from ldm.weights.files import DTYPES

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        for name, info in sorted(header.items()):
            f.seek(8 + n + info["data_offsets"][0])
            raw = bytearray(f.read(info["data_offsets"][1] - info["data_offsets"][0]))
            yield name, torch.frombuffer(raw, dtype=torch.uint8).view(DTYPES[info["dtype"]]).reshape(info["shape"])


def assert_same_files(a: Path, b: Path, strip: str = ""):
    """Tensor by tensor: same names (after removing ``strip``), dtypes and values."""
    pairs = zip(read_each(a), read_each(b))
    keys = []
    for (ka, x), (kb, y) in pairs:
        assert ka.removeprefix(strip) == kb.removeprefix(strip), (ka, kb)
        assert x.dtype == y.dtype and torch.equal(x, y), ka
        keys.append(ka)
    assert len(keys) == len(read_safetensors(a)[0]) == len(read_safetensors(b)[0])


def component_states(pipe) -> dict[str, dict]:
    return {name: getattr(pipe, name).state_dict() for name in PARTS}


def ours_by_component(model) -> dict[str, dict]:
    state = model.state_dict()
    return {name: {k[len(p):]: v for k, v in state.items() if k.startswith(p)} for name, p in PARTS.items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A tiny SD-v1-shaped diffusers folder written by scripts/make_tiny_sd.py (diffusers' save_pretrained)."""
    out = tmp_path_factory.mktemp("w") / "tiny-sd"
    with contextlib.redirect_stdout(io.StringIO()):
        assert script("make_tiny_sd").main(["--out", str(out), "--seed", "3"]) == 0
    return out


@pytest.fixture(scope="module")
def single_file(folder, tmp_path_factory) -> Path:
    return export_single_file(prepare(folder), tmp_path_factory.mktemp("w") / "tiny.safetensors", progress=False)


# ---- round trips ---------------------------------------------------------------------------------------------
def test_diffusers_to_project_to_diffusers_is_bit_exact(folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    out = export_diffusers(prepare(folder), tmp_path / "again", progress=False)
    before = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True)
    after = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    for name, state in component_states(before).items():
        assert_same(state, component_states(after)[name])
    for sub in ("unet", "vae"):
        drop = lambda d: {k: v for k, v in d.items() if k != "_diffusers_version"}
        assert drop(json.loads((out / sub / "config.json").read_text())) == \
            drop(json.loads((folder / sub / "config.json").read_text()))
    assert after.tokenizer("a red cat").input_ids == before.tokenizer("a red cat").input_ids
    assert dict(after.scheduler.config) == dict(before.scheduler.config)


def test_original_to_project_to_original_is_bit_exact(single_file, tmp_path):
    model = load_model(single_file, config=TINY)
    again = export_single_file(Exportable(model.state_dict(), model, {"config": section()}), tmp_path / "b.safetensors",
                               progress=False)
    first = tensors(single_file)
    assert_same(first, tensors(again))
    # The layout other tools look for (a transformers-5 converter would write cond_stage_model.transformer.embeddings).
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in first
    assert first["first_stage_model.encoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 convolutions, as CompVis has them
    assert describe(first).startswith("SD-v1-shaped (CLIP text encoder, 32-d context")


def test_exported_single_file_loads_in_diffusers_from_single_file(folder, single_file):
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_single_file(str(single_file), config=str(folder), local_files_only=True)
    ours = ours_by_component(load_model(folder))
    for name, state in component_states(pipe).items():
        assert_same(state, ours[name])
    unet = UNet2DConditionModel.from_single_file(str(single_file), config=str(folder), subfolder="unet",
                                                 local_files_only=True)
    assert_same(unet.state_dict(), ours["unet"])


def test_compvis_ema_keys_choose_ema_or_raw_like_diffusers(single_file, tmp_path):
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    state = dict(tensors(single_file))
    unet = [k for k in state if k.startswith("model.diffusion_model.")]
    for k in unet:  # CompVis LitEma names: the parameter name without dots
        state["model_ema." + k[len("model."):].replace(".", "")] = state[k] + 1
    path = write_safetensors(tmp_path / "full-ema.safetensors", state)
    raw, ema = load_model(path, config=TINY, ema=False), load_model(path, config=TINY, ema=True)
    key = "unet.conv_in.weight"
    assert torch.equal(ema.state_dict()[key], raw.state_dict()[key] + 1) and ema.weights_ema and not raw.weights_ema
    reference = convert_ldm_unet_checkpoint(state, dict(raw.unet.config), extract_ema=True)
    assert_same(reference, {k[5:]: v for k, v in ema.state_dict().items() if k.startswith("unet.")})
    # --finetune_from: raw weights train, the file's EMA seeds the model's EMA.
    model = instantiate_from_config(section())
    assert "raw weights" in load_weights(model, path)
    assert torch.equal(model.model_ema.conv_in__weight, raw.state_dict()[key] + 1)


# ---- training checkpoint exports -----------------------------------------------------------------------------
def test_exported_folder_samples_the_same_image_as_the_project(tmp_path):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    ckpt, _ = write_training_ckpt(tmp_path / "last.ckpt", section())
    out = export_diffusers(prepare(ckpt), tmp_path / "pipe", progress=False)  # EMA by default
    model = load_model(ckpt, ema=True)
    pipe = StableDiffusionPipeline.from_pretrained(str(out), local_files_only=True)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompt, seed = "a photo of a rocket", 11
    theirs = pipe(prompt, negative_prompt="", guidance_scale=3.0, num_inference_steps=6, height=16, width=16,
                  generator=torch.Generator().manual_seed(seed), output_type="pt").images
    ours = (model.generate([prompt], [seed], size=16, sampler="ddim", steps=6, guidance_scale=3.0) + 1) / 2
    assert theirs.shape == ours.shape == (1, 3, 16, 16)
    assert (theirs - ours).abs().mean() < 1 / 255


def test_export_records_config_step_and_ema_choice(tmp_path):
    ckpt, state = write_training_ckpt(tmp_path / "last.ckpt", section(), step=7)
    ema_file = export_single_file(prepare(ckpt), tmp_path / "ema.safetensors", progress=False)
    raw_file = export_single_file(prepare(ckpt, ema=False), tmp_path / "raw.safetensors", half=True, progress=False)
    ema_t, meta = read_safetensors(ema_file)
    raw_t, raw_meta = read_safetensors(raw_file)
    assert (meta["sd_finetune.step"], meta["sd_finetune.ema"], raw_meta["sd_finetune.ema"]) == ("7", "true", "false")
    recorded = json.loads(meta["sd_finetune.config"])
    sampler = recorded["params"].pop("sampler_config")  # the resolved sampler settings travel with the weights
    assert recorded == section() and raw_meta["sd_finetune.dtype"] == "float16"
    assert sampler["clip_sample"] is False and sampler["steps_offset"] == 1
    key = "model.diffusion_model.input_blocks.0.0.weight"
    assert torch.equal(ema_t[key], state["model_ema.conv_in__weight"]) and raw_t[key].dtype == torch.float16
    assert torch.equal(raw_t[key], state["unet.conv_in.weight"].half())
    assert not any(k.startswith(("model_ema", "optimizer")) for k in ema_t)
    assert raw_file.stat().st_size < 0.55 * ema_file.stat().st_size
    # The config travels in the metadata: no config needed to load the export back.
    back = load_model(ema_file)
    assert torch.equal(back.state_dict()["unet.conv_in.weight"], state["model_ema.conv_in__weight"])
    folder = export_diffusers(prepare(ckpt), tmp_path / "pipe", progress=False)
    record = json.loads((folder / "sd_finetune.json").read_text())
    record["config"]["params"].pop("sampler_config")
    assert (record["step"], record["ema"], record["config"]) == (7, "true", section())
    with pytest.raises(ConfigError, match="holds no EMA"):
        prepare(folder, ema=True)


def test_convert_script_help_and_both_outputs(tmp_path, capsys):
    convert = script("convert")
    help_text = convert.build_parser().format_help()
    for words in ("--diffusers DIR", "--single-file FILE", "--no-ema", "--half", "from_single_file", "AUTOMATIC1111"):
        assert words in help_text
    run = tmp_path / "logs" / "2024-01-01T00-00-00_tiny"
    (run / "checkpoints").mkdir(parents=True)
    write_training_ckpt(run / "checkpoints" / "last.ckpt", section())
    assert convert.main([str(run), "--diffusers", str(tmp_path / "d"), "--single-file", str(tmp_path / "s.safetensors"),
                         "--half", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "step 7, EMA weights, fp16" in printed and "wrote" in printed
    assert read_safetensors(tmp_path / "s.safetensors")[1]["sd_finetune.dtype"] == "float16"
    assert convert.main([str(run)]) == 2 and "nothing to write" in capsys.readouterr().err


# ---- SD 2.x ----------------------------------------------------------------------------------------------------
def test_sd2_shaped_model_exports_open_clip_layout_that_diffusers_reads(tmp_path):
    from diffusers import StableDiffusionPipeline

    cfg = tiny_sd2_section()
    ckpt, _ = write_training_ckpt(tmp_path / "sd2.ckpt", cfg)
    item = prepare(ckpt, ema=False)
    path = export_single_file(item, tmp_path / "sd2.safetensors", progress=False)
    folder = export_diffusers(item, tmp_path / "sd2", progress=False)
    state = tensors(path)
    assert "cond_stage_model.model.transformer.resblocks.1.attn.in_proj_weight" in state
    assert describe(state).startswith("SD-2-shaped (OpenCLIP text encoder, 64-d context")
    pipe = StableDiffusionPipeline.from_single_file(str(path), config=str(folder), local_files_only=True)
    ours = ours_by_component(load_model(path, config=folder))
    for name, theirs in component_states(pipe).items():
        assert_same(theirs, ours[name])
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.tokenizer.pad_token == "!"
    # Real SD 2.x files carry OpenCLIP's last block and text projection, which the penultimate-layer encoder never
    # uses: they are dropped on loading.
    extra = dict(state)
    for k in [k for k in state if ".resblocks.1." in k]:
        extra[k.replace(".resblocks.1.", ".resblocks.2.")] = state[k]
    extra["cond_stage_model.model.text_projection"] = torch.zeros(64, 64)
    full = write_safetensors(tmp_path / "sd2-full.safetensors", extra)
    assert_same(load_model(full, config=cfg).state_dict(), load_model(path).state_dict())


def test_sd2_configs_match_diffusers_conversion_of_stabilitys_inference_yaml():
    """Stability's v2-inference(-v).yaml UNet params, converted by diffusers, give our YAML's UNet; parameter
    counts are SD 2.x's (UNet 865,910,724; 23-block OpenCLIP-H text tower 340,387,840)."""
    from diffusers.loaders.single_file_utils import create_unet_diffusers_config_from_ldm

    ldm_unet = {"in_channels": 4, "out_channels": 4, "model_channels": 320, "attention_resolutions": [4, 2, 1],
                "num_res_blocks": 2, "channel_mult": [1, 2, 4, 4], "num_head_channels": 64, "use_linear_in_transformer": True,
                "transformer_depth": 1, "context_dim": 1024}
    original = {"model": {"params": {"unet_config": {"params": ldm_unet},
                                     "first_stage_config": {"params": {"ddconfig": {"ch_mult": [1, 2, 4, 4]}}}}}}
    for name, px, param in (("sd-v2.yaml", 512, "eps"), ("sd-v2-768-v.yaml", 768, "v")):
        cfg = section(ROOT / "configs" / name)
        ours = cfg["params"]["unet_config"]["params"]["config"]
        theirs = create_unet_diffusers_config_from_ldm(original, {}, image_size=px)
        norm = lambda v: list(v) if isinstance(v, (list, tuple)) else v
        for key in ("sample_size", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                    "cross_attention_dim", "attention_head_dim", "use_linear_projection", "in_channels", "out_channels"):
            assert norm(ours[key]) == norm(theirs[key]), key
        assert cfg["params"]["parameterization"] == param
        with torch.device("meta"):
            model = instantiate_from_config({**cfg, "params": {**cfg["params"], "use_ema": False}})
        assert sum(p.numel() for p in model.unet.parameters()) == 865_910_724
        assert sum(p.numel() for p in model.cond_stage_model.parameters()) == 340_387_840


# ---- errors: one line naming expected and found ------------------------------------------------------------------
def one_line(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as err:
        fn(*args, **kwargs)
    message = str(err.value)
    assert "\n" not in message and len(message) < 400, message
    return message


def test_wrong_architecture_is_one_line(tmp_path):
    ckpt, _ = write_training_ckpt(tmp_path / "sd2.ckpt", tiny_sd2_section())
    sd2 = export_single_file(prepare(ckpt, ema=False), tmp_path / "sd2.safetensors", progress=False)
    message = one_line(load_weights, instantiate_from_config(section()), sd2)
    assert "expected SD-v1-shaped (CLIP text encoder, 32-d context)" in message
    assert "found SD-2-shaped (OpenCLIP text encoder, 64-d context)" in message and "(32, 64) there" in message
    sdxl = write_safetensors(tmp_path / "sdxl.safetensors", {
        "model.diffusion_model.input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        "conditioner.embedders.1.model.positional_embedding": torch.zeros(77, 1280)})
    assert "is SDXL" in one_line(load_model, sdxl, config=TINY)
    lora = write_safetensors(tmp_path / "lora.safetensors", {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320)})
    assert "a LoRA (1 low-rank adapter tensors" in one_line(load_weights, instantiate_from_config(section()), lora)


def test_broken_and_missing_files_are_one_line(single_file, tmp_path):
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(single_file.read_bytes()[: single_file.stat().st_size // 2])
    assert "is truncated: its header describes" in one_line(load_model, cut, config=TINY)
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {"model.diffusion_model.x": torch.zeros(1000)}}, pickle)
    (tmp_path / "cut.ckpt").write_bytes(pickle.read_bytes()[:300])
    assert "truncated or not a PyTorch checkpoint" in one_line(load_model, tmp_path / "cut.ckpt")
    (tmp_path / "notes.ckpt").write_text("hello")
    assert "truncated or not a PyTorch checkpoint" in one_line(load_model, tmp_path / "notes.ckpt")
    (tmp_path / "notes.safetensors").write_text("hello world, not tensors")
    assert "is not a safetensors file" in one_line(load_model, tmp_path / "notes.safetensors")
    torch.save({"state_dict": {}, "hook": ConfigError("x")}, tmp_path / "code.ckpt")
    assert "Python objects besides tensors" in one_line(load_model, tmp_path / "code.ckpt")
    assert "do not exist" in one_line(load_model, tmp_path / "nope.ckpt")
    unet_only = {k: v for k, v in tensors(single_file).items() if k.startswith("model.diffusion_model.")}
    partial = write_safetensors(tmp_path / "unet-only.safetensors", unet_only)
    assert "lacks" in one_line(load_model, partial, config=TINY)
    assert "holds no architecture" in one_line(load_model, partial)


# ---- --finetune_from ----------------------------------------------------------------------------------------------
def test_finetune_from_an_original_single_file_trains(single_file, tmp_path, image_folder, tiny_train_yaml):
    """The single file was written by the mapping that diffusers' from_single_file reads back exactly (above)."""
    proc = subprocess.run([sys.executable, "main.py", "-t", "--base", str(TINY), str(tiny_train_yaml), "-l",
                           str(tmp_path), "--finetune_from", str(single_file), "lightning.trainer.max_steps=2",
                           "+lightning.callbacks.image_logger.params.disabled=true"],
                          cwd=ROOT, env=main_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"tensors from {single_file} (original: SD-v1-shaped" in proc.stdout
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    last = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == 2
    source = load_model(single_file, config=TINY).state_dict()
    key = "first_stage_model.vae.decoder.conv_out.weight"
    assert torch.equal(last["state_dict"][key], source[key])


# ---- full size (slow) ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_full_size_sd_v1_round_trips_and_fp16_size(tmp_path):
    """Random SD v1 weights at full size: diffusers → project → diffusers and original → project → original are
    bit-exact, and the fp16 single file is about 2 GB."""
    folder = tmp_path / "sd-v1"
    with contextlib.redirect_stdout(io.StringIO()):
        assert script("make_tiny_sd").main(["--out", str(folder), "--full-size"]) == 0
    item = prepare(folder)
    first = export_single_file(item, tmp_path / "a.safetensors", progress=False)
    half = export_single_file(item, tmp_path / "half.safetensors", half=True, progress=False)
    again = export_diffusers(item, tmp_path / "again", progress=False)
    del item
    for sub, name in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"), ("text_encoder", "model")):
        assert_same_files(folder / sub / f"{name}.safetensors", again / sub / f"{name}.safetensors", strip="text_model.")
    model = load_model(first, config=folder)
    second = export_single_file(Exportable(model.state_dict(), model, {"config": {}}), tmp_path / "b.safetensors",
                                progress=False)
    del model
    assert_same_files(first, second)
    # Without metadata or config, SD v1 is recognised from its shapes and built from configs/pokemon.yaml.
    plain = write_safetensors(tmp_path / "plain.safetensors", tensors(half))
    assert "detected SD v1 (CLIP text encoder, 768-d context)" in load_model(plain).weights_summary
    size = half.stat().st_size
    print(f"full-size SD v1 fp16 single file: {size:,} bytes ({size / 2**30:.2f} GiB)")
    assert 1.9e9 < size < 2.2e9
