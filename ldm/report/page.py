"""Assemble ``report.html`` from a run directory: one static page, plots inline as SVG, a few lines of vanilla JS for
the sample-grid sliders; nothing is fetched from a network."""
from __future__ import annotations

import json
import time
from datetime import datetime
from html import escape
from pathlib import Path

from ldm.report import plots, rundir
from ldm.report.images import ImageSource

MAX_FRAMES = 100  # slider positions per split; a longer history is thinned evenly, the first and last kept


class ReportBuilder:
    """Builds the page of one run dir; keep one per run so SVGs and embedded images are reused between builds."""

    def __init__(self, run: str | Path, embed_images: bool = False, max_px: int = 768, max_frames: int = MAX_FRAMES):
        self.run = Path(run)
        self.source = ImageSource(self.run, embed=embed_images, max_px=max_px)
        self.cache = plots.SvgCache()
        self.max_frames = max_frames

    def build(self, status: str = "", skipped: dict[str, list[str]] | None = None) -> str:
        frame = rundir.read_metrics(self.run / "metrics.csv")
        ckpts = rundir.checkpoints(self.run, frame)
        sections = [self._command(), self._curves(frame, ckpts["overfitting"]), _checkpoints(ckpts),
                    self._grids(), self._progress(), self._demos(frame), _skipped(skipped)]
        self.cache.end_build()
        meta = [status] if status else []
        if frame is not None and not frame.empty:
            meta.append(f"last logged step {int(frame['step'].max())}")
        meta.append(f"written {datetime.now():%Y-%m-%d %H:%M:%S}")
        head = f"<h1>{escape(self.run.name)}</h1><p class=meta>{escape(' · '.join(meta))}</p>"
        return PAGE.format(title=escape(self.run.name), style=STYLE, body=head + "".join(sections), script=SCRIPT)

    def _command(self) -> str:
        lines = rundir.command_lines(self.run)
        command = f"<pre id=command>{escape(chr(10).join(lines))}</pre>" if lines else "<p>no command.txt</p>"
        configs = "".join(f"<details><summary>{escape(name)}</summary><pre>{escape(text)}</pre></details>"
                          for name, text in rundir.latest_configs(self.run).items())
        return _section("command", "Command and config", command + (configs or "<p>no configs/ files</p>"))

    def _curves(self, frame, overfitting) -> str:
        if frame is None:
            return _section("curves", "Curves", "<p>no metrics.csv yet</p>")
        groups = rundir.metric_groups(frame)
        parts = []
        for title, svg, missing in (
                ("Loss", plots.loss_plot(self.cache, frame, groups, overfitting), "no loss logged yet"),
                ("Validation loss per timestep", plots.timestep_plot(self.cache, frame, groups),
                 "no val/loss_t&lt;T&gt; columns in metrics.csv"),
                ("Learning rate", plots.lr_plot(self.cache, frame, groups), "no lr-* columns in metrics.csv")):
            parts.append(f"<h3>{title}</h3>" + (f"<div class=plot>{svg}</div>" if svg else f"<p>{missing}</p>"))
        if overfitting:
            parts.insert(0, f"<p class=warn id=overfitting>validation loss not improving since step "
                            f"{overfitting['since_step']}; best checkpoint {escape(str(overfitting.get('best')))} "
                            f"(step {overfitting.get('best_step')})</p>")
        cols = groups.train_loss + groups.val_loss + groups.timestep_loss + groups.lr
        parts.append("<h3>Latest values</h3>" + _latest_table(frame, cols, "latest"))
        return _section("curves", "Curves", "".join(parts))

    def _grids(self) -> str:
        found = rundir.grid_series(self.run)
        if not found:
            return _section("grids", "Sample grids", "<p>no images/ grids yet</p>")
        data, parts = {}, []
        for split, grids in found.items():
            steps = _thin(grids.steps, self.max_frames)
            shown = set(steps)
            frames = {name: {str(s): self.source(path) for s, path in by_step.items() if s in shown}
                      for name, by_step in grids.groups.items()}
            data[split] = {"steps": steps, "epochs": {str(s): grids.epochs[s] for s in steps}, "groups": frames}
            last = steps[-1]
            figures = "".join(_grid_figure(name, _at(fr, last)) for name, fr in frames.items())
            parts.append(
                f"<div class=grids data-split=\"{escape(split)}\"><h3>{escape(split)}</h3>"
                f"<input type=range class=slider min=0 max={len(steps) - 1} value={len(steps) - 1}> "
                f"<span class=stepshown>step {last} (epoch {grids.epochs[last]})</span>"
                f"<div class=figures>{figures}</div></div>")
        payload = json.dumps(data).replace("</", "<\\/")
        parts.append(f"<script type=application/json id=grid-data>{payload}</script>")
        return _section("grids", "Sample grids", "".join(parts))

    def _progress(self) -> str:
        gifs = rundir.progress_gifs(self.run)
        if not gifs:
            return _section("progress", "Progress", "<p>no progress/ GIFs</p>")
        items = "".join(
            f"<figure class=progress><img alt=\"{escape(g['slug'])}\" src=\"{escape(self.source(g['gif']))}\">"
            f"<figcaption>{escape(g['prompt'])}</figcaption>"
            + (f"<div class=strip><img alt=\"{escape(g['slug'])} strip\" src=\"{escape(self.source(g['strip']))}\"></div>"
               if g["strip"] else "") + "</figure>" for g in gifs)
        return _section("progress", "Progress", f"<div class=figures>{items}</div>")

    def _demos(self, frame) -> str:
        if frame is None:
            return ""
        groups = rundir.metric_groups(frame)
        if not groups.other:
            return ""
        svgs = plots.demo_plots(self.cache, frame, groups).values()
        svgs = "".join(f"<div class=\"plot small\">{svg}</div>" for svg in svgs)
        return _section("demos", "Demo figures", _latest_table(frame, groups.other, "demo-latest") + svgs)


