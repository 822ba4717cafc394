"""Look at a dataset before training on it: a summary of what is in the folder and a contact sheet of captioned images.

Both read the folder the way training does (``find_images`` + metadata.jsonl/sidecar captions), and the summary
adds what :func:`ldm.data.prepare.prepare` left out (unreadable, too small, duplicates) from its manifest.
"""
from __future__ import annotations

import json
import math
import random
import re
import statistics
from collections import Counter
from pathlib import Path
from typing import Any, Sequence

from PIL import Image, ImageDraw, ImageFont, ImageOps

from ldm.data.folder import find_images
from ldm.data.images import BadImage, load_rgb
from ldm.data.prepare import MANIFEST, atomic_write, read_captions

SUMMARY_JSON, SUMMARY_TXT = "summary.json", "summary.txt"
PREVIEW_DIR = ".preview"  # hidden: neither FolderDataset nor datasets' imagefolder trains on the contact sheet
# Words that top every caption list without saying anything about the data set.
STOPWORDS = frozenset("a an the of and in on with at to for from by is are it its this that there as or".split())
ASPECT_BINS = ((0.0, "tall (< 0.75)"), (0.75, "portrait (0.75-0.95)"), (0.95, "square (0.95-1.05)"),
               (1.05, "landscape (1.05-1.40)"), (1.40, "wide (>= 1.40)"))
WORD_BINS = ((0, "0 (none)"), (1, "1-5"), (6, "6-10"), (11, "11-20"), (21, "21-40"), (41, "> 40"))


def _bin(value: float, bins: Sequence[tuple[float, str]]) -> str:
    return [label for low, label in bins if value >= low][-1]


