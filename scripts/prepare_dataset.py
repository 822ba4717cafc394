#!/usr/bin/env python
"""Turn one or more folders of mixed images into a training set: RGB JPEGs plus metadata.jsonl.

    python scripts/prepare_dataset.py raw/scraped raw/more -o data/pokemon --size 512 --crop
    python scripts/caption.py data/pokemon --prefix "a pokemon, "
    python scripts/contact_sheet.py data/pokemon

Inputs are searched recursively (hidden folders skipped) for PNG, JPEG, WebP, GIF (first frame), BMP and TIFF.
Every mode is converted to upright 8-bit RGB the way training decodes images: palettes and RGBA/LA are
composited on white, CMYK and 16-bit are converted, EXIF rotation is applied. Then, per image:

  1. files that will not decode (truncated, empty, not an image) are skipped;
  2. images whose short side is under --min-size are skipped;
  3. exact duplicates (the same decoded pixels, whatever the file format) are kept once;
  4. with --size, the short side is scaled to SIZE with --resample; with --crop, a centred SIZE x SIZE square
     is cut out;
  5. the image is saved as OUT/<source name>-<pixel hash>.jpg at --quality.

OUT/metadata.jsonl gets one {"file_name", "text"} row per image. Captions that came with the sources (an input
folder's metadata.jsonl, or a same-name .txt next to an image) are carried over; the rest are "" until
scripts/caption.py fills them in. Captions already in OUT are kept. --sidecars also writes OUT/<name>.txt.

OUT loads with datasets.load_dataset("imagefolder", data_dir=OUT), with the training configs'
ldm.data.hf.hf_dataset (name: OUT) and with ldm.data.folder.FolderDataset (root: OUT).

Running it again does only what is missing: unchanged sources are not decoded again (OUT/.prepare_manifest.json
remembers them), new ones are added, removed ones leave OUT, and the result is the same as a fresh run. Changing
--size, --crop, --resample, --quality or --min-size converts everything again. Ctrl-C is safe; run the same
command to continue.

At the end a summary is printed and saved as OUT/summary.txt and OUT/summary.json: counts, every skipped file
with its reason, duplicates removed, image sizes and aspect ratios, caption lengths and frequent words.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python scripts/prepare_dataset.py` from anywhere: import this project's ldm

from ldm.data.prepare import RESAMPLING, Settings  # noqa: E402
from ldm.util import run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="prepare_dataset.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="folders (searched recursively) or image files")
    p.add_argument("-o", "--out", required=True, metavar="OUT", help="output folder (created; reuse it to resume)")
    p.add_argument("--size", type=int, default=None, metavar="PX",
                   help="scale every image so its short side is PX pixels (default: keep sizes)")
    p.add_argument("--crop", action="store_true", help="after --size, cut the centred PX x PX square")
    p.add_argument("--resample", default="lanczos", choices=sorted(RESAMPLING),
                   help="PIL filter for --size (default: lanczos, sharpest for downscaling photos)")
    p.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG quality 1-100 (default: 95)")
    p.add_argument("--min-size", type=int, default=0, metavar="PX",
                   help="skip images whose short side is under PX pixels, before any resize (default: 0, keep all)")
    p.add_argument("--sidecars", action="store_true", help="also write OUT/<name>.txt holding each caption")
    p.add_argument("--workers", type=int, default=max(1, min(8, (os.cpu_count() or 1))), metavar="N",
                   help="processes decoding and encoding in parallel (default: CPU cores, at most 8)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def prepare_folder(args) -> None:
    from ldm.data.prepare import prepare
    from ldm.data.review import write_summary

    settings = Settings(size=args.size, crop=args.crop, resample=args.resample, quality=args.quality,
                        min_size=args.min_size)
    prepare(args.inputs, args.out, settings, workers=args.workers, sidecars=args.sidecars, progress=not args.quiet)
    _, text = write_summary(args.out)
    print(text)
    print(f"\nsaved {args.out}/metadata.jsonl, summary.txt and summary.json. Next:\n"
          f"  python scripts/caption.py {args.out}        # BLIP captions for images without one\n"
          f"  python scripts/contact_sheet.py {args.out}  # look at images and captions before training")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(prepare_folder, args,
                   interrupted=f"interrupted; run the same command again to continue in {args.out}")


if __name__ == "__main__":
    sys.exit(main())
