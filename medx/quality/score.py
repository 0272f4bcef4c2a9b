"""Screen a folder of images with a trained quality baseline: one CSV row per image.

Why: before training on a new data set, find the blurred, noisy, burnt-out or over-compressed
images. The CSV holds every feature (so a threshold can be revisited without rescoring), the
probability that the image is bad, and an error message for files that cannot be scored.
"""

from __future__ import annotations

import csv
import logging
from pathlib import Path

import torch
from rich.progress import track

from medx.data.io import IMAGE_SUFFIXES, read_gray
from medx.errors import DataError, MedxError
from medx.models.quality import QualityBaseline
from medx.quality.features import image_features

log = logging.getLogger(__name__)


def find_images(folder: Path) -> list[Path]:
    """Image files anywhere under `folder` (class subfolders included), sorted."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder} is not a folder of images; check the path.")
    return sorted(
        p
        for p in folder.rglob("*")
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
    )


def load_baseline(checkpoint: Path) -> QualityBaseline:
    if not Path(checkpoint).is_file():
        raise DataError(f"Checkpoint {checkpoint} does not exist; pass a quality_logreg .ckpt.")
    try:
        model = QualityBaseline.load_from_checkpoint(checkpoint, map_location="cpu")
    except (KeyError, RuntimeError, TypeError) as err:
        raise DataError(
            f"{checkpoint} is not a quality baseline checkpoint (model=quality_logreg): {err}"
        ) from err
    return model.eval()


def score_folder(
    folder: Path, checkpoint: Path, out: Path, threshold: float = 0.5, progress: bool = True
) -> Path:
    """Write `out` (CSV): path, every feature, p_bad, verdict, error; return `out`."""
    model = load_baseline(checkpoint)
    paths = find_images(folder)
    if not paths:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
    names = model.feature_names
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    failed = 0
    with out.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", *names, "p_bad", "verdict", "error"])
        steps = track(paths, description="Scoring") if progress else paths
        for path in steps:
            try:
                values = image_features(read_gray(path))
            except MedxError as err:
                failed += 1
                message = str(err) if str(path) in str(err) else f"{path}: {err}"
                log.warning("%s", message)
                writer.writerow([path, *[""] * len(names), "", "", message])
                continue
            with torch.no_grad():
                logits = model(torch.as_tensor(values, dtype=torch.float32)[None])
            p_bad = float(torch.softmax(logits, 1)[0, 1])
            verdict = "bad" if p_bad >= threshold else "good"
            writer.writerow([path, *(f"{v:.6g}" for v in values), f"{p_bad:.4f}", verdict, ""])
    log.info("Scored %d images (%d failed) into %s", len(paths), failed, out)
    return out
