#!/usr/bin/env python
"""Look at a dataset before training on it: a contact sheet of captioned images and a summary.

    python scripts/contact_sheet.py data/pokemon                 # 24 images spread over the whole set
    python scripts/contact_sheet.py data/pokemon -n 48 --seed 1  # 48 chosen at random
    python scripts/contact_sheet.py data/pokemon --out sheet.png --thumb 192 --columns 8

The contact sheet is a PNG grid: each image (decoded as training decodes it) with its file name and its caption
wrapped beneath, cut with "..." after --caption-lines lines. Images without a caption say "(no caption)" in red.
By default it is saved as FOLDER/.preview/contact_sheet.png: the hidden folder keeps it out of training (neither
the folder dataset nor datasets' imagefolder reads hidden folders).

The summary is printed and saved as FOLDER/summary.txt and FOLDER/summary.json: image and caption counts, image
sizes and aspect ratios, caption lengths in words, the most frequent caption words (without "a", "the", ...),
and, for a folder written by scripts/prepare_dataset.py, the source files it skipped with their reasons and the
duplicates it removed.

Captions are read as training reads them (ldm.data.folder.FolderCaptions): a non-empty FOLDER/metadata.jsonl row,
else a same-name .txt next to the image; .txt files in UTF-8, UTF-16 or an 8-bit Windows encoding all work.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python scripts/contact_sheet.py` from anywhere: import this project's ldm

from ldm.util import ConfigError, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="contact_sheet.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="FOLDER", help="image folder (e.g. the output of prepare_dataset.py)")
    p.add_argument("--out", default=None, metavar="PNG", help="where to save the sheet "
                   "(default: FOLDER/.preview/contact_sheet.png)")
    p.add_argument("-n", type=int, default=24, metavar="N", help="number of images (default: 24)")
    p.add_argument("--seed", type=int, default=None,
                   help="pick N images at random with this seed (default: N evenly spaced in file-name order)")
    p.add_argument("--columns", type=int, default=None, metavar="N", help="images per row (default: about sqrt(1.5 N))")
    p.add_argument("--thumb", type=int, default=256, metavar="PX", help="thumbnail box size in pixels (default: 256)")
    p.add_argument("--caption-lines", type=int, default=4, metavar="N", help="caption lines shown (default: 4)")
    p.add_argument("--font-size", type=int, default=14, metavar="PX", help="caption font size (default: 14)")
    return p


def make_sheet(args) -> None:
    if not Path(args.folder).is_dir():
        raise ConfigError(f"folder '{args.folder}' does not exist")
    from ldm.data.review import contact_sheet, write_summary

    _, text = write_summary(args.folder)
    print(text)
    out = contact_sheet(args.folder, args.out, n=args.n, columns=args.columns, thumb=args.thumb,
                        caption_lines=args.caption_lines, font_size=args.font_size, seed=args.seed)
    print(f"\nsaved {out} and {Path(args.folder) / 'summary.txt'}")


def main(argv: list[str] | None = None) -> int:
    # ValueError: contact_sheet's "no images in FOLDER" (and ConfigError, a malformed metadata.jsonl).
    return run_cli(make_sheet, build_parser().parse_args(argv), errors=(ValueError,))


if __name__ == "__main__":
    sys.exit(main())
