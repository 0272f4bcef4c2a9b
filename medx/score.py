"""Screen a folder of images with a trained quality model: one CSV row per image.

Why: before training on a new data set, find the blurred, noisy, burnt-out or over-compressed
images. The CSV holds every feature (so a threshold can be revisited without rescoring), the
probability that the image is bad, and an error message for files that cannot be scored.

Either model of the `data=quality` sweep scores: the feature baseline (`model=quality_logreg`)
from the features, or a CNN (`ClassificationModule`) from the image, put through the eval
transform of the run's own data module (size and normalisation as in validation and test).
"""

from __future__ import annotations

import csv
import logging
import pickle
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from rich.progress import track

from medx.data.io import IMAGE_SUFFIXES, read_gray
from medx.errors import DataError, MedxError
from medx.quality.features import FEATURES, image_features

log = logging.getLogger(__name__)

# p_bad of one image from its gray uint8 pixels and its feature vector
Scorer = Callable[[np.ndarray, np.ndarray], float]


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


def load_scorer(checkpoint: Path, config: Path | None = None) -> Scorer:
    """The scorer of a quality checkpoint: the baseline's or a CNN's, told by its backbone.

    `config` (CNN only): the training run's config.yaml; by default the one next to
    `checkpoints/`, where medx.train writes it.
    """
    from medx.models.quality import BASELINES  # torch-heavy imports only once needed

    checkpoint = Path(checkpoint)
    if not checkpoint.is_file():
        raise DataError(f"Checkpoint {checkpoint} does not exist; pass a data=quality .ckpt.")
    try:
        hparams = torch.load(checkpoint, map_location="cpu", weights_only=False)["hyper_parameters"]
        backbone = hparams["backbone"]
    except (OSError, RuntimeError, KeyError, TypeError, pickle.UnpicklingError) as err:
        raise DataError(
            f"{checkpoint} is no medx checkpoint (no hyper-parameters with a backbone): {err}"
        ) from err
    if backbone in BASELINES:
        return _baseline_scorer(checkpoint)
    return _cnn_scorer(checkpoint, config or checkpoint.resolve().parent.parent / "config.yaml")


def _baseline_scorer(checkpoint: Path) -> Scorer:
    from medx.models.quality import QualityBaseline

    model = QualityBaseline.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    if list(model.feature_names) != list(FEATURES):
        raise DataError(
            f"{checkpoint} was trained on features {model.feature_names}; this medx computes "
            f"{list(FEATURES)}. Retrain the baseline (model=quality_logreg)."
        )

    def score(gray: np.ndarray, features: np.ndarray) -> float:
        return _p_bad(model, torch.as_tensor(features, dtype=torch.float32)[None])

    return score


def _cnn_scorer(checkpoint: Path, config: Path) -> Scorer:
    from medx.data.quality import QualityDataModule
    from medx.models.classifier import ClassificationModule

    if not config.is_file():
        raise DataError(
            f"{config} not found: a CNN checkpoint is scored with its run's data settings "
            "(image size) from the run's config.yaml; pass --config PATH."
        )
    data = OmegaConf.load(config).data
    if data.get("_target_") != f"{QualityDataModule.__module__}.{QualityDataModule.__name__}":
        raise DataError(
            f"{checkpoint} was trained on data={data.get('name')} ({config}); the score command "
            "needs a model trained with data=quality (classes good, bad)."
        )
    model = ClassificationModule.load_from_checkpoint(checkpoint, map_location="cpu").eval()
    datamodule = instantiate(data)
    datamodule.mean, datamodule.std = model.mean, model.std  # as medx.train sets them
    transform = datamodule.eval_transform()

    def score(gray: np.ndarray, features: np.ndarray) -> float:
        return _p_bad(model, transform(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))[None])

    return score


@torch.inference_mode()
def _p_bad(model: torch.nn.Module, x: torch.Tensor) -> float:
    return float(torch.softmax(model(x).float(), 1)[0, 1])


def score_folder(
    folder: Path,
    checkpoint: Path,
    out: Path,
    threshold: float = 0.5,
    progress: bool = True,
    config: Path | None = None,
) -> Path:
    """Write `out` (CSV): path, every feature, p_bad, verdict, error; return `out`."""
    scorer = load_scorer(checkpoint, config)
    paths = find_images(folder)
    if not paths:
        raise DataError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
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