def _grid_figure(name: str, src: str) -> str:
    hidden = "" if src else " style=visibility:hidden"  # this group has no grid at or before the step shown
    return (f"<figure data-group=\"{escape(name)}\"><img alt=\"{escape(name)}\" src=\"{escape(src)}\"{hidden}>"
            f"<figcaption>{escape(name)}</figcaption></figure>")


def _section(ident: str, title: str, body: str) -> str:
    return f"<section id={ident}><h2>{title}</h2>{body}</section>"


def _latest_table(frame, cols: list[str], ident: str) -> str:
    rows = []
    for col in cols:
        found = rundir.latest(frame, col)
        if found:
            rows.append(f"<tr><td>{escape(col)}</td><td class=num data-metric=\"{escape(col)}\">{_num(found[1])}</td>"
                        f"<td class=num>{found[0]}</td></tr>")
    return (f"<table id={ident}><tr><th>metric</th><th>latest</th><th>at step</th></tr>{''.join(rows)}</table>"
            if rows else "<p>none</p>")


def _checkpoints(ckpts: dict) -> str:
    if not ckpts["rows"]:
        return _section("checkpoints", "Checkpoints", "<p>no checkpoints yet</p>")
    rows = []
    for row in ckpts["rows"]:
        best = row["file"] == ckpts["best"]
        size = _size(row["size"]) if "size" in row else "missing"
        mtime = time.strftime("%Y-%m-%d %H:%M", time.localtime(row["mtime"])) if "mtime" in row else ""
        rows.append(f"<tr{' class=best' if best else ''} data-file=\"{escape(row['file'])}\">"
                    f"<td>{escape(row['file'])}{' ★ best' if best else ''}</td>"
                    f"<td class=num>{_opt(row.get('step'))}</td><td class=num>{_opt(row.get('epoch'))}</td>"
                    f"<td class=\"num val-loss\">{_opt(row.get('val_loss'), _num)}</td>"
                    f"<td class=num>{size}</td><td>{mtime}</td></tr>")
    table = ("<table id=checkpoint-table><tr><th>file</th><th>step</th><th>epoch</th><th>val loss</th><th>size</th>"
             f"<th>modified</th></tr>{''.join(rows)}</table>")
    return _section("checkpoints", "Checkpoints", table + f"<p class=meta>from {escape(ckpts['source'])}</p>")


