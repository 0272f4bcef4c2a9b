"""`python -m medx.quality score <folder> --checkpoint <ckpt> [--out scores.csv]`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from medx.errors import MedxError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m medx.quality", description="Image-quality tools."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser(
        "score", help="write a CSV of features and quality probability per image"
    )
    score.add_argument("folder", type=Path, help="images to screen (searched recursively)")
    score.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint (.ckpt) of a data=quality run: model=quality_logreg or a CNN",
    )
    score.add_argument(
        "--config",
        type=Path,
        help="CNN only: the run's config.yaml (default: next to the checkpoints/ folder)",
    )
    score.add_argument("--out", type=Path, default=Path("quality_scores.csv"))
    score.add_argument("--threshold", type=float, default=0.5, help="p_bad at or above: bad")
    score.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from medx.score import score_folder  # torch import only once arguments are fine

    try:
        out = score_folder(
            args.folder,
            args.checkpoint,
            args.out,
            args.threshold,
            not args.no_progress,
            args.config,
        )
    except MedxError as err:
        print(f"medx.quality: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
