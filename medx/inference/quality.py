"""The quality gate: a `data=quality` model scores each image before it is classified.

Either model of the quality sweep works, told by its card: the feature baseline
(`model=quality_logreg`) from the handcrafted features of the gray image, or a CNN from the
gray image repeated into 3 channels at the size it was trained at, exactly as the quality data
module fed it in training. Images are judged as they are (no intensity step): blur, noise and
burnt-out exposure are what the gate looks for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from medx.errors import ConfigError, DataError
from medx.inference.decision import check_threshold
from medx.inference.opening import checked_card, open_model, warn_if_synthetic
from medx.inference.reading import ModelInput

__all__ = ["QC_MODES", "Quality", "QualityGate"]

QC_MODES = ("flag", "refuse")
CLASSES = ["good", "bad"]


@dataclass(frozen=True)
class Quality:
    """One image's quality verdict.

    Args:
        verdict: "good" or "bad" (p_bad at or above the threshold).
        p_bad: the quality model's probability that the image is bad.
        threshold: the gate's threshold on p_bad (raw softmax).
        refused: the gate refused the image (mode "refuse" and a bad verdict): it was not
            classified.
        reason: why it was refused, for a person.
    """

    verdict: str
    p_bad: float
    threshold: float
    refused: bool = False
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "verdict": self.verdict,
            "p_bad": self.p_bad,
            "threshold": self.threshold,
            "refused": self.refused,
            "reason": self.reason,
        }


class QualityGate:
    """A quality model and how its verdict is used.

    Args:
        model: an opened `data=quality` model (`open_model`).
        threshold: p_bad at or above which an image is bad (default: the model's operating
            point, else 0.5).
        mode: "flag" (say so, classify anyway) or "refuse" (do not classify a bad image).
        source: how messages name the model (its path or URI).
    """

    def __init__(
        self, model: Any, threshold: float | None = None, mode: str = "flag", source: str = ""
    ) -> None:
        source = source or str(model.card.get("checkpoint", "the quality model"))
        card = checked_card(model, source)
        if card.task != "classification" or card.class_names != CLASSES:
            raise DataError(
                f"{source} was trained on data={card.data.get('name')} (classes "
                f"{card.class_names}); a quality gate needs a model trained with data=quality "
                "(classes good, bad)."
            )
        if mode not in QC_MODES:
            raise ConfigError(f"--qc-mode {mode!r}: choose one of {', '.join(QC_MODES)}.")
        if model.inputs == "features":
            from medx.quality.features import FEATURES

            if list(model.feature_names) != list(FEATURES):
                raise DataError(
                    f"{source} was trained on features {model.feature_names}; this medx "
                    f"computes {list(FEATURES)}. Retrain the baseline (model=quality_logreg)."
                )
        if threshold is None:
            point = card.operating_point
            threshold = point.threshold if point is not None else 0.5
        self.model, self.card, self.mode, self.source = model, card, mode, source
        self.threshold = check_threshold(threshold, "--qc-threshold")
        self.model_input = ModelInput(model.inputs, card.image_size)

    @classmethod
    def from_checkpoint(
        cls, source: str | Path, threshold: float | None = None, mode: str = "flag"
    ) -> QualityGate:
        """Open a quality model (a checkpoint, `models:/` URI or .onnx) as a gate.

        Args:
            source: a `data=quality` model: the feature baseline or a CNN.
            threshold: see `QualityGate`.
            mode: "flag" or "refuse".
        """
        return cls(open_model(source), threshold, mode, str(source))

    def p_bad(self, image: np.ndarray) -> float:
        """The probability that an HxWx3 uint8 RGB image (decoded as is) is bad.

        Args:
            image: the pixels without the classifier's intensity step (`read(source)`).
        """
        warn_if_synthetic(self.card, self.source)
        gray = cv2.cvtColor(image, cv2.COLOR_RGB2GRAY)
        x = self.model_input(cv2.cvtColor(gray, cv2.COLOR_GRAY2RGB))[None]
        with torch.inference_mode():
            return float(torch.softmax(self.model(x).float(), 1)[0, 1])

    def features(self, image: np.ndarray) -> np.ndarray:
        """The handcrafted quality features (`medx.quality.features.FEATURES`) of the gray
        image, whichever model judges: what a screening report lists beside p_bad."""
        from medx.quality.features import image_features

        return image_features(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY))

    def judge(self, image: np.ndarray) -> Quality:
        """The verdict on one image (see `Quality`).

        Args:
            image: HxWx3 uint8 RGB pixels, decoded as they are.
        """
        p = self.p_bad(image)
        bad = p >= self.threshold
        refused = bad and self.mode == "refuse"
        reason = None
        if refused:
            reason = f"refused: image quality p_bad {p:.3f} >= {self.threshold:.3f}"
        verdict = "bad" if bad else "good"
        return Quality(verdict, p, self.threshold, refused, reason)
