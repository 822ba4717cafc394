"""CompVis's ``data`` section (``main.DataModuleFromConfig`` and the fork's ``ldm.data.simple`` datasets) →
``ldm.data.datamodule.DataModuleFromConfig`` with this project's datasets.

Image transforms are the same torchvision blocks in both (PIL's integer ``interpolation`` codes included). CompVis
trains on every image, so the translated DataModule holds none out for a validation loss (``holdout: 0``). The
batch keys CompVis datasets name (``image_key``, ``caption_key``) must be the ones the model reads; here every
dataset gives ``image`` and ``caption``, and the model is translated to read those.
"""
from __future__ import annotations

from pathlib import Path

from ldm.compvis.keys import Params, Record, refuse

DATAMODULE = "main.DataModuleFromConfig"
HF_DATASET = "ldm.data.simple.hf_dataset"
FOLDER_DATA = "ldm.data.simple.FolderData"
TEXT_ONLY = "ldm.data.simple.TextOnly"
WEB_DATAMODULE = "ldm.data.laion.WebDataModuleFromConfig"
TARGETS = {DATAMODULE: "ldm.data.datamodule.DataModuleFromConfig", HF_DATASET: "ldm.data.hf.hf_dataset",
           FOLDER_DATA: "ldm.data.folder.FolderDataset", TEXT_ONLY: "ldm.data.text_only.TextOnly"}
SPLITS = ("train", "validation", "test")


def _hf_dataset(p: Params) -> tuple[dict, dict]:
    params = {"name": p.take("name"), "split": p.take("split", "train"),
              "image_transforms": p.take("image_transforms", []),
              "image_column": p.take("image_column", "image"), "text_column": p.take("text_column", "text")}
    if params["name"] is None:
        refuse(p.key("name"), "required: a Hugging Face dataset name or a local folder")
    return params, {"image_key": p.take("image_key", "image"), "caption_key": p.take("caption_key", "txt")}


def _folder_data(p: Params, record: Record) -> tuple[dict, dict]:
    from ldm.data.folder import find_images

    root = p.take("root_dir")
    if root is None:
        refuse(p.key("root_dir"), "required: the folder of images")
    params = {"root": root, "image_transforms": p.take("image_transforms", []),
              "default_caption": p.take("default_caption", "")}
    caption_file = p.take("caption_file")
    if caption_file is not None:
        if Path(str(caption_file)).suffix.lower() != ".jsonl":
            p.refuse("caption_file", "only a .jsonl caption file ({\"file_name\": ..., \"text\": ...} per line) is "
                     "read here; write the .json mapping as metadata.jsonl")
        params["caption_file"] = caption_file
    ext = p.take("ext", "jpg")
    exts = {str(e).lower().lstrip(".") for e in ([ext] if isinstance(ext, str) else ext)}
    folder = Path(str(root)).expanduser()
    if folder.is_dir():  # a missing folder is FolderDataset's one-line error
        images = find_images(folder)
        others = [f for f in images if f.suffix.lower().lstrip(".") not in exts]
        if others:
            p.refuse("ext", f"FolderData reads only {sorted(exts)} files but {str(root)!r} also holds {len(others)} "
                     f"other images (e.g. {others[0].name}), which FolderDataset would train on; move them out")
        if caption_file is None and ((folder / "metadata.jsonl").is_file() or any(
                f.with_suffix(".txt").is_file() for f in images)):
            record.note(f"{p.where}: FolderData without caption_file gives every image default_caption; "
                        f"FolderDataset reads {root}'s metadata.jsonl and .txt captions (they win over it)")
    p.ignore("postprocess", "no post-processing of items", allowed=None)
    p.ignore("return_paths")  # items name their file in the skipped-image warnings instead
    return params, {"image_key": "image", "caption_key": "txt"}


def _text_only(p: Params) -> tuple[dict, dict]:
    captions = p.take("captions")
    if captions is None:
        refuse(p.key("captions"), "required: the validation prompts")
    size = p.take("output_size")
    if size is None:
        refuse(p.key("output_size"), "required: the size prompts are sampled at")
    params = {"caption_file": captions} if isinstance(captions, str) else {"captions": list(captions)}
    params["output_size"] = size
    # The fork repeats every caption n_gpus times so each GPU's share holds them all; each repeat here gets its
    # own seed, in the same order.
    repeats = int(p.take("n_gpus", 1))
    if repeats > 1:
        params["n_per_caption"] = repeats
    return params, {"image_key": p.take("image_key", "image"), "caption_key": p.take("caption_key", "txt")}


