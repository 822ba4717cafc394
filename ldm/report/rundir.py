"""Read what a run directory holds (metrics, sample grids, progress GIFs, checkpoints, command, configs) into plain
Python values for the report; nothing here draws or writes."""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

GRID_NAME = re.compile(r"^(?P<key>.+)_gs-(?P<step>\d+)_e-(?P<epoch>\d+)_b-(?P<batch>\d+)\.png$")
TIMESTEP_LOSS = re.compile(r"^val/loss_t(\d+)$")
INDEX_COLUMNS = ("step", "epoch")


def read_metrics(path: Path) -> pd.DataFrame | None:
    """``metrics.csv`` as a frame with a numeric ``step`` column, or None when there is none yet."""
    if not path.is_file() or path.stat().st_size == 0:
        return None
    frame = pd.read_csv(path)
    if "step" not in frame.columns:
        return None
    return frame.apply(pd.to_numeric, errors="coerce")


@dataclass
class MetricGroups:
    """The metric columns by what they are, each list in ``metrics.csv`` order."""
    train_loss: list[str] = field(default_factory=list)
    val_loss: list[str] = field(default_factory=list)
    timestep_loss: list[str] = field(default_factory=list)  # val/loss_t<T>, sorted by T
    lr: list[str] = field(default_factory=list)
    other: list[str] = field(default_factory=list)  # the demos' figures: digits/..., variations/..., dreambooth/...


def metric_groups(frame: pd.DataFrame) -> MetricGroups:
    groups = MetricGroups()
    for col in frame.columns:
        if col in INDEX_COLUMNS or not frame[col].notna().any():
            continue
        if TIMESTEP_LOSS.match(col):
            groups.timestep_loss.append(col)
        elif col.startswith("lr-"):
            groups.lr.append(col)
        elif "loss" in col and col.startswith("train/"):
            groups.train_loss.append(col)
        elif "loss" in col:
            groups.val_loss.append(col)
        else:
            groups.other.append(col)
    groups.timestep_loss.sort(key=lambda c: int(TIMESTEP_LOSS.match(c).group(1)))
    return groups


def series(frame: pd.DataFrame, col: str) -> pd.DataFrame:
    """``step`` and ``col`` where ``col`` was logged, in step order."""
    return frame[["step", col]].dropna().sort_values("step", kind="stable")


def latest(frame: pd.DataFrame, col: str) -> tuple[int, float] | None:
    """The last logged value of ``col`` and its step (the last row, so a resumed run's repeat wins)."""
    rows = frame[["step", col]].dropna()
    if rows.empty:
        return None
    return int(rows["step"].iloc[-1]), float(rows[col].iloc[-1])


@dataclass
class GridSeries:
    """The sample grids of one split: every step at which any was written, and per ``key · batch`` group the file
    (relative to the run dir) at each of its steps."""
    steps: list[int]
    epochs: dict[int, int]
    groups: dict[str, dict[int, str]]


def grid_series(run: Path) -> dict[str, GridSeries]:
    """``images/{train,val}/{key}_gs-..._e-..._b-....png`` grouped by split, key and batch (ImageLogger's names)."""
    out = {}
    for split_dir in sorted(p for p in (run / "images").glob("*") if p.is_dir()):
        groups: dict[str, dict[int, str]] = {}
        epochs: dict[int, int] = {}
        for path in split_dir.glob("*.png"):
            match = GRID_NAME.match(path.name)
            if not match:
                continue
            step, batch = int(match["step"]), int(match["batch"])
            epochs[step] = int(match["epoch"])
            groups.setdefault(f"{match['key']} · batch {batch}", {})[step] = path.relative_to(run).as_posix()
        if groups:
            ordered = dict(sorted(groups.items(), key=lambda kv: (int(kv[0].rsplit(" ", 1)[1]), kv[0])))
            out[split_dir.name] = GridSeries(sorted(epochs), epochs, ordered)
    return out


def progress_gifs(run: Path) -> list[dict]:
    """``progress/<slug>.gif`` (with ``<slug>_strip.png`` when there) and its prompt from ``progress/prompts.json``."""
    folder = run / "progress"
    prompts = _json(folder / "prompts.json") or {}
    found = []
    for gif in sorted(folder.glob("*.gif")):
        strip = folder / f"{gif.stem}_strip.png"
        found.append({"slug": gif.stem, "prompt": prompts.get(gif.stem, gif.stem),
                      "gif": gif.relative_to(run).as_posix(),
                      "strip": strip.relative_to(run).as_posix() if strip.is_file() else None})
    return found


def checkpoints(run: Path, frame: pd.DataFrame | None) -> dict:
    """``{"rows": [{file, step, epoch, val_loss, size, mtime}], "best", "overfitting", "source"}``.

    From ``checkpoints/scores.json`` when the run keeps one; otherwise from the ``*.ckpt`` files, each epoch
    checkpoint paired with the last ``val/loss`` of its epoch in ``metrics.csv`` and the lowest marked best.
    """
    folder = run / "checkpoints"
    scores = _json(folder / "scores.json")
    if scores:
        rows = [dict(row) for row in scores.get("checkpoints") or []]
        source = "checkpoints/scores.json"
    else:
        rows = [{"file": p.name} for p in sorted(folder.glob("*.ckpt"))]
        source = "checkpoint files, val loss from metrics.csv (the last validation of each epoch)"
        for row in rows:
            match = re.match(r"^epoch=(\d+)", row["file"])
            if match:
                row["epoch"] = int(match[1])
                row["step"], row["val_loss"] = _epoch_val_loss(frame, row["epoch"])
    for row in rows:
        path = folder / row["file"]
        if path.is_file():
            stat = path.stat()
            row["size"], row["mtime"] = stat.st_size, stat.st_mtime
    best = scores.get("best") if scores else None
    if not scores:
        scored = [r for r in rows if r.get("val_loss") is not None]
        best = min(scored, key=lambda r: r["val_loss"])["file"] if scored else None
    return {"rows": rows, "best": best, "overfitting": (scores or {}).get("overfitting"), "source": source}


def _epoch_val_loss(frame: pd.DataFrame | None, epoch: int) -> tuple[int | None, float | None]:
    if frame is None or "val/loss" not in frame.columns or "epoch" not in frame.columns:
        return None, None
    rows = frame.loc[frame["epoch"] == epoch, ["step", "val/loss"]].dropna()
    if rows.empty:
        return None, None
    return int(rows["step"].iloc[-1]), float(rows["val/loss"].iloc[-1])


def command_lines(run: Path) -> list[str]:
    """``command.txt``: ``# <now>`` then the command, once per start of the run (resumes append)."""
    path = run / "command.txt"
    return path.read_text().strip().splitlines() if path.is_file() else []


def latest_configs(run: Path) -> dict[str, str]:
    """The newest ``configs/*-project.yaml`` and ``*-lightning.yaml`` (timestamps sort by name), name → text."""
    found = {}
    for suffix in ("project", "lightning"):
        files = sorted((run / "configs").glob(f"*-{suffix}.yaml"))
        if files:
            found[files[-1].name] = files[-1].read_text()
    return found


def _json(path: Path):
    # A file being replaced by another process is read whole (writers rename), so a parse error means a real
    # problem; it is reported by the caller's warning, not hidden.
    return json.loads(path.read_text()) if path.is_file() else None
