"""CompVis's networks (UNetModel, AutoencoderKL, the CLIP embedders) → this project's blocks of diffusers/transformers
networks.

The UNet and VAE configs are derived from CompVis's params the way diffusers' single-file converters derive them
(``create_unet_diffusers_config_from_ldm``, ``create_vae_diffusers_config_from_ldm``; tests compare the two), plus
the values CompVis's code hard-wires (GroupNorm with 32 groups, SiLU, ...). The conditioners' architectures are the
ones this project already writes out: configs/architectures/sd-v1.yaml (OpenAI CLIP ViT-L/14 text tower),
sd-v1-image-variations.yaml (its image tower) and configs/sd-v2.yaml (OpenCLIP ViT-H/14).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from ldm.compvis.keys import Params, Record, refuse

LATENT_DIFFUSION = "ldm.models.diffusion.ddpm.LatentDiffusion"
UNET = "ldm.modules.diffusionmodules.openaimodel.UNetModel"
AUTOENCODER = "ldm.models.autoencoder.AutoencoderKL"
CLIP_TEXT = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
OPEN_CLIP_TEXT = "ldm.modules.encoders.modules.FrozenOpenCLIPEmbedder"
CLIP_IMAGE = "ldm.modules.encoders.modules.FrozenCLIPImageEmbedder"
TARGETS = {LATENT_DIFFUSION: "ldm.models.diffusion.LatentDiffusion", UNET: "ldm.models.denoiser.unet",
           AUTOENCODER: "ldm.models.first_stage.AutoencoderKLFirstStage",
           CLIP_TEXT: "ldm.models.conditioners.CLIPTextConditioner",
           OPEN_CLIP_TEXT: "ldm.models.conditioners.CLIPTextConditioner",
           CLIP_IMAGE: "ldm.models.conditioners.CLIPImageConditioner"}

# CompVis's make_beta_schedule names → diffusers'. CompVis's "linear" interpolates sqrt(beta) (diffusers'
# scaled_linear) and its "sqrt_linear" interpolates beta itself (diffusers' linear); "cosine" is Nichol & Dhariwal's
# with s = 0.008 and betas capped at 0.999, as diffusers' squaredcos_cap_v2.
BETA_SCHEDULES = {"linear": "scaled_linear", "sqrt_linear": "linear", "cosine": "squaredcos_cap_v2"}
# CompVis logs val/loss_simple(_ema) and val/loss(_ema); this project's val/loss is the one validation loss.
MONITORS = {"val/loss_simple_ema", "val/loss_simple", "val/loss_ema", "val/loss"}
UNET_TRAINABLE = {True: "all", "all": "all", "attn": "attn2", "conv_in": ["conv_in.*"]}
OPENAI_CLIP_L = "openai/clip-vit-large-patch14"
ROOT = Path(__file__).resolve().parents[2]


@lru_cache(maxsize=None)
def _architecture(path: str) -> dict:
    from ldm.config import load_yaml, to_container

    return to_container(load_yaml(ROOT / path).model.params)


def _conditioner_of(path: str) -> dict:
    import copy

    return copy.deepcopy(_architecture(path)["cond_stage_config"]["params"])


def _need(p: Params, name: str, what: str):
    if name not in p:
        refuse(p.key(name), f"required ({what} has no default)")
    return p.take(name)


def _check_target(block, where: str, expected: str, what: str, record: Record) -> dict:
    if not isinstance(block, dict) or "target" not in block:
        refuse(where, f"expected a {{target: {expected}, params: ...}} block, got {block!r}")
    if block["target"] != expected:
        refuse(f"{where}.target", f"{block['target']!r} has no translation here; {what}")
    extra = sorted(set(block) - {"target", "params", "ckpt_path"})
    if extra:
        refuse(f"{where}.{extra[0]}", "only target and params are read beside a block's target")
    if "ckpt_path" in block:  # beside target: CompVis passes only params to the class, so it is never read
        record.ignored.append(f"{where}.ckpt_path")
    return block


# ---- UNet ------------------------------------------------------------------------------------------------------
def unet_config(params: dict | None, latent_size: int, record: Record, where: str) -> tuple[dict, bool]:
    """CompVis ``UNetModel`` params → (``UNet2DConditionModel`` kwargs, gradient checkpointing)."""
    p = Params(params, where, record)
    what = "CompVis's UNetModel"
    channels = int(_need(p, "model_channels", what))
    mult = [int(m) for m in p.take("channel_mult", (1, 2, 4, 8))]
    attention = [int(r) for r in _need(p, "attention_resolutions", what)]
    per_block = _need(p, "num_res_blocks", what)
    if not isinstance(per_block, int):
        p.refuse("num_res_blocks", "one number of resnets for every level (diffusers' layers_per_block)")
    widths = [channels * m for m in mult]
    heads, head_channels = p.take("num_heads", -1), p.take("num_head_channels", -1)
    if head_channels == -1:
        if heads is None or heads < 1:
            p.refuse("num_heads", "give num_heads >= 1 or num_head_channels")
        head_dim = heads  # diffusers' attention_head_dim holds the number of heads (its historical name)
    else:
        if any(w % head_channels for w in widths):
            p.refuse("num_head_channels", f"every level's width {widths} must be a multiple of it")
        head_dim = [w // head_channels for w in widths]  # heads per level
    if not p.take("use_spatial_transformer", False):
        p.refuse("use_spatial_transformer", "this project's denoiser is the cross-attention UNet "
                 "(diffusers' UNet2DConditionModel); only use_spatial_transformer: true translates")
    context = p.take("context_dim")
    if isinstance(context, (list, tuple)):
        if len(set(context)) != 1:
            p.refuse("context_dim", "one context width for every level")
        context = context[0]
    if context is None:
        p.refuse("context_dim", "the UNet needs a cross-attention width (768 for SD v1's CLIP)")
    depth = p.take("transformer_depth", 1)
    res = [2 ** i for i in range(len(widths))]  # the downsampling rate of each level, as attention_resolutions counts
    config = {
        "sample_size": latent_size,
        "in_channels": int(_need(p, "in_channels", what)), "out_channels": int(_need(p, "out_channels", what)),
        "block_out_channels": widths, "layers_per_block": per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if r in attention else "DownBlock2D" for r in res],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "up_block_types": ["CrossAttnUpBlock2D" if r in attention else "UpBlock2D" for r in reversed(res)],
        "cross_attention_dim": int(context), "attention_head_dim": head_dim,
        "transformer_layers_per_block": depth if isinstance(depth, int) else list(depth),
        "use_linear_projection": bool(p.take("use_linear_in_transformer", False)),
        "dropout": float(p.take("dropout", 0.0)),
        # Hard-wired in CompVis's code (GroupNorm32, SiLU, sinusoidal embedding with cos first, 3x3 conv
        # downsampling with padding 1): diffusers' values for them, written out as configs/architectures does.
        "norm_num_groups": 32, "norm_eps": 1e-5, "act_fn": "silu", "flip_sin_to_cos": True, "freq_shift": 0,
        "downsample_padding": 1, "mid_block_scale_factor": 1, "center_input_sample": False,
    }
    if p.take("use_scale_shift_norm", False):
        config["resnet_time_scale_shift"] = "scale_shift"
    disabled = p.take("disable_self_attentions")
    if disabled is not None:
        config["only_cross_attention"] = [bool(d) for d in disabled]
    checkpointing = bool(p.take("use_checkpoint", False))
    p.ignore("image_size")  # CompVis marks it unused: model.params.image_size sets the latent size
    p.ignore("legacy")  # changes the head count only of the attention blocks a spatial-transformer UNet lacks
    p.ignore("num_heads_upsample")
    p.ignore("use_new_attention_order")
    for name in ("use_fp16", "use_bf16"):  # the precision is lightning.trainer.precision, or --precision to sample
        p.ignore(name)
    p.ignore("spatial_transformer_attn_type")  # the attention kernel: PyTorch's SDPA here
    p.ignore("conv_resample", "only resampling by convolution (true) is supported", allowed=True)
    p.ignore("dims", "only 2-D UNets", allowed=2)
    p.ignore("resblock_updown", "diffusers' UNet resamples with convolutions, not resnets", allowed=False)
    p.ignore("num_classes", "class-conditional UNets are not supported", allowed=None)
    p.ignore("n_embed", "only continuous outputs", allowed=None)
    p.ignore("num_attention_blocks", "attention in every resnet of a level", allowed=None)
    p.ignore("disable_middle_self_attn", "the middle block keeps its self-attention", allowed=False)
    p.finish(what)
    return config, checkpointing


# ---- first stage ----------------------------------------------------------------------------------------------
def first_stage(block: dict, latent_size: int, scale_factor: float, record: Record, weights_given: bool,
                where: str = "model.params.first_stage_config") -> dict:
    _check_target(block, where, AUTOENCODER, "only the KL autoencoder (AutoencoderKL) translates", record)
    p = Params(block.get("params"), f"{where}.params", record)
    what = "CompVis's AutoencoderKL"
    embed_dim = int(_need(p, "embed_dim", what))
    dd = Params(_need(p, "ddconfig", what), f"{where}.params.ddconfig", record)
    if "ckpt_path" in p:
        path = p.take("ckpt_path")
        if not weights_given:
            state = "does not exist" if not Path(str(path)).exists() else "is a first-stage-only file"
            p.refuse("ckpt_path", f"{path!r} {state}; the VAE's weights come with the whole SD checkpoint: pass "
                     "--finetune_from <sd .ckpt> (or --ckpt to sample)")
        record.note(f"{where}.params.ckpt_path {path!r} is not read: the weights come from --finetune_from/--ckpt")
    p.ignore("ignore_keys")
    p.ignore("lossconfig")  # the autoencoder's own training loss: it is frozen here
    p.ignore("monitor")
    p.ignore("image_key")
    p.ignore("colorize_nlabels", "segmentation-map inputs are not supported", allowed=None)
    p.finish(what)
    dwhat = "CompVis's KL autoencoder ddconfig"
    dd.ignore("double_z", "the KL autoencoder predicts mean and log-variance (double_z: true)", allowed=True)
    z_channels = int(_need(dd, "z_channels", dwhat))
    if z_channels != embed_dim:
        refuse(f"{where}.params.embed_dim", f"{embed_dim} differs from ddconfig.z_channels {z_channels}; "
               "diffusers' AutoencoderKL has one latent width")
    ch, ch_mult = int(_need(dd, "ch", dwhat)), [int(m) for m in _need(dd, "ch_mult", dwhat)]
    if dd.take("attn_resolutions", []):
        dd.refuse("attn_resolutions", "diffusers' AutoencoderKL has attention in its middle block only ([])")
    dd.ignore("resolution")  # only sizes attn_resolutions, which are empty
    dd.ignore("dropout")  # the frozen VAE runs in eval mode, where dropout does nothing
    dd.ignore("attn_type", "vanilla attention (any kernel) only", allowed=("vanilla", "vanilla-xformers"))
    dd.ignore("resamp_with_conv", "convolutional resampling only", allowed=True)
    dd.ignore("tanh_out", "no tanh on the decoder output", allowed=False)
    dd.ignore("give_pre_end", "the full decoder", allowed=False)
    dd.ignore("use_linear_attn", "vanilla attention only", allowed=False)
    n = len(ch_mult)
    config = {"in_channels": int(_need(dd, "in_channels", dwhat)), "out_channels": int(_need(dd, "out_ch", dwhat)),
              "latent_channels": z_channels, "block_out_channels": [ch * m for m in ch_mult],
              "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
              "layers_per_block": int(_need(dd, "num_res_blocks", dwhat)), "norm_num_groups": 32, "act_fn": "silu",
              "sample_size": latent_size * 2 ** (n - 1)}  # the image size, as diffusers' converter writes it
    dd.finish(dwhat)
    record.block(where, AUTOENCODER, TARGETS[AUTOENCODER])
    return {"target": TARGETS[AUTOENCODER], "params": {"scale_factor": scale_factor, "config": config}}


# ---- conditioners ---------------------------------------------------------------------------------------------
def _local_clip(name: str, tower: str) -> dict | None:
    """A local transformers CLIP folder (``tower``: text or vision): loaded from there, the text tower with its
    tokenizer when the folder has one. Its architecture is written out too, so a sampling script can build it and
    take the weights from --ckpt."""
    import json

    from ldm.weights.source import TEXT_KEYS, VISION_KEYS

    folder = Path(str(name)).expanduser()
    if not (folder / "config.json").is_file():
        return None
    config = json.loads((folder / "config.json").read_text())
    config = config.get(f"{tower}_config", config)  # a whole CLIPModel folder nests each tower's config
    keys = TEXT_KEYS if tower == "text" else VISION_KEYS
    params = {"pretrained": str(folder), "subfolder": None, "config": {k: config[k] for k in keys if k in config}}
    if tower == "text" and ((folder / "vocab.json").is_file() or (folder / "tokenizer.json").is_file()):
        params["tokenizer"] = str(folder)
    return params


def _frozen(p: Params, trainable: bool, record: Record, where: str) -> bool:
    """CompVis's text embedders freeze their weights (``freeze: true``), whatever cond_stage_trainable says."""
    freeze = p.take("freeze", True)
    if trainable and freeze:
        record.note(f"{where}: cond_stage_trainable is true but the embedder freezes its weights (freeze: true), "
                    "so the text encoder stays frozen, as in CompVis; set freeze: false to train it")
    return bool(trainable and not freeze)


