"""The binary decision: p(positive) at or above a threshold, with the threshold's scale and
where it came from.

The operating point is chosen on validation on the raw softmax (the card stores it with
`scale: "raw"`). Temperature scaling is monotonic, so the same point is mapped onto the scale
of the probabilities reported (`to_scale`), and the decision does not change with
calibration: a card's 0.0879 raw is 0.1031 on the calibrated scale of a model with T ≈ 1.08,
and both say which scale they are on.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any

from medx.errors import ConfigError
from medx.models.card import ModelCard, OperatingPoint, check_scale

__all__ = ["Decision", "DecisionRule", "check_threshold", "point_source", "to_scale"]

log = logging.getLogger(__name__)


def check_threshold(value: float, flag: str = "--threshold") -> float:
    """`value` if it is a probability (finite, 0 to 1), else a ConfigError naming `flag`.

    Args:
        value: the threshold given.
        flag: how the error names it (the command-line flag or config key).
    """
    try:
        number = float(value)
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number) or not 0.0 <= number <= 1.0:
        raise ConfigError(
            f"{flag} {value}: a threshold is a probability between 0 and 1 (e.g. {flag} 0.3)."
        )
    return number


def to_scale(threshold: float, source: str, target: str, temperature: float) -> float:
    """A threshold on p(positive) moved from the `source` scale to the `target` scale
    ("raw" softmax or "calibrated" by `temperature`); 0 and 1 stay where they are.

    Args:
        threshold: on the `source` scale.
        source: "raw" or "calibrated".
        target: "raw" or "calibrated".
        temperature: the card's temperature, which maps one scale onto the other.

    Example:
        >>> round(to_scale(0.0879, "raw", "calibrated", 1.08), 4)
        0.1028
    """
    check_scale(source)
    check_scale(target)
    if source == target or temperature == 1.0 or not 0.0 < threshold < 1.0:
        return threshold
    z = math.log(threshold / (1 - threshold))
    z = z / temperature if target == "calibrated" else z * temperature
    return 1.0 / (1.0 + math.exp(-z))


@dataclass(frozen=True)
class Decision:
    """One image's decision.

    Args:
        label: the class decided (`class` in JSON).
        threshold: the threshold it was decided at, on `scale`.
        scale: "raw" or "calibrated": the scale of the probabilities reported beside it.
        source: where the threshold came from ("val sensitivity 0.95, run ...", "site
            calibration 2025-06-01 on 200 images, sensitivity 0.95", "--threshold").
    """

    label: str
    threshold: float
    scale: str
    source: str

    def as_dict(self) -> dict[str, Any]:
        return {
            "class": self.label,
            "threshold": self.threshold,
            "scale": self.scale,
            "source": self.source,
        }


@dataclass(frozen=True)
class DecisionRule:
    """The rule a binary classifier decides by: `classes[1]` when p(classes[1]) >= threshold.

    Args:
        threshold: on `scale`, the scale of the probabilities it is compared with.
        scale: "raw" or "calibrated".
        source: where it came from.
        classes: (negative, positive) class names.
    """

    threshold: float
    scale: str
    source: str
    classes: tuple[str, str]

    def __call__(self, p_positive: float) -> Decision:
        label = self.classes[int(p_positive >= self.threshold)]
        return Decision(label, self.threshold, self.scale, self.source)

    def as_dict(self) -> dict[str, Any]:
        return {"threshold": self.threshold, "scale": self.scale, "source": self.source}

    @classmethod
    def of(
        cls,
        card: ModelCard,
        classes: list[str],
        scale: str,
        temperature: float,
        threshold: float | None = None,
        tta: bool = False,
    ) -> DecisionRule | None:
        """The rule for probabilities on `scale` (`temperature`: the card's, which maps one
        scale onto the other, whichever is reported): `threshold`
        when given (on that scale), else the card's operating point (TTA's own with `tta`),
        mapped onto it; None when neither exists (no decision is made up).

        Args:
            card: the model's typed card.
            classes: the class names (two).
            scale: the scale of the probabilities the rule is applied to.
            temperature: the card's temperature.
            threshold: a threshold on `scale` that replaces the card's (`--threshold`).
            tta: the probabilities are TTA-averaged: use `operating_point_tta`.
        """
        pair = (classes[0], classes[1])
        if threshold is not None:
            return cls(check_threshold(threshold), scale, "--threshold", pair)
        point = card.operating_point_for(tta)
        if tta and point is None and card.operating_point is not None:
            log.warning(
                "--tta: the checkpoint has no operating point chosen on validation with "
                "TTA on; using the plain one (evaluate with eval.tta=true to choose one)."
            )
            point = card.operating_point
        if point is None:
            return None
        if tta and point.tta and _site(card.operating_point):
            log.warning(
                "--tta: the operating point was re-chosen by site calibration without TTA; "
                "TTA's own is still the one chosen on validation (%s).",
                point_source(point, card.run.get("id", "")),
            )
        source = point_source(point, card.run.get("id", ""))
        value = to_scale(point.threshold, point.scale, scale, temperature)
        return cls(value, scale, source, pair)


def point_source(point: OperatingPoint, run: str = "") -> str:
    """Where an operating point came from, as every front door says it: "val sensitivity
    0.95, run ..." for the training run's choice on validation, "site calibration
    2025-06-01 on 200 images, sensitivity 0.95" for one re-chosen by `medx.calibrate`."""
    if _site(point):
        provenance = point.provenance or {}
        date = str(provenance.get("date") or "")[:10]
        images = provenance.get("images")
        return (
            "site calibration"
            + (f" {date}" if date else "")
            + (f" on {images} images" if images else "")
            + f", sensitivity {point.target_sensitivity}"
        )
    return (
        f"val sensitivity {point.target_sensitivity}"
        + (" with TTA" if point.tta else "")
        + (f", run {run}" if run else "")
    )


def _site(point: OperatingPoint | None) -> bool:
    return point is not None and point.chosen_on == "site"
