"""Reading and writing weight files: safetensors, pickled ``.ckpt`` (data only) and diffusers folders.

safetensors files are read through a private memory map, so a 4 GB file costs page cache rather than a
second copy in RAM, and written tensor by tensor with a progress bar. The format is a little-endian u64
header length, a JSON header (``dtype``, ``shape``, ``data_offsets`` per tensor, ``__metadata__`` strings)
and the raw bytes; reading it directly also lets a truncated file be named as such.

This reader and writer are ours rather than the ``safetensors`` package's because the package cannot keep
those properties: ``safe_open(...).get_tensor`` copies every tensor out of its map into RAM, and
``save_file`` takes the whole (already cast) state dict at once and reports no progress. tests/test_files.py
holds ours to the package both ways: its files read here tensor for tensor, ours read by ``safe_open`` with
their metadata, and the same tensors written byte for byte as ``save_file`` writes them.
"""
from __future__ import annotations

import json
import mmap
import struct
from pathlib import Path
from typing import Iterable, Mapping

import torch

from ldm.util import ConfigError, atomic_path

# In the order the reference writer (safetensors' Rust ``prepare``) lays tensors out: this order, then by name.
DTYPES = {"I64": torch.int64, "F64": torch.float64, "F32": torch.float32, "I32": torch.int32, "BF16": torch.bfloat16,
          "F16": torch.float16, "I16": torch.int16, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
NAMES = {v: k for k, v in DTYPES.items()}
_WRITE_RANK = {name: i for i, name in enumerate(DTYPES)}


def read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors (backed by a copy-on-write map of the file) and the ``__metadata__`` strings."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 0 or 8 + n > size:
            raise ConfigError(f"{str(path)!r} is not a safetensors file (or is truncated): no valid header in {size} bytes")
        try:
            header = json.loads(f.read(n))
        except ValueError as err:
            raise ConfigError(f"{str(path)!r} is not a safetensors file: its header is not JSON ({err})") from err
        metadata = header.pop("__metadata__", None) or {}
        end = max((v["data_offsets"][1] for v in header.values()), default=0)
        if 8 + n + end > size:
            raise ConfigError(f"{str(path)!r} is truncated: its header describes {8 + n + end:,} bytes, "
                              f"the file has {size:,}")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else b""
    tensors = {}
    for name, info in header.items():
        dtype = DTYPES.get(info["dtype"])
        if dtype is None:
            raise ConfigError(f"{str(path)!r}: tensor {name!r} has dtype {info['dtype']} this loader does not know")
        start, stop = info["data_offsets"]
        flat = torch.frombuffer(buf, dtype=torch.uint8, count=stop - start, offset=8 + n + start) if stop > start \
            else torch.empty(0, dtype=torch.uint8)
        if (8 + n + start) % flat.new_empty(0, dtype=dtype).element_size():
            flat = flat.clone()  # a view needs the element size's alignment; other writers may not align
        tensors[name] = flat.view(dtype).reshape(info["shape"])
    return tensors, metadata


def write_safetensors(path: Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                      progress: bool = False, desc: str | None = None, half: bool = False) -> Path:
    """Write ``tensors`` one at a time (``half``: floating ones as fp16, cast as each is reached, so no second
    copy of the model exists); the file appears under its name only once complete.

    The layout is the reference writer's (``safetensors.torch.save_file``): ``__metadata__`` first, tensors in
    its dtype order (widest first) and then by name, the header padded to 8 bytes. So every tensor starts at a
    multiple of its element size, readers can map it without copying, and the bytes equal ``save_file``'s for
    the same tensors (with at most one metadata key: the package orders several in a random order).
    """
    dtype = {n: torch.float16 if half and t.is_floating_point() else t.dtype for n, t in tensors.items()}
    names = sorted(tensors, key=lambda n: (_WRITE_RANK[NAMES[dtype[n]]], n))
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].new_empty(0, dtype=dtype[name]).element_size()
        header[name] = {"dtype": NAMES[dtype[name]], "shape": list(tensors[name].shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned, as the reference writer does
    path = Path(path)
    bar = _progress(offset, desc or path.name) if progress else None
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            t = tensors[name].detach().to("cpu", dtype[name]).contiguous()
            f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            if bar is not None:
                bar.update(t.numel() * t.element_size())
    if bar is not None:
        bar.close()
    return path


def _progress(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=desc)


def read_pickle(path: Path) -> dict:
    """A ``torch.save`` file, unpickled with ``weights_only=True``: tensors and plain containers, never code."""
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as err:  # files from torch < 1.6 (not a zip archive) cannot be memory-mapped
            if "mmap" not in str(err):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Unsupported global" in str(err) or "weights_only" in str(err):
            first = "it holds Python objects besides tensors, which are never unpickled here (" + first[:120] + ")"
        else:
            first = f"truncated or not a PyTorch checkpoint ({first[:160]})"
        raise ConfigError(f"cannot read {str(path)!r}: {first}") from err


def read_file(path: Path) -> tuple[dict, dict[str, str]]:
    """The object a weights file holds (a dict) and its metadata (safetensors only)."""
    if path.suffix == ".safetensors":
        return read_safetensors(path)
    obj = read_pickle(path)
    if not isinstance(obj, dict):
        raise ConfigError(f"{str(path)!r} holds a {type(obj).__name__}, not a checkpoint dict")
    return obj, {}


def tensors_only(obj: dict, path: Path) -> dict[str, torch.Tensor]:
    """The state dict inside a checkpoint (``state_dict`` for Lightning/CompVis files, else the dict itself)."""
    while isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ConfigError(f"{str(path)!r} holds no tensors: top-level keys {sorted(map(str, obj))[:8]}")
    return state


def _component_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))


def _read_component(files: Iterable[Path]) -> dict[str, torch.Tensor]:
    state = {}
    for f in files:
        state.update(tensors_only(read_file(f)[0], f))
    return state


def read_diffusers_folder(folder: Path) -> dict[str, torch.Tensor]:
    """The weights of a diffusers pipeline folder (or a bare ``unet/`` folder), keyed as in this project."""
    config = folder / "config.json"
    if config.exists() and json.loads(config.read_text()).get("_class_name") == "UNet2DConditionModel":
        return {"unet." + k: v for k, v in _read_component(_component_files(folder)).items()}
    from ldm.models.parts import diffusers_prefixes

    # Each pipeline component goes where the model part that holds it declares (a folder holds text_encoder/
    # for text-to-image or image_encoder/ for image variations, never both).
    components = diffusers_prefixes()
    state = {}
    for component, prefix in components.items():
        for key, value in _read_component(_component_files(folder / component)).items():
            # transformers < 5 saved the CLIP text encoder under ``text_model.``; 5.x does not.
            key = key.removeprefix("text_model.") if component == "text_encoder" else key
            state[prefix + key] = value
    if not state:
        found = sorted(p.name for p in folder.iterdir())[:10]
        raise ConfigError(f"{str(folder)!r} is not a diffusers pipeline folder: expected weights in "
                          f"{'/, '.join(components)}/ (or a unet config.json), found {found}")
    return state
