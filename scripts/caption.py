#!/usr/bin/env python
"""Caption the images of a folder with BLIP and save the captions in its metadata.jsonl.

    python scripts/caption.py data/pokemon                            # Hub model (needs network once)
    python scripts/caption.py data/pokemon --model models/blip --prefix "a pokemon, "

FOLDER is any image folder, typically the output of scripts/prepare_dataset.py. Images are found recursively;
a caption already there (a metadata.jsonl row or a same-name .txt) is kept, and only images without one are
captioned, unless --overwrite. Each caption is PREFIX + BLIP's text + SUFFIX. FOLDER/metadata.jsonl
({"file_name", "text"} per image) is rewritten after every batch, so Ctrl-C loses at most one batch and running
the command again carries on; when every image has a caption it does nothing (BLIP is not even loaded).
Same-name .txt sidecars are updated where they exist, or for every image with --sidecars.

--model is a local folder holding a saved BlipForConditionalGeneration and BlipProcessor, or a Hub id (default:
Salesforce/blip-image-captioning-base, the model used for lambdalabs/pokemon-blip-captions). Hub ids need the
network the first time; with HF_HUB_OFFLINE=1 or no network, download the model once elsewhere:

    hf download Salesforce/blip-image-captioning-base --local-dir models/blip

and pass --model models/blip. BLIP runs on the GPU in half precision when there is one (--device to choose).
Decoding is beam search (--num-beams, 1 = greedy); --max-new-tokens caps caption length.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python scripts/caption.py` from anywhere: import this project's ldm

from ldm.util import run_cli  # noqa: E402

DEFAULT_MODEL = "Salesforce/blip-image-captioning-base"  # ldm.data.captioning.DEFAULT_MODEL; not imported so --help is instant


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="caption.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="FOLDER", help="image folder to caption (metadata.jsonl is written there)")
    p.add_argument("--model", default=DEFAULT_MODEL, metavar="DIR_OR_ID",
                   help=f"local BLIP folder or Hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--prefix", default="", help='text put before every new caption, e.g. "a pokemon, "')
    p.add_argument("--suffix", default="", help='text put after every new caption, e.g. ", in the style of sks"')
    p.add_argument("--overwrite", action="store_true", help="caption every image again, replacing existing captions")
    p.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per BLIP call (default: 8)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else mps, else cpu)")
    p.add_argument("--num-beams", type=int, default=3, metavar="N", help="beam search width (default: 3)")
    p.add_argument("--max-new-tokens", type=int, default=40, metavar="N", help="longest caption in tokens (default: 40)")
    p.add_argument("--min-new-tokens", type=int, default=None, metavar="N",
                   help="shortest caption in tokens (default: the model's own setting)")
    p.add_argument("--sidecars", action="store_true", help="also write FOLDER/<image name>.txt for every image")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    return p


def caption(args) -> None:
    from ldm.data.captioning import caption_folder
    from ldm.data.review import write_summary

    result = caption_folder(args.folder, args.model, batch_size=args.batch_size, overwrite=args.overwrite,
                            prefix=args.prefix, suffix=args.suffix, device=args.device,
                            max_new_tokens=args.max_new_tokens, min_new_tokens=args.min_new_tokens,
                            num_beams=args.num_beams, sidecars=args.sidecars, progress=not args.quiet)
    print(f"{result['images']} images: {result['captioned']} captioned now, {result['kept']} already had a caption")
    for name in result["empty"]:
        print(f"BLIP gave an empty caption (left for the next run): {name}")
    for line in result["unreadable"]:
        print(f"unreadable, not captioned: {line}")
    if result["captioned"]:
        write_summary(args.folder)
        print(f"saved {args.folder}/metadata.jsonl; summary in {args.folder}/summary.txt")


def main(argv: list[str] | None = None) -> int:
    return run_cli(caption, build_parser().parse_args(argv),
                   interrupted="interrupted; captions so far are saved, run the same command again to continue")


if __name__ == "__main__":
    sys.exit(main())
