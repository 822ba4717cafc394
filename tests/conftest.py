"""Shared fixtures: small image folders from skimage's sample photos, a data+lightning YAML for the tiny model,
and a runner for ``main.py`` in a subprocess (offline, one BLAS thread)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Callable, Sequence

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = REPO / "configs" / "tiny" / "tiny-sd.yaml"
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket")
RUN_DIR_ENV = "SD_FINETUNE_RUN_DIR"


def write_image_folder(root: Path, names: Sequence[str] = PHOTOS, size: int = 32) -> Path:
    """``<name>.png`` (skimage's photo, resized to ``size``) plus ``<name>.txt`` caption for each name."""
    from PIL import Image
    from skimage import data as skdata

    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        Image.fromarray(getattr(skdata, name)()).convert("RGB").resize((size, size)).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a photo of a {name}\n")
    return root


def write_train_yaml(path: Path, root: Path | str | None = None, batch_size: int = 2, repeats: int = 5,
                     image_every: int = 10, trainer: dict | None = None, callbacks: dict | None = None) -> Path:
    """A ``data`` + ``lightning`` YAML for ``configs/tiny/tiny-sd.yaml`` on a folder of images.

    ``repeats`` makes epochs longer than the 4-photo folder, so a 20-step run writes two epoch checkpoints
    instead of ten. ``root=None`` leaves the folder to an override (``data.params.train.params.root=...``).
    """
    transforms = [{"target": "torchvision.transforms.Resize", "params": {"size": 16}},
                  {"target": "torchvision.transforms.CenterCrop", "params": {"size": 16}}]
    config = {
        "data": {"target": "ldm.data.datamodule.DataModuleFromConfig",
                 "params": {"batch_size": batch_size, "num_workers": 0,
                            "train": {"target": "ldm.data.folder.FolderDataset", "repeats": repeats,
                                      "params": {"root": str(root) if root else "???",
                                                 "image_transforms": transforms}}}},
        "lightning": {
            "trainer": {"accelerator": "cpu", "max_steps": 20, "log_every_n_steps": 1, "enable_progress_bar": False,
                        "enable_model_summary": False, **(trainer or {})},
            "callbacks": {"image_logger": {"params": {"batch_frequency": image_every, "max_images": 2, "steps": 2}},
                          **(callbacks or {})},
        },
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def main_env(**extra: str) -> dict:
    """Environment for a ``main.py`` subprocess: never the Hub, one BLAS thread per process (two test processes
    on a 2-core machine with default threading run ~50x slower), no run dir inherited from the caller."""
    env = {k: v for k, v in os.environ.items() if k not in (RUN_DIR_ENV, "SD_FINETUNE_RESUME_CKPT")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONWARNINGS="ignore::DeprecationWarning", **extra)
    return env


def run_dirs(logdir: Path) -> list[Path]:
    """Run directories created under ``-l logdir``."""
    return sorted(p for p in Path(logdir).iterdir() if p.is_dir()) if Path(logdir).is_dir() else []


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """Four 32x32 photos with ``.txt`` captions (read-only for tests: copy it before changing it)."""
    return write_image_folder(tmp_path_factory.mktemp("photos"))


@pytest.fixture(scope="session")
def tiny_train_yaml(tmp_path_factory, image_folder) -> Path:
    """Data + lightning YAML for the tiny model training 20 steps on :func:`image_folder`."""
    return write_train_yaml(tmp_path_factory.mktemp("configs") / "tiny-train.yaml", image_folder)


def main_py(*args: str | Path, timeout: float = 240, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``python main.py *args`` from the repo root with :func:`main_env` and capture its output."""
    return subprocess.run([sys.executable, str(REPO / "main.py"), *map(str, args)], cwd=REPO, env=env or main_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def run_main() -> Callable[..., subprocess.CompletedProcess]:
    """:func:`main_py`, for tests that do not import from conftest."""
    return main_py
