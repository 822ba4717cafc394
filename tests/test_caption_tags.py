"""Tag shuffle and tag dropout (ldm.data.caption_tags): deterministic under a seed, the first tags fixed and never
dropped, the dropout rate what was asked for, and captions that are not tag lists left alone."""
from __future__ import annotations

import pickle
import random
from collections import Counter

import pytest
from torch.utils.data import DataLoader, Dataset

from ldm.data.caption_tags import TagShuffle, build_caption_transform
from ldm.util import ConfigError

CAPTION = "sks dog, grass, sunny day,  photo ,close-up, bokeh, 35mm, red collar"
TAGS = [t.strip() for t in CAPTION.split(",")]


def test_the_same_seed_gives_the_same_captions_and_shuffling_happens():
    shuffle = TagShuffle(keep_first=1, dropout=0.2)
    assert shuffle(CAPTION, random.Random(3)) == shuffle(CAPTION, random.Random(3))
    rng_a, rng_b = random.Random(11), random.Random(11)
    runs = [[shuffle(CAPTION, rng) for _ in range(20)] for rng in (rng_a, rng_b)]
    assert runs[0] == runs[1]
    assert len(set(runs[0])) > 15  # it does vary from draw to draw
    seeded = [TagShuffle(dropout=0.2, seed=5), TagShuffle(dropout=0.2, seed=5)]
    assert [seeded[0](CAPTION) for _ in range(5)] == [seeded[1](CAPTION) for _ in range(5)]


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_the_first_tags_stay_in_place_and_the_rest_is_a_permutation(keep):
    shuffle, rng = TagShuffle(keep_first=keep), random.Random(0)
    orders = set()
    for _ in range(200):
        tags = shuffle(CAPTION, rng).split(", ")
        assert tags[:keep] == TAGS[:keep]
        assert sorted(tags[keep:]) == sorted(TAGS[keep:])  # stripped, none lost without dropout
        orders.add(tuple(tags))
    assert len(orders) > 50  # of 120 orders at least (5 free tags)
    assert TagShuffle(keep_first=2, shuffle=False)(CAPTION) == ", ".join(TAGS)  # only normalised


def test_dropout_drops_each_other_tag_at_the_rate_asked_and_never_a_kept_one():
    p, n = 0.3, 4000
    shuffle, rng = TagShuffle(keep_first=2, dropout=p), random.Random(1)
    seen = Counter()
    for _ in range(n):
        tags = shuffle(CAPTION, rng).split(", ")
        assert tags[:2] == TAGS[:2]
        seen.update(tags[2:])
    for tag in TAGS[2:]:  # 4000 draws: the standard error of each rate is 0.007
        assert 1 - seen[tag] / n == pytest.approx(p, abs=0.03), tag


@pytest.mark.parametrize("caption", ["", "a photo of a dog on the grass", "  spaced out  "])
def test_captions_that_are_not_tag_lists_come_back_unchanged(caption):
    assert TagShuffle(keep_first=0, dropout=0.5)(caption, random.Random(0)) == caption


class Captions(Dataset):
    def __init__(self, transform):
        self.transform = transform

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return self.transform(CAPTION)


def test_it_pickles_for_dataloader_workers_and_draws_per_worker():
    transform = pickle.loads(pickle.dumps(TagShuffle(keep_first=1, dropout=0.1)))
    assert transform(CAPTION).startswith("sks dog")
    loader = DataLoader(Captions(transform), batch_size=4, num_workers=2)
    batches = [b for b in loader]
    assert batches[0] != batches[1]  # the two workers do not repeat each other's draws


def test_build_caption_transform_from_a_dataset_param():
    assert build_caption_transform(None) is None  # captions as written
    built = build_caption_transform({"keep_first": 1, "shuffle": True, "dropout": 0.1})
    assert isinstance(built, TagShuffle) and (built.keep_first, built.dropout) == (1, 0.1)
    block = build_caption_transform({"target": "ldm.data.caption_tags.TagShuffle", "params": {"keep_first": 2}})
    assert block.keep_first == 2
    with pytest.raises(ConfigError, match="caption_tags.drop: not a setting .*did you mean dropout"):
        build_caption_transform({"drop": 0.1})
    with pytest.raises(ConfigError, match=r"caption_tags.dropout: expected a probability in \[0, 1\), got 1.5"):
        TagShuffle(dropout=1.5)
    with pytest.raises(ConfigError, match="keep_first: expected a whole number"):
        TagShuffle(keep_first=-1)


def test_datasets_shuffle_tags_each_time_an_item_is_read(tmp_path):
    from PIL import Image

    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.data.folder import FolderDataset
    from ldm.util import ConfigError

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("sks dog, grass, sunny, photo, blue sky")
    ds = FolderDataset(str(tmp_path), caption_tags={"keep_first": 1, "shuffle": True})
    seen = {ds[0]["caption"] for _ in range(40)}
    assert len(seen) > 5 and all(c.startswith("sks dog, ") for c in seen)
    assert FolderDataset(str(tmp_path))[0]["caption"] == "sks dog, grass, sunny, photo, blue sky"
    train = {"target": "ldm.data.folder.FolderDataset", "params": {"root": str(tmp_path), "caption_tags": {"dropout": 0.2}}}
    with pytest.raises(ConfigError, match="changes its captions every epoch"):
        DataModuleFromConfig(batch_size=1, train=train, cache_text_embeddings=True)
