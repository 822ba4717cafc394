"""The CLIP BPE tokenizer, rebuilt offline from the vocabulary that open_clip_torch ships.

SD v1's tokenizer is OpenAI CLIP's: 49,408 ids built from 49,152 - 256 - 2 BPE merges. open_clip ships the
same merge list (``bpe_simple_vocab_16e6.txt.gz``), so ``vocab.json`` and ``merges.txt`` for transformers'
``CLIPTokenizer`` follow without any download and give identical ids.
"""
from __future__ import annotations

import gzip
import json
import os
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

from ldm.util import atomic_path

N_MERGES = 49152 - 256 - 2
DEFAULT_CACHE = Path(os.environ.get("SD_FINETUNE_CACHE", Path.home() / ".cache" / "sd-finetune")) / "clip-tokenizer"


def write_clip_vocab(out_dir: str | os.PathLike) -> Path:
    """Write ``vocab.json`` and ``merges.txt`` for the OpenAI CLIP tokenizer into ``out_dir``."""
    from open_clip.tokenizer import default_bpe

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(default_bpe(), "rt", encoding="utf-8") as f:
        merges = f.read().split("\n")[1 : N_MERGES + 1]
    alphabet = list(bytes_to_unicode().values())  # CLIP's 256 printable stand-ins for raw bytes, in GPT-2's order
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    with atomic_path(out / "vocab.json") as tmp:
        tmp.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    with atomic_path(out / "merges.txt") as tmp:
        tmp.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return out


@lru_cache(maxsize=4)
def clip_tokenizer(path: str | None = None, pad_token: str = "<|endoftext|>", max_length: int = 77) -> CLIPTokenizer:
    """Load a CLIP tokenizer from ``path`` (a tokenizer folder) or rebuild OpenAI CLIP's offline.

    ``pad_token`` is ``<|endoftext|>`` for SD v1 and ``!`` for SD 2.x (OpenCLIP pads with id 0).
    """
    if path is not None:
        if not Path(path).is_dir():
            raise FileNotFoundError(f"tokenizer folder {str(path)!r} does not exist")
        return CLIPTokenizer.from_pretrained(path, pad_token=pad_token, model_max_length=max_length)
    folder = DEFAULT_CACHE
    if not (folder / "vocab.json").exists() or not (folder / "merges.txt").exists():
        write_clip_vocab(folder)
    # Positional vocab/merges: transformers 5 ignores the old vocab_file= keywords.
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), pad_token=pad_token)
    tok.model_max_length = max_length
    return tok