def _split(block, where: str, record: Record) -> tuple[dict, dict | None]:
    """One split's block, and the batch keys it gives when it is a CompVis dataset."""
    if not isinstance(block, dict) or block.get("target") not in (HF_DATASET, FOLDER_DATA, TEXT_ONLY):
        target = block.get("target") if isinstance(block, dict) else None
        if isinstance(target, str) and target.startswith(("ldm.data.simple.", "ldm.data.laion.", "main.")):
            refuse(f"{where}.target", f"{target!r} has no translation here (hf_dataset, FolderData and TextOnly do)")
        return block, None
    extra = sorted(set(block) - {"target", "params"})
    if extra:
        refuse(f"{where}.{extra[0]}", "CompVis reads only target and params of a dataset block")
    target = block["target"]
    p = Params(block.get("params"), f"{where}.params", record)
    if target == HF_DATASET:
        params, keys = _hf_dataset(p)
    elif target == FOLDER_DATA:
        params, keys = _folder_data(p, record)
    else:
        params, keys = _text_only(p)
    p.finish(f"the fork's {target.rsplit('.', 1)[1]}")
    record.block(where, target, TARGETS[target])
    return {"target": TARGETS[target], "params": params}, keys


def _check_keys(where: str, keys: dict, model_keys: dict | None) -> None:
    """A CompVis dataset's ``image_key``/``caption_key`` must be what the CompVis model reads."""
    if model_keys is None:
        return
    if keys["image_key"] != model_keys["first_stage_key"]:
        refuse(f"{where}.params.image_key", f"{keys['image_key']!r} is not model.params.first_stage_key "
               f"{model_keys['first_stage_key']!r}: the model would find no images in the batch")
    if model_keys["kind"] == "text" and keys["caption_key"] != model_keys["cond_stage_key"]:
        refuse(f"{where}.params.caption_key", f"{keys['caption_key']!r} is not model.params.cond_stage_key "
               f"{model_keys['cond_stage_key']!r}: the text encoder would find no captions in the batch")


def translate_data(section: dict, record: Record, model_keys: dict | None) -> dict:
    """The data section in this project's terms; ``model_keys`` (from the model translation) checks the keys."""
    target = section.get("target") if isinstance(section, dict) else None
    if target == WEB_DATAMODULE:
        refuse("data.target", f"{target!r} has no translation here: stream WebDataset tar shards with "
               "ldm.data.tar_shards.TarShards as a split of ldm.data.datamodule.DataModuleFromConfig "
               "(README, Image variations)")
    if target != DATAMODULE:  # our DataModule, perhaps with CompVis datasets in it
        params = dict(section.get("params") or {}) if isinstance(section, dict) else {}
        for split in SPLITS:
            if params.get(split) is not None:
                params[split], keys = _split(params[split], f"data.params.{split}", record)
                if keys is not None:
                    _check_keys(f"data.params.{split}", keys, model_keys)
        return {**section, "params": params}
    record.block("data", DATAMODULE, TARGETS[DATAMODULE])
    p = Params(section.get("params"), "data.params", record)
    extra = sorted(set(section) - {"target", "params"})
    if extra:
        refuse(f"data.{extra[0]}", "a data section holds target and params")
    batch = p.take("batch_size")
    if batch is None:
        refuse("data.params.batch_size", "required (CompVis's DataModuleFromConfig has no default)")
    out: dict = {"batch_size": int(batch)}
    if "num_workers" in p:
        out["num_workers"] = p.take("num_workers")
    for split in SPLITS:
        block = p.take(split)
        if block is not None:
            out[split], keys = _split(block, f"data.params.{split}", record)
            if keys is not None:
                _check_keys(f"data.params.{split}", keys, model_keys)
    p.ignore("predict", "there is no predict loop here", allowed=None)
    p.ignore("wrap")  # wraps non-Dataset objects; every dataset here is one
    p.ignore("num_val_workers")  # validation loaders use num_workers: worker counts change speed, not results
    p.ignore("use_worker_init_fn")  # workers are seeded by Lightning's seed_everything(workers=True)
    p.ignore("shuffle_test_loader", "the test split is read in order", allowed=False)
    p.ignore("shuffle_val_dataloader", "validation is read in order (each image keeps its fixed noise)", allowed=False)
    p.finish("CompVis's DataModuleFromConfig")
    out["holdout"] = 0  # CompVis trains on every image
    return {"target": TARGETS[DATAMODULE], "params": out}