def conditioner(block, trainable: bool, ucg_rate: float, record: Record, weights_given: bool,
                where: str = "model.params.cond_stage_config") -> tuple[dict, str]:
    """A CompVis embedder block → (our conditioner block, "text" or "image")."""
    if block in ("__is_unconditional__", "__is_first_stage__"):
        refuse(where, f"{block!r}: this project's models are conditioned on a text or image encoder")
    targets = (CLIP_TEXT, OPEN_CLIP_TEXT, CLIP_IMAGE)
    target = block.get("target") if isinstance(block, dict) else None
    _check_target(block, where, target if target in targets else CLIP_TEXT,
                  "FrozenCLIPEmbedder, FrozenOpenCLIPEmbedder and FrozenCLIPImageEmbedder translate", record)
    p = Params(block.get("params"), f"{where}.params", record)
    p.ignore("device")  # the conditioner goes where the model goes
    params: dict = {}
    unread = "random until --finetune_from (or --ckpt) loads an SD checkpoint"
    if target == CLIP_TEXT:
        version = p.take("version", OPENAI_CLIP_L)
        local = _local_clip(version, "text")
        if local is not None:
            params.update(local)
        elif version == OPENAI_CLIP_L:
            params["config"] = _conditioner_of("configs/architectures/sd-v1.yaml")["config"]
            if not weights_given:
                record.note(f"{where}: {OPENAI_CLIP_L} is built from its architecture (the Hub is never read): "
                            f"its weights are {unread}")
        else:
            p.refuse("version", f"not a local CLIP folder (a config.json in it) nor {OPENAI_CLIP_L}")
        layer = p.take("layer", "last")
        if layer not in ("last", "penultimate"):
            p.refuse("layer", "last or penultimate (CLIPTextConditioner's layers)")
        p.ignore("layer_idx")  # only read with layer: hidden
        params["layer"] = layer
    elif target == OPEN_CLIP_TEXT:
        p.ignore("arch", "only ViT-H-14 (SD 2.x's text encoder)", allowed="ViT-H-14")
        p.ignore("version")  # open_clip's pretrained tag: the weights come from the SD checkpoint here
        sd2 = _conditioner_of("configs/sd-v2.yaml")
        layer = p.take("layer", "last")
        if layer not in ("last", "penultimate"):
            p.refuse("layer", "last or penultimate")
        # Penultimate: the 24th block never runs, so the encoder is built without it and read at its last layer.
        sd2["config"]["num_hidden_layers"] = 23 if layer == "penultimate" else 24
        params.update(config=sd2["config"], pad_token=sd2["pad_token"], layer="last")
        if not weights_given:
            record.note(f"{where}: OpenCLIP ViT-H-14 is built from its architecture: its weights are {unread}")
    else:
        name = p.take("model", "ViT-L/14")
        local = _local_clip(name, "vision")
        if local is not None:  # a transformers CLIPVisionModelWithProjection folder
            params.update(local)
        elif name != "ViT-L/14":
            p.refuse("model", "ViT-L/14 (the image-variations model's encoder) or a local transformers CLIP folder")
        else:
            params["config"] = _conditioner_of("configs/architectures/sd-v1-image-variations.yaml")["config"]
        p.ignore("jit")
        # CompVis's embedder resizes with kornia, bicubic, antialias off unless set.
        params.update(interpolation="bicubic", antialias=bool(p.take("antialias", False)))
        if not weights_given and local is None:
            record.note(f"{where}: CLIP ViT-L/14's image tower is built from its architecture: its weights "
                        f"are {unread}")
    if target != CLIP_IMAGE:
        max_length = int(p.take("max_length", 77))
        if max_length != 77:
            params["max_length"] = max_length
        trainable = _frozen(p, trainable, record, where)
    params.update(trainable=bool(trainable), ucg_rate=float(ucg_rate))
    p.finish(f"CompVis's {target.rsplit('.', 1)[1]}")
    record.block(where, target, TARGETS[target])
    return {"target": TARGETS[target], "params": params}, "image" if target == CLIP_IMAGE else "text"
