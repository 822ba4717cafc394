#!/usr/bin/env python
"""Write the "photos" of a subject for the DreamBooth demo on the digits model (configs/demo/digits-dreambooth.yaml).

    python scripts/digit_subject.py data/sks-digit              # 5 scans of a 3, dark ink on white paper
    python scripts/digit_subject.py data/sks-digit --digit 7 -n 8

The digits demo model has only ever seen light digits on a dark ground, so dark-on-light digits are a subject it
cannot draw yet: DreamBooth teaches it to draw them for "a handwritten sks digit 3" while "a handwritten digit 3"
keeps meaning the usual light-on-dark digit. The files are 8x8 gray PNGs (the demo's native size), taken from the
training split of scikit-learn's digits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as `python scripts/digit_subject.py` from anywhere: import this project's ldm


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="digit_subject.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder", metavar="FOLDER", help="where to write subject-<i>.png (created if missing)")
    p.add_argument("--digit", type=int, default=3, help="which digit the subject is (default: 3)")
    p.add_argument("-n", type=int, default=5, metavar="N", help="how many photos (default: 5)")
    p.add_argument("--seed", type=int, default=0, help="which scans of the digit are picked (default: 0)")
    return p


def main(argv=None) -> int:
    from ldm.data.digits import write_digit_subject
    from ldm.util import run_cli

    args = build_parser().parse_args(argv)

    def work() -> None:
        paths = write_digit_subject(args.folder, args.digit, args.n, args.seed)
        print(f"wrote {len(paths)} subject photos of a {args.digit} (dark ink on white) to {args.folder}")

    return run_cli(work)


if __name__ == "__main__":
    sys.exit(main())
