"""Bad configs and flags: real recipes with one key mutated at a time (a string for a number, a list for a mapping,
negative or zero sizes, null, an unknown sampler or target, a missing section or required param), run through
main.py's own entry (``main.run`` under ``ldm.util.run_cli``, in this process, one optimizer step at most). Each must
exit 2 with one ``error:`` line naming the key, or train, when the value is in fact valid; never a traceback.
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from ldm.config import merge_configs
from ldm.util import run_cli
from tests.conftest import PHOTOS, REPO, write_image_folder

DIGITS = [REPO / "configs/demo/digits.yaml"]
POKEMON = [REPO / "configs/pokemon.yaml", REPO / "configs/tiny/tiny-sd.yaml"]
NUMBER = "not-a-number"

# One optimizer step and nothing slow around it, unless the mutation is of that very key.
CHEAP = {"lightning.trainer.max_steps": 1, "lightning.trainer.num_sanity_val_steps": 0,
         "lightning.trainer.limit_val_batches": 1, "lightning.trainer.max_time": None,
         "lightning.trainer.enable_progress_bar": False, "lightning.trainer.accelerator": "cpu"}
DIGITS_CHEAP = {"lightning.callbacks.digit_score.params.n_per_class": 1, "lightning.callbacks.digit_score.params.steps": 1,
                "lightning.callbacks.image_logger.params.steps": 1, "data.params.val_batch_size": 10}
POKEMON_CHEAP = {"model.params.pretrained": None, "data.params.batch_size": 2, "data.params.num_workers": 0,
                 "data.params.validation.params.output_size": 16, "lightning.trainer.precision": 32,
                 "lightning.trainer.benchmark": False, "lightning.callbacks.image_logger.params.steps": 1,
                 "model.params.unet_config.params.gradient_checkpointing": False}
TRANSFORMS = "data.params.train.params.image_transforms"


def cheap(recipe: str, photos: Path) -> dict:
    extra = DIGITS_CHEAP if recipe == "digits" else {**POKEMON_CHEAP, "data.params.train.params.name": str(photos)}
    return {**CHEAP, **extra}


def write_config(tmp: Path, recipe: str, photos: Path, mutate) -> Path:
    """The recipe merged, made cheap, then mutated (``mutate(cfg)`` edits the plain dict), as one YAML file."""
    cfg = merge_configs(DIGITS if recipe == "digits" else POKEMON)
    for key, value in cheap(recipe, photos).items():
        OmegaConf.update(cfg, key, value, force_add=True)
    if recipe == "pokemon":  # the 16 px tiny model
        OmegaConf.update(cfg, TRANSFORMS, [
            {"target": "torchvision.transforms.Resize", "params": {"size": 16, "interpolation": 3, "antialias": True}},
            {"target": "torchvision.transforms.RandomCrop", "params": {"size": 16}},
            {"target": "torchvision.transforms.RandomHorizontalFlip"}])
    plain = OmegaConf.to_container(cfg, resolve=True)
    mutate(plain)
    path = tmp / "config.yaml"
    path.write_text(yaml.safe_dump(plain, sort_keys=False))
    return path


def run_main(args: list[str]) -> tuple[int | None, str, str | None]:
    """``(exit code, stderr, traceback)`` of ``main.py args`` run in this process."""
    import main

    err = io.StringIO()
    saved = dict(os.environ)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = run_cli(main.run, args)
        return code, err.getvalue(), None
    except BaseException as exc:  # anything but a ConfigError escaping run_cli is a traceback for the user
        return None, err.getvalue(), f"{type(exc).__name__}: {exc}"
    finally:
        os.environ.clear()
        os.environ.update(saved)  # main.run exports the run dir for DDP workers


def _get(cfg: dict, key: str):
    for part in key.split("."):
        cfg = cfg[int(part)] if isinstance(cfg, list) else cfg[part]
    return cfg


def set_key(key: str, value):
    def mutate(cfg: dict) -> None:
        parent, _, last = key.rpartition(".")
        node = _get(cfg, parent) if parent else cfg
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value
    return mutate


def drop_key(key: str):
    def mutate(cfg: dict) -> None:
        parent, _, last = key.rpartition(".")
        del (_get(cfg, parent) if parent else cfg)[last]
    return mutate


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """A local imagefolder for the Pokémon recipe's hf_dataset (four photos, metadata.jsonl)."""
    import json

    folder = write_image_folder(tmp_path_factory.mktemp("pokemon") / "images", PHOTOS, size=24)
    rows = [json.dumps({"file_name": f"{n}.png", "text": f"a pokemon like a {n}"}) for n in PHOTOS]
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return folder


