"""A Hub-ready model folder: what ``scripts/convert.py SOURCE --hub OUT`` writes, ready for one upload.

    OUT/model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/   the diffusers pipeline, fp32, plus the
        *.fp16.safetensors files that from_pretrained(OUT, variant="fp16") reads
    OUT/<name>.safetensors                      the single file (original layout, fp16) for AUTOMATIC1111 / ComfyUI
    OUT/<name>-lora.safetensors                 a LoRA run's adapter, kohya / A1111 layout
    OUT/pytorch_lora_weights.safetensors        ... and diffusers' layout (pipe.load_lora_weights(REPO_ID))
    OUT/README.md, OUT/images/                  the model card: front matter, training settings, sample grids

The card's settings come from the run's config (``<run>/configs/*-project.yaml`` and ``*-lightning.yaml``) and its
sample images are the newest grid of each kind in the run's ``images/``, copied and linked by relative path.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

from ldm.util import ConfigError

# Licences of the usual bases, for local copies whose folder carries no model card of its own.
KNOWN_LICENSES = {"runwayml/stable-diffusion-v1-5": "creativeml-openrail-m",
                  "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
                  "CompVis/stable-diffusion-v1-4": "creativeml-openrail-m",
                  "stabilityai/stable-diffusion-2": "openrail++", "stabilityai/stable-diffusion-2-base": "openrail++",
                  "stabilityai/stable-diffusion-2-1": "openrail++",
                  "stabilityai/stable-diffusion-2-1-base": "openrail++",
                  "lambdalabs/sd-image-variations-diffusers": "creativeml-openrail-m"}
WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "model.safetensors")


def run_dir_of(source: Path) -> Path | None:
    """The run dir behind SOURCE (the dir itself, or a checkpoint inside its ``checkpoints/``), if any."""
    for path in (source, source.parent.parent):
        if (path / "configs").is_dir() and (path / "checkpoints").is_dir():
            return path
    return None


def run_config(run: Path | None) -> dict:
    """The run's resolved project config merged with its lightning config (``{}`` without a run dir)."""
    from ldm.config import load_yaml, to_container

    if run is None:
        return {}
    merged = {}
    for kind in ("project", "lightning"):
        files = sorted((run / "configs").glob(f"*-{kind}.yaml"))
        if files:
            merged.update(to_container(load_yaml(files[-1])))
    return merged


def base_model(pretrained: str | None) -> tuple[str | None, str]:
    """``(Hub id or None, licence)`` of the base weights: a Hub id as given, a Hub cache snapshot's id, or a local
    folder's own card's ``base_model``; the licence from that card, the known bases, else ``unknown``."""
    if not pretrained:
        return None, "unknown"
    card = {}
    path = Path(pretrained)
    if (path / "README.md").is_file():
        from huggingface_hub import ModelCard

        card = ModelCard.load(path / "README.md").data.to_dict()
    cached = re.search(r"models--([^/]+)--([^/]+)/snapshots", str(path))
    repo = (f"{cached[1]}/{cached[2]}" if cached else
            pretrained if not path.exists() and re.fullmatch(r"[\w.-]+/[\w.-]+", pretrained) else card.get("base_model"))
    repo = repo[0] if isinstance(repo, list) else repo
    return repo, card.get("license") or KNOWN_LICENSES.get(repo or "", "unknown")


def newest_grids(run: Path | None) -> list[Path]:
    """The newest grid of each kind (``<kind>_gs-<step>...png``) in ``images/train`` and ``images/val``."""
    if run is None:
        return []
    newest = {}
    for split in ("train", "val"):
        for png in sorted((run / "images" / split).glob("*.png")):
            kind = png.name.split("_gs-")[0]
            step = re.search(r"_gs-(\d+)", png.name)
            key = (split, kind)
            if key not in newest or (step and int(step[1]) >= newest[key][0]):
                newest[key] = (int(step[1]) if step else 0, png)
    return [png for _, png in newest.values()]


def add_fp16_variant(folder: Path) -> list[Path]:
    """``<component>/<weights>.fp16.safetensors`` beside each fp32 file, diffusers' naming for ``variant="fp16"``;
    tensors are read one at a time from the fp32 file, so no second copy of the model is held."""
    from safetensors import safe_open

    from ldm.weights.files import write_safetensors

    written = []
    for name in WEIGHT_FILES:
        for fp32 in sorted(folder.glob(f"*/{name}")):
            with safe_open(str(fp32), framework="pt") as f:
                lazy = _Lazy(f)
                written.append(write_safetensors(fp32.with_suffix(".fp16.safetensors"), lazy, f.metadata(),
                                                 half=True))
    return written


class _Lazy(dict):
    """A mapping of a safetensors file's tensors that reads each one when asked for it."""

    def __init__(self, handle):
        super().__init__((k, None) for k in handle.keys())
        self.handle = handle

    def __getitem__(self, key):
        return self.handle.get_tensor(key)

    def items(self):
        return ((k, self[k]) for k in self)


def upload_hint(out: Path, repo_id: str | None) -> str:
    repo = repo_id or "<user>/<model>"
    return (f"to upload: hf upload {repo} {out} . --repo-type model\n"
            f"  or in Python: huggingface_hub.HfApi().upload_folder(folder_path={str(out)!r}, repo_id={repo!r})")


def push(out: Path, repo_id: str) -> str:
    """Upload ``out`` to the Hub model repo ``repo_id`` (created when missing): one huggingface_hub call."""
    from huggingface_hub import HfApi, constants

    if constants.HF_HUB_OFFLINE:
        raise ConfigError(f"--push {repo_id}: HF_HUB_OFFLINE is set, so nothing can be uploaded; "
                          + upload_hint(out, repo_id).replace("\n", ";"))
    api = HfApi()
    api.create_repo(repo_id, repo_type="model", exist_ok=True)
    return api.upload_folder(folder_path=str(out), repo_id=repo_id, repo_type="model").commit_url


def export_hub(source: str | Path, out: str | Path, ema: bool | None = None, config=None, name: str | None = None,
               force: bool = False, progress: bool = True) -> dict[str, Path]:
    """Write the Hub folder for SOURCE (see the module docstring); returns what was written, by role."""
    from ldm.hub_card import write_model_card
    from ldm.lora import run_name, save_lora
    from ldm.weights import export_diffusers, export_single_file, prepare

    source, out = Path(source), Path(out)
    run = run_dir_of(source)
    name = name or (run_name(run) if run else source.stem)
    item = prepare(source, ema=ema, config=config)
    written = {"diffusers": export_diffusers(item, out, half=False, progress=progress, force=force)}
    add_fp16_variant(out)
    written["single file"] = export_single_file(item, out / f"{name}.safetensors", half=True, progress=progress)
    if item.lora:
        written["lora (kohya)"] = save_lora(item.model, out / f"{name}-lora.safetensors", "kohya", adapters=item.lora)
        written["lora (diffusers)"] = save_lora(item.model, out / "pytorch_lora_weights.safetensors", "diffusers",
                                                adapters=item.lora)
    images = []
    for png in newest_grids(run):
        images.append(out / "images" / f"{png.parent.name}-{png.name}")
        images[-1].parent.mkdir(exist_ok=True)
        shutil.copyfile(png, images[-1])
    settings = run_config(run) or {"model": item.info["config"]}
    written["model card"] = write_model_card(out, name, item, settings, written, images)
    return written
