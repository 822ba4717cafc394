"""Caption an imagefolder with BLIP (transformers ``BlipForConditionalGeneration`` + ``BlipProcessor``).

Captions go into the folder's ``metadata.jsonl`` (and into ``.txt`` sidecars where those are kept), saved after
every batch: an interrupted run loses at most one batch, and the next run carries on with the images that still
have no caption. Captions already there (from metadata.jsonl or a sidecar) are kept unless ``overwrite``.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ldm.data.folder import find_images
from ldm.data.images import BadImage, load_rgb
from ldm.data.prepare import read_captions, write_captions
from ldm.util import ConfigError

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"


def load_blip(model: str, device: str) -> tuple[Any, Any]:
    """``(processor, model)`` from a local folder or a Hub id, in half precision on a GPU; one-line error if not."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    local = os.path.isdir(os.path.expanduser(model))
    path = os.path.expanduser(model) if local else model
    try:
        processor = BlipProcessor.from_pretrained(path)
        net = BlipForConditionalGeneration.from_pretrained(path, dtype=torch.float16 if device == "cuda" else torch.float32)
    except Exception as err:  # hub, offline, missing file and format errors all mean "cannot load"
        reason = f"{type(err).__name__}: {str(err).strip().splitlines()[0] if str(err).strip() else ''}"
        hint = "" if local else (
            f"; {model!r} is not a local folder, and Hub ids only load with network access (not with "
            f"HF_HUB_OFFLINE=1): download it once with `hf download {model} --local-dir models/blip` "
            "and pass --model models/blip"
        )
        raise ConfigError(f"cannot load BLIP model {model!r}: {reason}{hint}") from err
    return processor, net.to(device).eval()


def caption_folder(
    folder: str | Path,
    model: str = DEFAULT_MODEL,
    batch_size: int = 8,
    overwrite: bool = False,
    prefix: str = "",
    suffix: str = "",
    device: str | None = None,
    max_new_tokens: int = 40,
    min_new_tokens: int | None = None,
    num_beams: int = 3,
    sidecars: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Caption the images of ``folder`` that have no caption yet (all of them with ``overwrite``).

    The caption is ``prefix + BLIP text + suffix``. Returns counts and the names BLIP gave an empty caption
    (left uncaptioned, so the next run tries them again) or that would not decode. BLIP is not loaded at all
    when there is nothing to do.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"folder '{folder}' does not exist")
    names = [p.relative_to(folder).as_posix() for p in find_images(folder)]
    if not names:
        raise ConfigError(f"no images in '{folder}'")
    captions = read_captions(folder, names)
    todo = [n for n in names if overwrite or not captions[n]]
    result: dict[str, Any] = {"images": len(names), "captioned": 0, "kept": len(names) - len(todo), "empty": [],
                              "unreadable": []}
    if not todo:
        return result
    import torch
    from tqdm import tqdm

    from ldm.inference import pick_device

    device = device or str(pick_device())  # CUDA, then MPS, then CPU
    log(f"captioning {len(todo)} of {len(names)} images with {model} on {device}")
    processor, net = load_blip(model, device)
    gen = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
    if min_new_tokens:
        gen["min_new_tokens"] = min_new_tokens
    with tqdm(total=len(todo), unit="img", desc="caption", disable=not progress) as bar:
        for start in range(0, len(todo), batch_size):
            batch, images = [], []
            for name in todo[start:start + batch_size]:
                try:
                    images.append(load_rgb(folder / name))
                    batch.append(name)
                except BadImage as err:
                    result["unreadable"].append(f"{name}: {err.__cause__ or err}")
            if images:
                inputs = processor(images=images, return_tensors="pt").to(device)
                pixels = inputs["pixel_values"].to(net.dtype)
                with torch.inference_mode():
                    ids = net.generate(pixel_values=pixels, **gen)
                for name, text in zip(batch, processor.batch_decode(ids, skip_special_tokens=True)):
                    text = " ".join(text.split())
                    if text:
                        captions[name] = f"{prefix}{text}{suffix}"
                        result["captioned"] += 1
                    else:
                        result["empty"].append(name)
                write_captions(folder, captions, sidecars, changed=batch)
            bar.update(len(todo[start:start + batch_size]))
    return result
