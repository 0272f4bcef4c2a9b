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

`Predictor` (`medx.inference.predictor`) runs it: with a reference it computes each image's
features and logits in one pass (`embed`), gives every prediction its `ood_score` and
`ood_flag`, collects a folder's images while `stream` yields them (`ShiftSample`) and keeps a
service's window. What it compares is the model's raw softmax score without TTA, as the
reference was built. An ONNX export outputs logits only, so it has no monitor
(`monitor_for` says so); its checkpoint has.

Usage, given a model's features (`module.embed(x)`) and scores:

    monitor = ShiftMonitor.from_card(card)        # ShiftUnavailable: one line, how to add one
    report = monitor.test(features, scores)       # a set: report.summary(), .to_dict()
    scores, flags = monitor.ood(features)         # per image
    monitor.observe(features, scores); monitor.window()   # a service: the last `window` images
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from medx.errors import MedxError
from medx.evaluation.drift import PERMUTATIONS, SIGNIFICANCE, ShiftReference, ShiftReport
from medx.inference.onnx_model import OnnxModel

__all__ = [
    "ShiftMonitor",
    "ShiftReference",
    "ShiftReport",
    "ShiftSample",
    "ShiftUnavailable",
    "monitor_for",
    "unavailable_reason",
]

WINDOW = 200  # recent requests a service tests
MIN_IMAGES = 30  # below this a window is still collecting: too few for a useful test


class ShiftUnavailable(MedxError):
    """The model carries no (readable) shift reference."""


def unavailable_reason(card: Any, model: str = "this model") -> str | None:
    """Why the card gives no monitor (one line saying how to add one), or None if it does."""
    return _read_reference(card, model)[1]


def _read_reference(card: Any, model: str) -> tuple[ShiftReference | None, str | None]:
    """(the card's shift reference, None), or (None, why there is none), decoded once."""
    entry = _entry(card, "shift_reference")
    if entry:
        try:
            return ShiftReference.from_dict(entry), None
        except (KeyError, ValueError, TypeError) as err:
            return (
                None,
                f"{model}: its shift reference cannot be read ({err}); {_ADD.format(model)}",
            )
    task = _entry(card, "module") or ""
    if task and not task.endswith("ClassificationModule"):
        return None, f"{model} is no image classifier: the shift monitor is for classifiers only."
    return (
        None,
        f"{model} has no shift reference, so the shift monitor is off; {_ADD.format(model)}",
    )


_ADD = (
    "add one with `python -m medx.eval ckpt_path={0}` (it evaluates the model on its "
    "validation data and writes the reference into the checkpoint)"
)


class ShiftMonitor:
    """Two-sample test and per-image OOD score against a model's validation reference.

    Args:
        reference: the model's `ShiftReference`.
        window: how many recent images `observe` keeps for `window()` (a service's /drift).
        min_images: fewer images than this in the window: `window()` says it is collecting
            (at most `window`).
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
        if window < 2:
            raise ValueError(f"a shift window of {window} images: the test needs at least 2")
        self.reference, self.significance, self.permutations = reference, significance, permutations
        self.min_images = max(2, min(min_images, window))
        self._features: deque[np.ndarray] = deque(maxlen=window)
        self._scores: deque[float] = deque(maxlen=window)
        self._lock = threading.Lock()
        self._tested: tuple[int, dict[str, Any]] | None = None  # (seen, window()) last tested
        self.seen = 0

    @classmethod
    def from_card(cls, card: Any, model: str = "this model", **options: Any) -> ShiftMonitor:
        """The monitor of a model card (dict or typed card); ShiftUnavailable says why not.

        Args:
            card: the model's card (`model.card`).
            model: how the reason names the model.
            **options: `ShiftMonitor` arguments (window, min_images, significance, ...).
        """
        reference, reason = _read_reference(card, model)
        if reference is None:
            raise ShiftUnavailable(reason)
        return cls(reference, **options)

    def ood(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per image: (OOD score, flag). About 1 for a typical validation image.

        Args:
            features: penultimate-layer features (n, D) (`ClassificationModule.embed`).
        """
        return self.reference.ood(np.atleast_2d(features))

    def test(self, features: np.ndarray, scores: Sequence[float] | None = None) -> ShiftReport:
        """The two-sample test of these images (features (n, D), the model's scores (n,)).

        Args:
            features: penultimate-layer features (n, D) of at least 2 images.
            scores: the model's raw p(positive) of each (the top probability for more than
                two classes), without TTA; None: the feature test alone.
        """
        return self.reference.test(
            np.atleast_2d(features), scores, self.significance, self.permutations
        )

    def sample(self) -> ShiftSample:
        """An empty set of images to collect (a folder, as `Predictor.stream` yields it)."""
        return ShiftSample(self)

    def observe(self, features: np.ndarray, scores: Sequence[float]) -> None:
        """Add served images to the rolling window (thread-safe).

        Args:
            features: penultimate-layer features (n, D).
            scores: the model's raw score of each image, as for `test`.
        """
        with self._lock:
            for f, s in zip(np.atleast_2d(features), scores, strict=True):
                self._features.append(np.asarray(f, np.float32))
                self._scores.append(float(s))
                self.seen += 1

    def window(self) -> dict[str, Any]:
        """The test over the window of recent images, as JSON: `status` is `collecting`
        (fewer than `min_images`) or `tested`, with the report's fields when tested
        (thread-safe; tested once per state of the window, then answered from memory)."""
        with self._lock:
            feats, scores, seen = np.array(self._features), np.array(self._scores), self.seen
            if self._tested is not None and self._tested[0] == seen:
                return dict(self._tested[1])
        found: dict[str, Any] = {
            "window": self._features.maxlen,
            "images": len(feats),
            "seen": seen,
            "min_images": self.min_images,
        }
        if len(feats) < self.min_images:
            return {**found, "status": "collecting"}
        found = {**found, "status": "tested", **self.test(feats, scores).to_dict()}
        with self._lock:
            self._tested = (seen, found)
        return dict(found)


