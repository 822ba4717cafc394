"""``python -m ldm.report logs/<run> [--embed]``: (re)write a run's ``report.html`` without training, e.g. for a run
from before the report existed or one copied off a cluster."""
from __future__ import annotations

import argparse
from pathlib import Path

from ldm.report import ReportBuilder
from ldm.util import atomic_path


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m ldm.report", description=__doc__.split(":")[0])
    parser.add_argument("run", type=Path, help="run directory (logs/<run>)")
    parser.add_argument("--embed", action="store_true", help="embed the images, so the one file can be sent around")
    parser.add_argument("-o", "--out", type=Path,
                        help="output file (default <run>/report.html); elsewhere add --embed, image paths being relative")
    args = parser.parse_args()
    if not args.run.is_dir():
        parser.error(f"{args.run} is not a directory")
    out = args.out or args.run / "report.html"
    html = ReportBuilder(args.run, embed_images=args.embed).build(status="written by python -m ldm.report")
    with atomic_path(out) as tmp:
        tmp.write_text(html)
    print(out)


if __name__ == "__main__":
    main()
