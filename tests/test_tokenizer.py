"""The CLIP tokenizer rebuilt offline gives OpenAI CLIP's ids (open_clip's own BPE), raw bytes included."""
from __future__ import annotations

import json

from transformers import CLIPTokenizer

from ldm.models.tokenizer import write_clip_vocab

TEXTS = ["a photo of an astronaut riding a horse", "Pokémon-style café, naïve façade!!", "東京 at night 🙂",
         "x" * 40, "a \t  b\n c", "¿¡½ ±§¶ ~^`|\\ ÿ"]


def test_rebuilt_vocab_gives_open_clips_ids(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    folder = write_clip_vocab(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["merges.txt", "vocab.json"]  # no partial files left
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert len(vocab) == 49408 and vocab["<|endoftext|>"] == 49407
    ours = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))
    theirs = SimpleTokenizer()
    # The same token at every id (open_clip spells the two special tokens <start_of_text>/<end_of_text>).
    assert list(vocab)[:-2] == [theirs.decoder[i] for i in range(len(vocab) - 2)]
    for text in TEXTS:
        ids = ours(text).input_ids
        assert ids[0] == 49406 and ids[-1] == 49407
        assert ids[1:-1] == theirs.encode(text), text
