"""The shift monitor: are the images a model is given now like those it was validated on?

A trained classifier carries a `shift_reference` on its card (written by the clinical
evaluation after training, or by `medx.eval` for an older checkpoint): its validation images
in its own feature space. `ShiftMonitor` compares new images with it, in two ways:

- for a set of images (a folder given to `medx.predict`, or the rolling window of the last
  requests of `medx.serve`, its `/drift`): a two-sample test, p-value, verdict and effect size
  (`ShiftReport`);
- for each image: an out-of-distribution score and a flag (above the 99th percentile of
  held-out validation images).

The statistics, and why a small MMD permutation test of our own rather than a drift library,
are in `medx.evaluation.drift`. The false-alarm rate on in-distribution batches and the power
against simulated acquisition shifts are measured by `benchmarks/shift.py`.

Usage, given a model's features (`module.embed(x)`, the core's Predictor) and scores:

    monitor = ShiftMonitor.from_card(card)        # ShiftUnavailable: one line, how to add one
    report = monitor.test(features, scores)       # a folder: report.summary(), .to_dict()
    scores, flags = monitor.ood(features)         # per image
    monitor.observe(features, scores); monitor.window()   # a service: the last `window` images
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medx.data.shifted import ShiftedImages
from medx.errors import MedxError
from medx.evaluation.drift import PERMUTATIONS, SIGNIFICANCE, ShiftReference, ShiftReport
from medx.evaluation.stress import features_and_probs

__all__ = ["ShiftMonitor", "ShiftReference", "ShiftReport", "ShiftUnavailable", "folder_features"]

WINDOW = 200  # recent requests a service tests
MIN_IMAGES = 30  # below this a window is still collecting: too few for a useful test


class ShiftUnavailable(MedxError):
    """The model carries no (readable) shift reference."""


def unavailable_reason(card: Any, model: str = "this model") -> str | None:
    """Why the card gives no monitor (one line saying how to add one), or None if it does."""
    entry = _entry(card, "shift_reference")
    if entry:
        try:
            ShiftReference.from_dict(entry)
        except (KeyError, ValueError, TypeError) as err:
            return f"{model}: its shift reference cannot be read ({err}); {_ADD.format(model)}"
        return None
    task = _entry(card, "module") or ""
    if task and not task.endswith("ClassificationModule"):
        return f"{model} is no image classifier: the shift monitor is for classifiers only."
    return f"{model} has no shift reference, so the shift monitor is off; {_ADD.format(model)}"


_ADD = (
    "add one with `python -m medx.eval ckpt_path={0}` (it evaluates the model on its "
    "validation data and writes the reference into the checkpoint)"
)


class ShiftMonitor:
    """Two-sample test and per-image OOD score against a model's validation reference.

    Args:
        reference: the model's `ShiftReference`.
        window: how many recent images `observe` keeps for `window()` (a service's /drift).
        min_images: fewer images than this in the window: `window()` says it is collecting.
        significance: the alarm level of the verdict.
        permutations: permutations of the test (its p-value resolution is 1 / (1 + this)).
    """

    def __init__(
        self,
        reference: ShiftReference,
        window: int = WINDOW,
        min_images: int = MIN_IMAGES,
        significance: float = SIGNIFICANCE,
        permutations: int = PERMUTATIONS,
    ) -> None:
        self.reference, self.significance, self.permutations = reference, significance, permutations
        self.min_images = min_images
        self._features: deque[np.ndarray] = deque(maxlen=window)
        self._scores: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self.seen = 0

    @classmethod
    def from_card(cls, card: Any, model: str = "this model", **options: Any) -> ShiftMonitor:
        """The monitor of a model card (dict or typed card); ShiftUnavailable says why not."""
        reason = unavailable_reason(card, model)
        if reason:
            raise ShiftUnavailable(reason)
        return cls(ShiftReference.from_dict(_entry(card, "shift_reference")), **options)

    def ood(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per image: (OOD score, flag). About 1 for a typical validation image."""
        return self.reference.ood(np.atleast_2d(features))

    def test(self, features: np.ndarray, scores: Sequence[float] | None = None) -> ShiftReport:
        """The two-sample test of these images (features (n, D), the model's scores (n,))."""
        return self.reference.test(
            np.atleast_2d(features), scores, self.significance, self.permutations
        )

    def observe(self, features: np.ndarray, scores: Sequence[float]) -> None:
        """Add served images to the rolling window (thread-safe)."""
        with self._lock:
            for f, s in zip(np.atleast_2d(features), scores, strict=True):
                self._features.append(np.asarray(f, np.float32))
                self._scores.append(float(s))
                self.seen += 1

    def window(self) -> dict[str, Any]:
        """The test over the window of recent images, as JSON: `status` is `collecting`
        (fewer than `min_images`) or `tested`, with the report's fields when tested."""
        with self._lock:
            feats, scores = np.array(self._features), np.array(self._scores)
        found: dict[str, Any] = {
            "window": self._features.maxlen,
            "images": len(feats),
            "seen": self.seen,
            "min_images": self.min_images,
        }
        if len(feats) < self.min_images:
            return {**found, "status": "collecting"}
        return {**found, "status": "tested", **self.test(feats, scores).to_dict()}


def folder_features(
    module: torch.nn.Module,
    paths: Sequence[Path],
    image_size: int,
    intensity: str = "none",
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray]:
    """(features, probabilities) of image files, read as `medx.predict` reads them, for a
    model with `embed` (`ClassificationModule`). The core's Predictor will supply these."""
    feats, probs = features_and_probs(
        module, ShiftedImages(paths, None, image_size, intensity), batch_size
    )
    if feats is None:
        raise ShiftUnavailable(f"{type(module).__name__} has no feature space (`embed`).")
    return feats, probs


def _entry(card: Any, key: str) -> Any:
    """A card entry from a plain dict or a typed card."""
    if isinstance(card, Mapping):
        return card.get(key)
    return getattr(card, key, None)
