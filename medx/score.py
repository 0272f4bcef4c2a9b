"""`python -m medx.score FOLDER --checkpoint QC_CKPT`: screen images with a quality model.

Why: before training on a new data set, find the blurred, noisy, burnt-out or over-compressed
images. The CSV holds every feature (so a threshold can be revisited without rescoring), the
probability that the image is bad, and an error message for files that cannot be scored.

Either model of the `data=quality` sweep scores, opened by `medx.models.load` from its
checkpoint alone: the feature baseline (`model=quality_logreg`) from the features, or a CNN
from the image at the size it was trained at (its model card), exactly as in testing.
"""

from __future__ import annotations

import argparse
import csv
import logging
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from rich.progress import track

from medx.cli import user_errors
from medx.data.io import IMAGE_SUFFIXES, find_images, read_gray
from medx.data.transforms import ImageTransform
from medx.errors import DataError, MedxError
from medx.models.load import load
from medx.quality.features import FEATURES, image_features

log = logging.getLogger(__name__)

# p_bad of one image from its gray uint8 pixels and its feature vector
Scorer = Callable[[np.ndarray, np.ndarray], float]


def load_scorer(checkpoint: Path) -> Scorer:
    """The scorer of a quality checkpoint (the baseline's or a CNN's), told by its card."""
    model = load(checkpoint)
    classes = model.card.get("class_names") or list(getattr(model.hparams, "class_names", []))
    if model.task != "classification" or list(classes) != ["good", "bad"]:
        name = (model.card.get("data") or {}).get("name")
        raise DataError(
            f"{checkpoint} was trained on data={name} (classes {classes}); the score command "
            "needs a model trained with data=quality (classes good, bad)."
        )
    if model.inputs == "features":
        if list(model.feature_names) != list(FEATURES):
            raise DataError(
                f"{checkpoint} was trained on features {model.feature_names}; this medx "
                f"computes {list(FEATURES)}. Retrain the baseline (model=quality_logreg)."
            )

        def from_features(gray: np.ndarray, features: np.ndarray) -> float:
            return _p_bad(model, torch.as_tensor(features, dtype=torch.float32)[None])

        return from_features
    transform = ImageTransform(int(model.card["input"]["image_size"]), "none")

    def from_image(gray: np.ndarray, features: np.ndarray) -> float:
        return _p_bad(model, transform(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))[None])

    return from_image


@torch.inference_mode()
def _p_bad(model: torch.nn.Module, x: torch.Tensor) -> float:
    return float(torch.softmax(model(x).float(), 1)[0, 1])


def score_folder(
    folder: Path,
    checkpoint: Path,
    out: Path,
    threshold: float = 0.5,
    progress: bool = True,
) -> Path:
    """Write `out` (CSV): path, every feature, p_bad, verdict, error; return `out`."""
    scorer = load_scorer(checkpoint)
    paths = find_images(folder)
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
                gray = read_gray(path)
                values = image_features(gray)
            except MedxError as err:
                failed += 1
                message = str(err) if str(path) in str(err) else f"{path}: {err}"
                log.warning("%s", message)
                writer.writerow([path, *[""] * len(FEATURES), "", "", message])
                continue
            p_bad = scorer(gray, values)
            verdict = "bad" if p_bad >= threshold else "good"
            writer.writerow([path, *(f"{v:.6g}" for v in values), f"{p_bad:.4f}", verdict, ""])
    log.info("Scored %d images (%d failed) into %s", len(paths), failed, out)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m medx.score", description=__doc__)
    parser.add_argument("folder", type=Path, help="images to screen (searched recursively)")
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="a checkpoint (.ckpt) of a data=quality run: model=quality_logreg or a CNN",
    )
    parser.add_argument("--out", type=Path, default=Path("quality_scores.csv"))
    parser.add_argument("--threshold", type=float, default=0.5, help="p_bad at or above: bad")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    with user_errors("medx.score"):
        out = score_folder(
            args.folder, args.checkpoint, args.out, args.threshold, not args.no_progress
        )
    print(out)


if __name__ == "__main__":
    main()