def _skipped(skipped: dict[str, list[str]] | None) -> str:
    if skipped is None:
        body = "<p>not reported (the datamodule has no skipped_files)</p>"
    elif not skipped:
        body = "<p id=skipped-none>none: every image could be read</p>"
    else:
        items = {split: "".join(f"<li>{escape(f)}</li>" for f in files) for split, files in skipped.items()}
        body = "".join(f"<h3>{escape(split)}: {len(skipped[split])}</h3><ul>{li}</ul>" for split, li in items.items())
    return _section("skipped", "Skipped files", body)


def _size(nbytes: int) -> str:
    return f"{nbytes / 2**20:.1f} MB" if nbytes >= 2**20 else f"{nbytes / 1024:.1f} KB"


def _num(value: float) -> str:
    return f"{value:.6g}"


def _opt(value, fmt=str) -> str:
    return "" if value is None else fmt(value)


def _thin(steps: list[int], most: int) -> list[int]:
    if len(steps) <= most:
        return steps
    picks = {round(i * (len(steps) - 1) / (most - 1)) for i in range(most)}
    return [steps[i] for i in sorted(picks)]


def _at(frames: dict[str, str], step: int) -> str:
    """The group's frame at ``step`` or its last one before (groups need not log at every step)."""
    earlier = [int(s) for s in frames if int(s) <= step]
    return frames[str(max(earlier))] if earlier else ""


PAGE = """<!DOCTYPE html>
<html lang=en><head><meta charset=utf-8><title>{title} · run report</title><style>{style}</style></head>
<body>{body}<script>{script}</script></body></html>
"""

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1200px;padding:0 1em;color:#222}
h1{margin-bottom:.2em} .meta{color:#666;font-size:.9em} .warn{color:#b00020;font-weight:600}
section{border-top:1px solid #ddd;margin-top:1.5em} pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em} #command{white-space:pre-wrap}
table{border-collapse:collapse;margin:.5em 0} td,th{border:1px solid #ddd;padding:.25em .6em} .num{text-align:right}
tr.best{background:#e8f5e9;font-weight:600} .plot svg{max-width:100%;height:auto}
.plot.small{display:inline-block;width:49%}
.figures{display:flex;flex-wrap:wrap;gap:1em} figure{margin:0} figure img{max-width:100%}
.grids figure img{max-height:360px} .slider{width:60%;vertical-align:middle} .strip{max-width:100%;overflow-x:auto}
.strip img{max-width:none;height:96px}
"""

# Each split's slider picks a step; each group shows its frame at that step or its last before it.
SCRIPT = """
(function(){
  var node = document.getElementById('grid-data'); if (!node) return;
  var data = JSON.parse(node.textContent);
  document.querySelectorAll('.grids').forEach(function(box){
    var split = data[box.dataset.split], slider = box.querySelector('.slider');
    slider.addEventListener('input', function(){
      var step = split.steps[+slider.value];
      box.querySelector('.stepshown').textContent = 'step ' + step + ' (epoch ' + split.epochs[step] + ')';
      box.querySelectorAll('figure').forEach(function(fig){
        var frames = split.groups[fig.dataset.group], best = null;
        Object.keys(frames).forEach(function(s){ if (+s <= step && (best === null || +s > best)) best = +s; });
        var img = fig.querySelector('img');
        img.style.visibility = best === null ? 'hidden' : 'visible';
        if (best !== null) img.src = frames[best];
      });
    });
  });
})();
"""
