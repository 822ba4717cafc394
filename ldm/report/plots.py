"""The report's plots: matplotlib figures rendered to inline SVG, cached by the data they show.

A validation adds a row or two to ``metrics.csv``, so most plots change each time; the cache spares the ones that
did not (the demos' figures between their evaluations, everything at fit end right after the last validation).
"""
from __future__ import annotations

import hashlib
import io
import re

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_svg import FigureCanvasSVG
from matplotlib.figure import Figure

from ldm.report.rundir import TIMESTEP_LOSS, MetricGroups, series

MAX_POINTS = 2000  # points drawn per line: a 100k-step run stays a small SVG that the browser draws quickly


class SvgCache:
    """SVG text by a digest of the plotted data; each build keeps only the entries it used."""

    def __init__(self) -> None:
        self._svgs: dict[str, str] = {}
        self._used: dict[str, str] = {}

    def get(self, name: str, data: list, draw) -> str:
        digest = hashlib.sha1(name.encode())
        for item in data:
            is_frame = isinstance(item, (pd.DataFrame, pd.Series))
            digest.update(item.to_numpy().tobytes() if is_frame else repr(item).encode())
        key = digest.hexdigest()
        svg = self._svgs.get(key) or _to_svg(draw(), salt=name)
        self._used[key] = svg
        return svg

    def end_build(self) -> None:
        self._svgs, self._used = self._used, {}


def _to_svg(fig: Figure, salt: str) -> str:
    """The ``<svg>`` element alone, text as text (small, readable), without the XML prolog or any URL."""
    buffer = io.StringIO()
    # Distinct ids per plot: several SVGs inline in one page share one id namespace.
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": salt}):
        FigureCanvasSVG(fig)
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg"):]
    # Inline SVG in HTML needs no namespace declarations; dropping them keeps the page free of URLs.
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)


def _figure(width: float = 7.5, height: float = 3.6):
    fig = Figure(figsize=(width, height), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    ax.grid(True, alpha=0.3)
    ax.set_xlabel("global step")
    return fig, ax


def _logged(frame: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """The rows where any of ``cols`` was logged: what a plot shows, so a row of other metrics keeps it cached."""
    return frame[["step", *cols]].dropna(subset=cols, how="all")


def _thin(frame: pd.DataFrame) -> pd.DataFrame:
    return frame.iloc[:: max(1, len(frame) // MAX_POINTS)]


def _finish(fig: Figure, ax, ylabel: str) -> Figure:
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize="small")
    # Fixed margins in inches (room for tick labels like 5.0e-05): tight_layout would draw the figure twice.
    width, height = fig.get_size_inches()
    fig.subplots_adjust(left=0.95 / width, right=1 - 0.15 / width, bottom=0.55 / height, top=1 - 0.3 / height)
    return fig


def loss_plot(cache: SvgCache, frame: pd.DataFrame, groups: MetricGroups, overfitting: dict | None) -> str | None:
    """Train losses (raw and smoothed) and validation losses; the overfitting point marked when there is one."""
    cols = groups.train_loss + groups.val_loss
    if not cols:
        return None

    def draw() -> Figure:
        fig, ax = _figure()
        for i, col in enumerate(cols):
            data, color = series(frame, col), f"C{i}"
            if col in groups.train_loss and not col.endswith("_epoch"):
                # EMA over ~5% of the points: noise averaged out, a divergence still visible within a few steps.
                smooth = data[col].ewm(span=max(2, len(data) // 20)).mean()
                thin = _thin(data)
                ax.plot(thin["step"], thin[col], color=color, alpha=0.25, linewidth=0.8)
                ax.plot(thin["step"], smooth.loc[thin.index], color=color, linewidth=1.6, label=f"{col} (smoothed)")
            else:
                ax.plot(data["step"], data[col], color=color, marker="o", markersize=3, linewidth=1.2, label=col)
        if overfitting:
            ax.axvline(overfitting["since_step"], color="crimson", linestyle="--", linewidth=1,
                       label=f"val loss not improving since step {overfitting['since_step']}")
            if overfitting.get("best_step") is not None:
                ax.axvline(overfitting["best_step"], color="seagreen", linestyle=":", linewidth=1.2,
                           label=f"best: {overfitting.get('best')} (step {overfitting['best_step']})")
        return _finish(fig, ax, "loss")

    return cache.get("loss", [cols, _logged(frame, cols), overfitting], draw)


def timestep_plot(cache: SvgCache, frame: pd.DataFrame, groups: MetricGroups) -> str | None:
    """Validation loss at each fixed timestep (``val/loss_t<T>``), one line per T, noisier T lighter."""
    cols = groups.timestep_loss
    if not cols:
        return None

    def draw() -> Figure:
        fig, ax = _figure()
        colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(cols)))
        for col, color in zip(cols, colors):
            data = series(frame, col)
            t = int(TIMESTEP_LOSS.match(col).group(1))
            ax.plot(data["step"], data[col], color=color, marker="o", markersize=3, linewidth=1.2, label=f"t = {t}")
        values = frame[cols].to_numpy()
        if np.nanmin(values) > 0 and np.nanmax(values) > 10 * np.nanmin(values):
            ax.set_yscale("log")  # a trained model's loss at t near 0 is orders of magnitude below the one near T
        return _finish(fig, ax, "validation loss")

    return cache.get("timesteps", [cols, _logged(frame, cols)], draw)


def lr_plot(cache: SvgCache, frame: pd.DataFrame, groups: MetricGroups) -> str | None:
    if not groups.lr:
        return None

    def draw() -> Figure:
        fig, ax = _figure(height=2.8)
        for i, col in enumerate(groups.lr):
            data = _thin(series(frame, col))
            ax.plot(data["step"], data[col], color=f"C{i}", linewidth=1.4, label=col)
        return _finish(fig, ax, "learning rate")

    return cache.get("lr", [groups.lr, _logged(frame, groups.lr)], draw)


def demo_plots(cache: SvgCache, frame: pd.DataFrame, groups: MetricGroups) -> dict[str, str]:
    """One small plot per prefix of the other columns (``digits/accuracy`` and ``digits/fid`` share one)."""
    by_prefix: dict[str, list[str]] = {}
    for col in groups.other:
        by_prefix.setdefault(col.split("/", 1)[0] if "/" in col else col, []).append(col)
    plots = {}
    for prefix, cols in by_prefix.items():
        def draw(cols=cols) -> Figure:
            fig, ax = _figure(width=4.6, height=2.8)
            for i, col in enumerate(cols):
                data = _thin(series(frame, col))
                ax.plot(data["step"], data[col], color=f"C{i}", marker="o", markersize=2.5, linewidth=1.2, label=col)
            return _finish(fig, ax, prefix)

        plots[prefix] = cache.get(f"demo-{prefix}", [cols, _logged(frame, cols)], draw)
    return plots

