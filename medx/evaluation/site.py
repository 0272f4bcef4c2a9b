"""Site calibration: a model's operating point and temperature re-chosen on a site's sample.

A threshold chosen on the training site's validation images does not hold at another site
(Kermany: sensitivity 0.95 on val, specificity 0.78 on the later test set, 0.82 at the best
threshold in hindsight). Given a labelled sample of the new site, the threshold is chosen
again for the same target sensitivity (the highest threshold reaching it, as on val), and the
temperature refitted by NLL. Both numbers come with their uncertainty:

- the threshold's 95% interval: the threshold chosen on each bootstrap resample;
- sensitivity and specificity on *new* images of the site: on each resample the threshold is
  chosen, then applied to the images the resample left out (out-of-bag, about 37%), so the
  interval says what the site will see, not how well the threshold fits its own sample.

Below `RECOMMENDED_PER_CLASS` images of a class the intervals are wide: a warning says so;
below `MIN_PER_CLASS` the command refuses. The card keeps the replaced operating point
(`previous_operating_points`) and records the new one's provenance.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from medx.errors import DataError
from medx.evaluation import calibration, metrics

log = logging.getLogger(__name__)

MIN_PER_CLASS = 10  # refused below: no threshold or temperature worth the name
RECOMMENDED_PER_CLASS = 50  # warned below: the sensitivity interval is wider than ±0.06


@dataclass
class SiteCalibration:
    """What a site's sample gives: the new threshold (raw softmax scale) and temperature,
    with 95% intervals. `sensitivity_ci` / `specificity_ci` are out-of-bag (new images)."""

    threshold: float
    target_sensitivity: float
    temperature: float
    images: int
    positives: int
    threshold_ci: tuple[float, float]
    sensitivity_ci: tuple[float, float]
    specificity_ci: tuple[float, float]
    sensitivity: float  # on the sample itself, at the new threshold (in-sample)
    specificity: float


def check_sample(labels: np.ndarray, class_names: Sequence[str], source: str) -> list[str]:
    """DataError for a sample unfit to calibrate on; warnings for a small one."""
    counts = np.bincount(np.asarray(labels, int), minlength=len(class_names))
    absent = [name for name, n in zip(class_names, counts, strict=True) if n == 0]
    if absent:
        raise DataError(
            f"{source} has no image of class {', '.join(absent)}: site calibration needs both "
            "classes (a threshold sets the balance between them); add labelled images of it."
        )
    few = {name: int(n) for name, n in zip(class_names, counts, strict=True) if n < MIN_PER_CLASS}
    if few:
        raise DataError(
            f"{source} has too few images ({', '.join(f'{k}: {v}' for k, v in few.items())}; "
            f"at least {MIN_PER_CLASS} of each class, {RECOMMENDED_PER_CLASS} recommended)."
        )
    return [
        f"only {n} {name} images: the intervals are wide (recommended: "
        f"{RECOMMENDED_PER_CLASS} of each class)"
        for name, n in zip(class_names, counts, strict=True)
        if n < RECOMMENDED_PER_CLASS
    ]


def recalibrate(
    logits: np.ndarray,
    labels: np.ndarray,
    target_sensitivity: float,
    n_boot: int = 1000,
    seed: int = 0,
) -> SiteCalibration:
    """Threshold for `target_sensitivity` and temperature on a binary sample, with intervals.

    Args:
        logits: N x 2 logits of the site's images (raw: no temperature applied).
        labels: their class indices (1: positive).
        target_sensitivity: the sensitivity the new threshold must reach.
        n_boot: bootstrap resamples for the intervals.
        seed: of the bootstrap.
    """
    logits, labels = np.asarray(logits, np.float64), np.asarray(labels, int)
    scores = calibration.softmax(logits)[:, 1]
    threshold = metrics.threshold_for_sensitivity(labels, scores, target_sensitivity)
    in_sample = metrics.rates(labels, (scores >= threshold).astype(int), 2)
    rng = np.random.default_rng(seed)
    n = len(labels)
    thresholds, sens, spec = [], [], []
    for _ in range(n_boot):
        drawn = rng.integers(0, n, n)
        left = np.setdiff1d(np.arange(n), drawn)
        if labels[drawn].min() == labels[drawn].max() or not len(left):
            continue
        t = metrics.threshold_for_sensitivity(labels[drawn], scores[drawn], target_sensitivity)
        thresholds.append(t)
        out = metrics.rates(labels[left], (scores[left] >= t).astype(int), 2)
        sens.append(out["sensitivity"][0])
        spec.append(out["specificity"][0])
    return SiteCalibration(
        threshold=threshold,
        target_sensitivity=float(target_sensitivity),
        temperature=calibration.fit_temperature(logits, labels),
        images=n,
        positives=int(labels.sum()),
        threshold_ci=_interval(thresholds),
        sensitivity_ci=_interval(sens),
        specificity_ci=_interval(spec),
        sensitivity=float(in_sample["sensitivity"][0]),
        specificity=float(in_sample["specificity"][0]),
    )


def _interval(values: Sequence[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    v = v[np.isfinite(v)]
    if not len(v):
        return (float("nan"), float("nan"))
    low, high = np.percentile(v, [2.5, 97.5])
    return (float(low), float(high))


def card_entries(
    card: Mapping[str, Any], found: SiteCalibration, provenance: Mapping[str, Any]
) -> dict[str, Any]:
    """The card entries a site calibration writes: `operating_point` (new, with its
    provenance), `previous_operating_points` (the replaced one appended), `calibration`
    (the new temperature, its provenance and the previous temperature).

    Args:
        card: the model's current card.
        found: what `recalibrate` found.
        provenance: where the sample came from (source, class counts, data digest, model,
            the site's shift test); the date and sample size are added here.
    """
    date = datetime.now(UTC).isoformat(timespec="seconds")
    common = {**dict(provenance), "date": date, "images": found.images}
    previous = list(deepcopy(card.get("previous_operating_points") or []))
    old = card.get("operating_point")
    if old:
        previous.append({**deepcopy(dict(old)), "replaced": date})
    old_calibration = dict(card.get("calibration") or {})
    return {
        "operating_point": {
            "threshold": found.threshold,
            "target_sensitivity": found.target_sensitivity,
            "chosen_on": "site",
            "tta": False,
            "scale": "raw",
            "provenance": {
                **common,
                "threshold_ci": list(found.threshold_ci),
                "sensitivity_ci": list(found.sensitivity_ci),
                "specificity_ci": list(found.specificity_ci),
                "ci": "95% bootstrap; sensitivity/specificity out-of-bag (new images)",
            },
        },
        "previous_operating_points": previous,
        "calibration": {
            "temperature": found.temperature,
            "fitted_on": "site",
            "provenance": {**common, "previous_temperature": old_calibration.get("temperature")},
        },
    }
