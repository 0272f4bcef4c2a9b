"""`python -m medx.score QC_MODEL FOLDER`: screen images with a quality model.

Why: before training on a new data set, find the blurred, noisy, burnt-out or over-compressed
images. The CSV holds every feature (so a threshold can be revisited without rescoring), the
probability that the image is bad, and an error message for files that cannot be scored.

Either model of the `data=quality` sweep scores (a checkpoint, a `models:/` URI or an ONNX
export of a CNN), through the quality gate of `medx.inference`, which `medx.predict --qc`
and `medx.serve --qc` use too: the feature baseline (`model=quality_logreg`) from the
features, or a CNN from the image at the size it was trained at (its model card), exactly as
in testing. The model is given first, as to every medx command that uses one;
`FOLDER --checkpoint QC_MODEL` still works.
"""

from __future__ import annotations

import argparse
import csv
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def score_folder(
    folder: Path,
    checkpoint: str | Path,
    out: Path,
    threshold: float = 0.5,
    progress: bool = True,
) -> Path:
    """Write `out` (CSV): path, every feature, p_bad, verdict, error; return `out`.

    Args:
        folder: images to screen (searched recursively).
        checkpoint: the quality model (checkpoint, `models:/` URI or .onnx).
        out: the CSV file.
        threshold: p_bad at or above which an image is "bad".
        progress: show a progress bar.
    """
    from rich.progress import track

    from medx.data.io import IMAGE_SUFFIXES, find_images
    from medx.errors import DataError, MedxError
    from medx.inference import QualityGate, read
    from medx.quality.features import FEATURES

    gate = QualityGate.from_checkpoint(checkpoint, threshold)
    paths = find_images(Path(folder))
    if not paths:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}, or DICOM).")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *FEATURES, "p_bad", "verdict", "error"])
        steps = track(paths, description="Scoring") if progress else paths
        for path in steps:
            try:
                image = read(path)
            except MedxError as err:
                failed += 1
                log.warning("%s", err)
                writer.writerow([path, *[""] * len(FEATURES), "", "", str(err)])
                continue
            quality = gate.judge(image)
            values = (f"{v:.6g}" for v in gate.features(image))
            writer.writerow([path, *values, f"{quality.p_bad:.4f}", quality.verdict, ""])
    log.info("Scored %d images (%d failed) into %s", len(paths), failed, out)
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m medx.score",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "paths",
        nargs="+",
        metavar="[QC_MODEL] FOLDER",
        help="a data=quality model (checkpoint, models:/ URI or .onnx: model=quality_logreg "
        "or a CNN), then the folder of images to screen (searched recursively)",
    )
    p.add_argument("--checkpoint", help="the quality model, when not given first")
    p.add_argument("--out", type=Path, default=Path("quality_scores.csv"))
    p.add_argument("--threshold", type=float, default=0.5, help="p_bad at or above: bad")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> None:
    p = parser()
    args = p.parse_args(argv)
    wanted = 1 if args.checkpoint else 2
    if len(args.paths) != wanted:
        p.error("give QC_MODEL FOLDER, or FOLDER --checkpoint QC_MODEL")
    model = args.checkpoint or args.paths[0]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    from medx.cli import user_errors

    with user_errors("medx.score"):
        out = score_folder(
            Path(args.paths[-1]), model, args.out, args.threshold, not args.no_progress
        )
    print(out)


if __name__ == "__main__":
    main()