def _stats(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {}
    return {"min": min(values), "median": statistics.median_low(values), "mean": round(statistics.fmean(values), 2),
            "max": max(values)}


def _sizes(sizes: Sequence[tuple[int, int]]) -> dict[str, Any]:
    counts = Counter(f"{w}x{h}" for w, h in sizes)
    aspects = Counter(_bin(w / h, ASPECT_BINS) for w, h in sizes)
    return {"width": _stats([w for w, _ in sizes]), "height": _stats([h for _, h in sizes]),
            "most_common": counts.most_common(5),
            "aspect_ratio": {label: aspects[label] for _, label in ASPECT_BINS if aspects[label]}}


def summarize(folder: str | Path, top_words: int = 20) -> dict[str, Any]:
    """Counts, sizes, aspect ratios, caption lengths and words of ``folder``, plus prepare's skips if it has any."""
    folder = Path(folder)
    files = find_images(folder)
    captions = read_captions(folder, [p.relative_to(folder).as_posix() for p in files])
    sizes, unreadable = [], []
    for path in files:
        try:
            with Image.open(path) as img:  # header only: fast, and enough for the size
                sizes.append(img.size)
        except Exception as err:  # PIL raises several types for a bad header; all mean "not an image"
            unreadable.append({"file": str(path), "reason": f"{type(err).__name__}: {err}"})
    lengths = [len(text.split()) for text in captions.values()]
    words = Counter(w for text in captions.values() for w in re.findall(r"[\w']+", text.lower()) if w not in STOPWORDS)
    summary: dict[str, Any] = {
        "folder": str(folder),
        "images": len(files),
        "captioned": sum(1 for text in captions.values() if text),
        "image_sizes": _sizes(sizes),
        "caption_words": {**_stats(lengths),
                          "histogram": dict(Counter(_bin(n, WORD_BINS) for n in lengths).most_common())},
        "top_words": words.most_common(top_words),
        "unreadable_in_folder": unreadable,
    }
    if (folder / MANIFEST).is_file():
        records = json.loads((folder / MANIFEST).read_text())["sources"]
        skipped = [{"file": src, "status": r["status"], "reason": r["reason"]} for src, r in records.items()
                   if r["status"] != "ok"]
        duplicates = [{"file": src, "same_as": r["file_name"]} for src, r in records.items() if r.get("duplicate")]
        summary["sources"] = {"found": len(records), "written": summary["images"], "skipped": len(skipped),
                              "duplicates_removed": len(duplicates)}
        summary["skipped"] = skipped
        summary["duplicates"] = duplicates
        summary["source_sizes"] = _sizes([tuple(r["source_size"]) for r in records.values() if "source_size" in r])
    return summary


def format_summary(s: dict[str, Any]) -> str:
    """The summary as text for a terminal and ``summary.txt``."""
    lines = [f"dataset {s['folder']}: {s['images']} images, {s['captioned']} captioned, "
             f"{s['images'] - s['captioned']} without caption"]
    if "sources" in s:
        src = s["sources"]
        lines.append(f"sources: {src['found']} found, {src['written']} written, {src['duplicates_removed']} exact "
                     f"duplicates removed, {src['skipped']} skipped")

    def sizes(title: str, d: dict[str, Any]) -> None:
        if d.get("width"):
            common = ", ".join(f"{size} ({n})" for size, n in d["most_common"])
            lines.append(f"{title}: width {d['width']['min']}-{d['width']['max']} (median {d['width']['median']}), "
                         f"height {d['height']['min']}-{d['height']['max']} (median {d['height']['median']}); "
                         f"most common {common}")
            lines.append("  aspect ratio w/h: " + ", ".join(f"{k} {v}" for k, v in d["aspect_ratio"].items()))

    sizes("source sizes", s.get("source_sizes", {}))
    sizes("image sizes", s["image_sizes"])
    words = s["caption_words"]
    if words.get("max") is not None:
        lines.append(f"caption length in words: {words['min']}-{words['max']} (median {words['median']}, mean "
                     f"{words['mean']}); " + ", ".join(f"{k}: {v}" for k, v in words["histogram"].items()))
    if s["top_words"]:
        lines.append("most frequent caption words: " + ", ".join(f"{w} ({n})" for w, n in s["top_words"]))
    for d in s.get("duplicates", []):
        lines.append(f"duplicate removed: {d['file']} (same pixels as {d['same_as']})")
    for d in s.get("skipped", []):
        lines.append(f"skipped ({d['status']}): {d['file']}: {d['reason']}")
    for d in s["unreadable_in_folder"]:
        lines.append(f"unreadable image in the folder: {d['file']}: {d['reason']}")
    return "\n".join(lines)


def write_summary(folder: str | Path) -> tuple[dict[str, Any], str]:
    """Compute the summary and save it as ``summary.json`` and ``summary.txt`` in ``folder``."""
    summary = summarize(folder)
    text = format_summary(summary)
    atomic_write(Path(folder) / SUMMARY_JSON, (json.dumps(summary, indent=1, ensure_ascii=False) + "\n").encode())
    atomic_write(Path(folder) / SUMMARY_TXT, (text + "\n").encode())
    return summary, text


# ---- contact sheet ----------------------------------------------------------------------------------------------
def wrap(text: str, font: ImageFont.ImageFont, width: int) -> list[str]:
    """Greedy word wrap measured in pixels; a word wider than a line is cut into pieces that fit."""
    lines, line = [], ""
    for word in text.split():
        while font.getlength(word) > width:  # e.g. a long file name or URL in a caption
            cut = 1
            while font.getlength(word[:cut + 1]) <= width:
                cut += 1
            if line:
                lines.append(line)
                line = ""
            lines.append(word[:cut])
            word = word[cut:]
        candidate = f"{line} {word}".strip()
        if font.getlength(candidate) <= width:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + [line] if line else lines


def pick(files: Sequence[Path], n: int, seed: int | None) -> list[Path]:
    """``n`` files spread evenly over the sorted list (so one look covers the whole set), or a seeded random draw."""
    if n >= len(files):
        return list(files)
    if seed is not None:
        return sorted(random.Random(seed).sample(list(files), n))
    return [files[round(i * (len(files) - 1) / max(n - 1, 1))] for i in range(n)]


def contact_sheet(folder: str | Path, out: str | Path | None = None, n: int = 24, columns: int | None = None,
                  thumb: int = 256, caption_lines: int = 4, font_size: int = 14, seed: int | None = None) -> Path:
    """Save a PNG grid of ``n`` images of ``folder``, each with its file name and wrapped caption beneath.

    Default location: ``<folder>/.preview/contact_sheet.png``. Captions longer than ``caption_lines`` end in "...";
    images without a caption say so in red, and undecodable ones show a grey box.
    """
    folder = Path(folder)
    files = pick(find_images(folder), n, seed)
    if not files:
        raise ValueError(f"no images in '{folder}'")
    captions = read_captions(folder, [p.relative_to(folder).as_posix() for p in files])
    font, small = ImageFont.load_default(size=font_size), ImageFont.load_default(size=max(8, font_size - 3))
    line_h, pad = round(font_size * 1.3), 8
    cols = columns or min(len(files), math.ceil(math.sqrt(len(files) * 1.5)))
    rows = math.ceil(len(files) / cols)
    cell_w, cell_h = thumb + 2 * pad, thumb + 3 * pad + line_h * (caption_lines + 1)
    sheet = Image.new("RGB", (cols * cell_w, rows * cell_h), "white")
    draw = ImageDraw.Draw(sheet)
    for i, path in enumerate(files):
        x, y = (i % cols) * cell_w + pad, (i // cols) * cell_h + pad
        try:
            img = load_rgb(path)
            img = ImageOps.contain(img, (thumb, thumb), Image.Resampling.LANCZOS)  # small images are scaled up too
            left, top = x + (thumb - img.width) // 2, y + (thumb - img.height) // 2
            sheet.paste(img, (left, top))
            # A hairline frame, so a white picture (e.g. a transparent PNG composited on white) is still visible.
            draw.rectangle((left - 1, top - 1, left + img.width, top + img.height), outline=(210, 210, 210))
        except BadImage:
            draw.rectangle((x, y, x + thumb - 1, y + thumb - 1), fill=(200, 200, 200))
            draw.text((x + pad, y + pad), "unreadable", fill="black", font=font)
        name = path.relative_to(folder).as_posix()
        draw.text((x, y + thumb + pad), wrap(name, small, thumb)[0], fill=(110, 110, 110), font=small)
        caption = captions[name]
        lines = wrap(caption, font, thumb) if caption else ["(no caption)"]
        if len(lines) > caption_lines:
            last = lines[caption_lines - 1]
            while last and font.getlength(last + " ...") > thumb:
                last = last[:-1]
            lines = lines[:caption_lines - 1] + [last + " ..."]
        for j, line in enumerate(lines):
            draw.text((x, y + thumb + pad + line_h * (j + 1)), line, fill="black" if caption else "red", font=font)
    out = Path(out) if out else folder / PREVIEW_DIR / "contact_sheet.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