# ---- the mutations -----------------------------------------------------------------------------------------------
# Values that look wrong but that the classes take, each a run that must train: a negative or zero guidance scale is
# guidance away from (or without) the prompt, batch_frequency <= 0 turns the image logger off, max_images <= 0 logs
# none, null num_workers / check_val_every_n_epoch / log_every_n_steps / enable_model_summary / every_n_epochs are
# those classes' defaults, projection_dim 0 or null means no projection, a null mid_block_type no middle block, a
# null gradient_clip_val no clipping, zero layers is a text encoder of embeddings only, zero rates are rates, a zero
# scale_factor or linear_start is a degenerate but finite schedule.
VALID = {
    ("neg", "guidance_scale"), ("zero", "guidance_scale"), ("neg", "batch_frequency"), ("zero", "batch_frequency"),
    ("neg", "max_images"), ("zero", "max_images"), ("neg", "max_val_batches"), ("zero", "max_val_batches"),
    ("neg", "log_every_n_steps"), ("zero", "log_every_n_steps"), ("null", "log_every_n_steps"),
    ("null", "num_workers"), ("null", "check_val_every_n_epoch"), ("null", "enable_model_summary"),
    ("null", "every_n_epochs"), ("zero", "every_n_epochs"), ("null", "projection_dim"), ("zero", "projection_dim"),
    ("zero", "num_hidden_layers"), ("zero", "ucg_rate"), ("zero", "ema_decay"), ("null", "mid_block_type"),
    ("zero", "weight_decay"), ("zero", "base_learning_rate"), ("zero", "num_workers"), ("zero", "scale_factor"),
    ("neg", "scale_factor"), ("zero", "linear_start"), ("zero", "linear_end"), ("neg", "gradient_clip_val"),
    ("zero", "gradient_clip_val"), ("zero", "max_epochs"), ("zero", "norm_eps"), ("zero", "freq_shift"),
    ("zero", "downsample_padding"), ("null", "gradient_clip_val"),
}
# A zero mid-block scale makes the loss NaN at the first step: the NaN guard's stop, a numbers problem, not a
# config one (and the stops run after the guard).
LEFT_OUT = {"model.params.unet_config.params.config.mid_block_scale_factor", "lightning.trainer.max_epochs"}


def leaves(node, path: str = ""):
    if isinstance(node, dict):
        if path:
            yield path, node
        for key, value in node.items():
            yield from leaves(value, f"{path}.{key}" if path else str(key))
    else:
        yield path, node


def generated(recipe: str) -> list[tuple[str, str, object, str]]:
    """``(recipe, key, value, "error" | "ok")`` for every key of the recipe, by what the key holds."""
    cfg = OmegaConf.to_container(merge_configs(DIGITS if recipe == "digits" else POKEMON), resolve=True)
    fixed = set(cheap(recipe, Path("x"))) | LEFT_OUT
    out = []
    for key, value in leaves(cfg):
        if key in fixed or key.startswith(TRANSFORMS):
            continue
        leaf = key.rpartition(".")[2]
        kinds = []
        if isinstance(value, dict):
            kinds.append(("map", [1, 2]))
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            kinds += [("str", NUMBER), ("neg", -3), ("zero", 0)]
        elif isinstance(value, str):
            kinds.append(("list", [1, 2]))
        if not isinstance(value, dict) and value is not None:
            kinds.append(("null", None))
        out += [(recipe, key, v, "ok" if (kind, leaf) in VALID else "error") for kind, v in kinds]
    return out


