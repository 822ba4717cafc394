"""The Hub folder's ``README.md``: front matter the Hub reads (base model, licence, tags, a DreamBooth run's
instance prompt), how to load each file, the training settings from the run's config, and its sample grids."""
from __future__ import annotations

from pathlib import Path


ROLES = {"single file": "single file, original layout, fp16: AUTOMATIC1111, ComfyUI, InvokeAI",
         "lora (kohya)": "LoRA adapter, kohya / A1111 layout: ComfyUI, AUTOMATIC1111, InvokeAI, stable-diffusion.cpp",
         "lora (diffusers)": "LoRA adapter, diffusers layout: `pipe.load_lora_weights(...)`"}


def _get(tree: dict, dotted: str, default=None):
    for part in dotted.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return default
        tree = tree[part]
    return tree


def training_settings(settings: dict, item) -> list[tuple[str, str]]:
    """(setting, value) rows for the card, from the run's config; only those the run set."""
    model, train = settings.get("model", {}), _get(settings, "data.params.train", {}) or {}
    lora = _get(model, "params.lora")
    size = item.model.unet.config.sample_size * item.model.first_stage_model.downsample
    rows = [("learning rate (model.base_learning_rate)", model.get("base_learning_rate")),
            ("steps trained", item.info.get("step")), ("max_steps", _get(settings, "lightning.trainer.max_steps")),
            ("batch size", _get(settings, "data.params.batch_size")),
            ("gradient accumulation", _get(settings, "lightning.trainer.accumulate_grad_batches")),
            ("precision", _get(settings, "lightning.trainer.precision")), ("resolution", f"{size}×{size}"),
            ("prediction", {"eps": "epsilon", "v": "v-prediction"}.get(_get(model, "params.parameterization"))),
            ("trained", "LoRA adapters" if lora else _get(model, "params.trainable")),
            ("weights", "EMA" if item.info.get("ema") == "true" else "raw (no EMA)"),
            ("dataset", str(train.get("target", "")).rsplit(".", 1)[-1] or None)]
    if lora:
        rows += [("LoRA rank / alpha", f"{lora.get('rank', 4)} / {lora.get('alpha') or lora.get('rank', 4)}"),
                 ("LoRA targets", ", ".join(lora.get("target_modules") or ["to_q", "to_k", "to_v", "to_out.0"])),
                 ("LoRA on the text encoder", bool(lora.get("text_encoder")))]
    params = train.get("params") or {}
    if "instance_prompt" in params:
        rows += [("instance prompt", params["instance_prompt"]), ("class prompt", params.get("class_prompt")),
                 ("prior preservation", params.get("with_prior_preservation")),
                 ("prior loss weight", _get(model, "params.prior_loss_weight"))]
    return [(k, str(v)) for k, v in rows if v not in (None, "", "None")]


def write_model_card(out: Path, name: str, item, settings: dict, written: dict, images: list[Path]) -> Path:
    from huggingface_hub import ModelCard, ModelCardData

    from ldm.hub import base_model

    pretrained = _get(settings, "model.params.pretrained")
    repo, license_ = base_model(pretrained)
    instance = _get(settings, "data.params.train.params.instance_prompt")
    from ldm.lora_files import is_sdxl

    lora = "lora (kohya)" in written
    sdxl = is_sdxl(item.model)
    pipeline = "StableDiffusionXLPipeline" if sdxl else "StableDiffusionPipeline"
    tags = ["stable-diffusion", "stable-diffusion-diffusers", "text-to-image", "diffusers", "sd-finetune"]
    tags += ["stable-diffusion-xl"] if sdxl else []
    tags += (["lora"] if lora else []) + (["dreambooth"] if instance else [])
    data = ModelCardData(base_model=repo, license=license_, tags=tags, library_name="diffusers",
                         pipeline_tag="text-to-image", instance_prompt=instance)
    prompt = instance or "a photo of ..."
    files = [f"| `{Path(p).relative_to(out).as_posix()}` | {ROLES.get(role, role)} |"
             for role, p in written.items() if role in ROLES]
    # A local base is named by its folder only: the card is public, the path on this machine is not.
    origin = f"[{repo}](https://huggingface.co/{repo})" if repo else \
        f"local weights `{Path(pretrained).name}`" if pretrained else "a Stable Diffusion model"
    lines = [f"# {name}", "",
             f"Fine-tuned from {origin} with this project (CompVis-style Stable Diffusion fine-tuning).", ""]
    if instance:
        lines += [f"Trigger: the instance prompt **`{instance}`**.", ""]
    lines += ["## Use it", "", "```python", "import torch", f"from diffusers import {pipeline}", "",
              f'pipe = {pipeline}.from_pretrained("<this repo>", variant="fp16", torch_dtype=torch.float16)',
              f'image = pipe("{prompt}").images[0]', "```", "",
              "| file | what |", "|---|---|", "| `model_index.json`, `unet/`, `vae/`, `text_encoder/`, … | "
              "diffusers pipeline, fp32 (and `*.fp16.safetensors`: `variant=\"fp16\"`) |", *files, ""]
    if lora:
        lines += [f"The LoRA files hold only the adapter: `{name}-lora.safetensors` (kohya / AUTOMATIC1111 layout) "
                  "for ComfyUI, AUTOMATIC1111, InvokeAI and stable-diffusion.cpp; `pytorch_lora_weights.safetensors` "
                  f"for diffusers on the base model: `pipe.load_lora_weights(\"<this repo>\")`. The pipeline folder "
                  "and single file already have it merged.", ""]
    rows = training_settings(settings, item)
    if rows:
        lines += ["## Training", "", "| setting | value |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]
    if images:
        lines += ["## Samples", "", "The newest sample grids of the run:", ""]
        lines += [f"![{p.stem}]({p.relative_to(out).as_posix()})" for p in images] + [""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    path = out / "README.md"
    card.save(path)
    return path