class ShiftSample:
    """The images of one set (a folder) for one test, collected as they stream past: each
    kept as its reference coordinates and score (k + 2 numbers, so a folder of 50,000 images
    costs a few MB, not its 512-D features).

    Args:
        monitor: the model's monitor (its reference, alarm level and permutations).
    """

    def __init__(self, monitor: ShiftMonitor) -> None:
        self.monitor = monitor
        self._coordinates: list[np.ndarray] = []
        self._scores: list[np.ndarray] = []

    @property
    def images(self) -> int:
        """How many images have been added."""
        return sum(len(c) for c in self._coordinates)

    def add(self, features: np.ndarray, scores: Sequence[float]) -> None:
        """Add images: their features (n, D) and the model's scores (n,).

        Args:
            features: penultimate-layer features (n, D).
            scores: the model's raw score of each image, as for `ShiftMonitor.test`.
        """
        features = np.atleast_2d(np.asarray(features))
        if features.size:
            self._coordinates.append(self.monitor.reference.coordinates(features))
            self._scores.append(np.asarray(scores, np.float64).reshape(-1))

    def report(self) -> ShiftReport | None:
        """The two-sample test of the images added; None below 2 (a set test needs a set)."""
        if self.images < 2:
            return None
        monitor = self.monitor
        return monitor.reference.test_coordinates(
            np.vstack(self._coordinates),
            np.concatenate(self._scores),
            monitor.significance,
            monitor.permutations,
        )


def monitor_for(
    model: Any, source: str = "this model", **options: Any
) -> tuple[ShiftMonitor | None, str | None]:
    """The shift monitor of an opened model, or None and why not (one line saying what to do).

    Args:
        model: an opened model (`open_model`: a medx module or an `OnnxModel`).
        source: how the reason names the model.
        options: `ShiftMonitor` options (window, min_images, ...).
    """
    if isinstance(model, OnnxModel):
        return None, (
            f"{source} is an ONNX export, which outputs the logits alone: the shift monitor "
            "(per-image ood_score, the test of a set) needs the model's features; give the "
            "checkpoint (.ckpt) it was exported from."
        )
    if not callable(getattr(model, "embed", None)):
        return None, (
            f"{source} ({type(model).__name__}) has no feature space: the shift monitor is for "
            "single image classifiers (ClassificationModule)."
        )
    try:
        return ShiftMonitor.from_card(model.card, source, **options), None
    except ShiftUnavailable as err:
        return None, str(err)


def _entry(card: Any, key: str) -> Any:
    """A card entry from a plain dict or a typed card."""
    if isinstance(card, Mapping):
        return card.get(key)
    return getattr(card, key, None)