DROP = object()
SPECIAL = [  # (recipe, key, value or DROP, expected)
    ("digits", "lightning.callbacks.image_logger.params.sampler", "ddim_fast", "error"),
    ("pokemon", "lightning.callbacks.image_logger.params.sampler", "dpm++", "ok"),
    ("digits", "model.params.unet_config.target", "ldm.models.denoiser.unet_typo", "error"),
    ("digits", "lightning.callbacks.image_logger.target", "ldm.callbacks.nope.Logger", "error"),
    ("pokemon", "data.params.train.target", "ldm.data.hf.no_such_loader", "error"),
    ("digits", "model", DROP, "error"),
    ("pokemon", "data", DROP, "error"),
    ("digits", "data.params.batch_size", DROP, "error"),
    ("digits", "model.params.unet_config", DROP, "error"),
    ("pokemon", "data.params.train.params.name", DROP, "error"),
    ("pokemon", "data.params.train.params.name", "/no/such/folder", "error"),
    ("pokemon", "data.params.train.params.text_column", "caption", "error"),
    ("pokemon", "model.params.parameterization", "x0", "error"),
    ("pokemon", "model.params.trainable", "attn2", "ok"),
    ("pokemon", "lightning.trainer.precision", "fp33", "error"),
    ("digits", "data.params.train.params.split", "training", "error"),
    ("digits", "lightning.trainer.max_steps", -5, "error"),
    ("digits", "lightning.trainer.max_steps", NUMBER, "error"),
]


def mutation_id(case) -> str:
    recipe, key, value, expected = case
    return f"{recipe}:{key}={'DROP' if value is DROP else value!r}"


CASES = generated("digits") + generated("pokemon") + SPECIAL


def names_the_key(line: str, key: str) -> bool:
    """The whole key, or its block (the path before ``.params``) and its own name."""
    if key in line:
        return True
    block, _, leaf = key.rpartition(".params.") if ".params." in key else key.rpartition(".")
    return bool(block) and block in line and leaf.split(".")[0] in line


def test_config_mutations_are_one_line_naming_the_key_or_a_working_run(tmp_path, photos):
    tracebacks, wrong = [], []
    for n, case in enumerate(CASES):
        recipe, key, value, expected = case
        run = tmp_path / f"{n:03d}"
        run.mkdir()
        config = write_config(run, recipe, photos, drop_key(key) if value is DROP else set_key(key, value))
        code, stderr, traceback = run_main(["-t", "--base", str(config), "-l", str(run / "logs")])
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        if traceback is not None:
            tracebacks.append(f"{mutation_id(case)}: {traceback.splitlines()[0][:200]}")
        elif expected == "ok" and code != 0:
            wrong.append(f"{mutation_id(case)}: expected a run, got exit {code}: {errors}")
        elif expected == "error" and not (code == 2 and len(errors) == 1 and names_the_key(errors[0], key)):
            wrong.append(f"{mutation_id(case)}: expected one error line naming the key, got exit {code}: {errors}")
    print(f"config mutations tried {len(CASES)}, tracebacks {len(tracebacks)}")
    assert not tracebacks, "\n".join(tracebacks)
    assert not wrong, "\n".join(wrong)
    assert len(CASES) > 300


# ---- flags -------------------------------------------------------------------------------------------------------
FLAGS = [  # (arguments after a valid digits run, words the one line must hold)
    (["--seed", "abc"], ["--seed", "abc"]),
    (["--num_nodes", "two"], ["--num_nodes", "two"]),
    (["--scale_lr", "maybe"], ["--scale_lr", "maybe"]),
    (["--gpus", "x"], ["--gpus"]),
    (["--bogus"], ["--bogus"]),
    (["-r", "/no/such/run"], ["/no/such/run"]),
    (["lightning.trainer.max_step=1"], ["lightning.trainer.max_step", "max_steps"]),
    (["model.params.timesteps=abc"], ["model.params.timesteps"]),
    (["+lightning.trainer.max_stepz=1"], ["lightning.trainer.max_stepz"]),
]


def test_bad_flags_are_one_line(tmp_path, photos):
    config = write_config(tmp_path, "digits", photos, lambda cfg: None)
    tracebacks, wrong = [], []
    for args, words in FLAGS:
        code, stderr, traceback = run_main(["-t", "--base", str(config), "-l", str(tmp_path / "logs"), *args])
        lines = stderr.strip().splitlines()
        if traceback is not None and not traceback.startswith("SystemExit"):
            tracebacks.append(f"{args}: {traceback[:200]}")
        elif not (len(lines) == 1 and lines[0].startswith("error:") and all(w in lines[0] for w in words)):
            wrong.append(f"{args}: exit {code}, stderr {lines[:3]}")
    assert not tracebacks, "\n".join(tracebacks)
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("path", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml")))
def test_every_shipped_config_passes_the_value_checks(path):
    from ldm.config import check_targets, load_yaml

    check_targets(load_yaml(REPO / path))  # no false alarm on a recipe this project ships
