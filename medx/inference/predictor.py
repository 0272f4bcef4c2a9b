"""Classification: from images to calibrated probabilities, a decision, and explanations.

`Predictor` holds a classifier (a checkpoint, a registered model or an ONNX export) and how it
is to be used: calibrated or raw probabilities, the decision threshold, test-time
augmentation, a quality gate, a lung segmenter for the lungs check, and Grad-CAM. Every step
is here once: reading (`medx.inference.reading`), the quality verdict (`QualityGate`), the
probabilities (softmax of the logits over the card's temperature; TTA averages views in
probability, `medx.evaluation.tta`), the decision at the operating point (`DecisionRule`),
Grad-CAM (`medx.evaluation.explain`) of the class reported, the share of its mass inside the
lungs (`Segmenter`), and the overlay drawn on the image as it is, at its own size.

With a shift reference on the card (`medx.inference.shift`) the same forward pass also gives
each image's penultimate features (`embed`): every prediction gets its out-of-distribution
score and flag, `stream` collects a folder's images for a two-sample test of the whole set
(`PredictionStream.shift_report`), and a service keeps a window of its recent requests
(`observe`, `drift`). Without one (an older checkpoint, an ONNX export) the predictor says
once why the monitor is off and how to add it, and predicts all the same.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from medx.errors import ConfigError, DataError, MedxError
from medx.evaluation.drift import reference_scores
from medx.inference.decision import Decision, DecisionRule
from medx.inference.opening import (
    backend_of,
    checked_card,
    device_of,
    open_model,
    warn_if_synthetic,
)
from medx.inference.quality import Quality, QualityGate
from medx.inference.reading import (
    MAX_PIXELS,
    Item,
    ModelInput,
    Source,
    as_items,
    describe,
    file_batches,
)
from medx.inference.segmenter import Segmenter
from medx.inference.shift import WINDOW, ShiftMonitor, ShiftReport, monitor_for

__all__ = ["LUNG_SHARE_ALARM", "Prediction", "PredictionStream", "Predictor", "Prepared"]

log = logging.getLogger(__name__)

LUNG_SHARE_ALARM = 0.5  # less Grad-CAM mass than this inside the lungs: flagged as a shortcut
_SAID: set[str] = set()  # models whose missing shift monitor this process has told of
_OFF = "the shift monitor was turned off"


@dataclass
class Prediction:
    """One image's answer.

    Args:
        source: the input, as named (its path, an upload's name, a DataFrame row).
        model: the id of the model that answered (`NAME@RUN`).
        probabilities: per class, calibrated unless asked otherwise (None: not classified,
            because the image failed or the quality gate refused it).
        predicted: the most probable class.
        decision: a binary model's decision at its threshold (None: no threshold known).
        temperature: the temperature the probabilities were divided by (1.0: raw).
        scale: the probabilities' scale, "calibrated" or "raw".
        quality: the quality gate's verdict (None without a gate).
        gradcam: the Grad-CAM map of the class reported, hxw in [0, 1] at the model's input
            size (None unless asked for, or the lungs check needed it).
        overlay: that map over the image as it is, HxWx3 uint8 RGB at the image's size, with
            the lung outline when the lungs were checked (None unless Grad-CAM was asked for).
        cam_in_lungs: the share of the Grad-CAM mass inside the lung mask (lungs check).
        shortcut_alarm: cam_in_lungs below LUNG_SHARE_ALARM: the model looks elsewhere.
        size: the image's (width, height).
        error: why the input could not be predicted ("" when it was).
        ood_score: the shift monitor's out-of-distribution score (about 1 for a typical
            validation image; None without a shift reference, or not classified).
        ood_flag: `ood_score` above the 99th percentile of held-out validation images.
        features: the penultimate-layer features the monitor compared (with a reference).
        raw_score: what the reference keeps of each image: p(positive), raw softmax and
            without TTA (the top probability for more than two classes).
    """

    source: str
    model: str
    probabilities: dict[str, float] | None = None
    predicted: str | None = None
    decision: Decision | None = None
    temperature: float = 1.0
    scale: str = "raw"
    quality: Quality | None = None
    gradcam: np.ndarray | None = None
    overlay: np.ndarray | None = None
    cam_in_lungs: float | None = None
    shortcut_alarm: bool | None = None
    size: tuple[int, int] | None = None
    error: str = ""
    ood_score: float | None = None
    ood_flag: bool | None = None
    features: np.ndarray | None = field(default=None, repr=False)
    raw_score: float | None = field(default=None, repr=False)

    @property
    def ok(self) -> bool:
        """The image was read (and, unless the gate refused it, classified)."""
        return not self.error


@dataclass
class Prepared:
    """An input decoded for a predictor, outside any lock (see `Predictor.prepare`)."""

    item: Item
    x: torch.Tensor | None


class Predictor:
    """A classifier and how to use it (see the module docstring).

    Args:
        model: an opened classifier (`open_model`: checkpoint, `models:/` URI or .onnx).
        calibrated: divide the logits by the card's temperature (False: raw softmax).
        threshold: the decision threshold on the reported scale (default: the card's
            operating point, mapped onto that scale).
        tta: test-time augmentation (and the operating point chosen with it).
        quality: a quality gate judging each image first.
        lungs: a lung segmenter: the share of Grad-CAM inside its mask (shortcut alarm).
        gradcam: compute Grad-CAM and its overlay for every image (PyTorch models only).
        gradcam_layer: Grad-CAM's target layer (default: by backbone family).
        gradcam_class: the class explained, by name or index (default: the predicted one).
        max_pixels: larger images are refused before decoding.
        source: how messages name the model.
        monitor: the shift monitor, when the card has a reference (False: off; or a
            `ShiftMonitor` to share, e.g. its window).
        window: recent images a service's monitor tests (`observe`, `drift`).

    Example:
        >>> predictor = Predictor.from_checkpoint("models:/pneumonia@champion")
        >>> (answer,) = predictor.predict(["chest.dcm"])
        >>> answer.probabilities, answer.decision
    """

    def __init__(
        self,
        model: Any,
        calibrated: bool = True,
        threshold: float | None = None,
        tta: bool = False,
        quality: QualityGate | None = None,
        lungs: Segmenter | None = None,
        gradcam: bool = False,
        gradcam_layer: str | None = None,
        gradcam_class: str | int | None = None,
        max_pixels: int = MAX_PIXELS,
        source: str = "",
        monitor: bool | ShiftMonitor = True,
        window: int = WINDOW,
    ) -> None:
        source = source or str(model.card.get("checkpoint", "model"))
        task = model.card.get("task") or getattr(model, "task", None)
        if task != "classification":
            raise DataError(
                f"{source} is a {task} model, not a classifier: masks come from "
                "medx.inference.Segmenter (medx.predict writes them with --out)."
            )
        self.model, self.source = model, source
        self.card = checked_card(model, source)
        self.classes = list(self.card.class_names)
        self.calibrated, self.tta = calibrated, tta and model.inputs == "image"
        applied = calibrated and self.card.calibration is not None
        self.temperature = self.card.temperature if applied else 1.0
        self.scale = "calibrated" if applied else "raw"
        self.rule = (
            DecisionRule.of(
                self.card, self.classes, self.scale, self.card.temperature, threshold, self.tta
            )
            if len(self.classes) == 2
            else None
        )
        if threshold is not None and self.rule is None:
            raise ConfigError(
                f"--threshold is for binary classifiers; {source} has {len(self.classes)} "
                "classes (its answer is the most probable one)."
            )
        self.threshold = threshold
        self.quality, self.lungs = quality, lungs
        self.gradcam, self.gradcam_layer = gradcam, gradcam_layer
        self.explain_class = _class_index(gradcam_class, self.classes)
        self.gradcam_class = gradcam_class
        self.max_pixels = int(max_pixels)
        self.model_input = ModelInput(model.inputs, self.card.image_size)
        if gradcam or lungs is not None:
            self._check_explainable()
        self.window = window
        self.shift_monitor, self.shift_unavailable = self._monitor(monitor, window)

    def _monitor(
        self, monitor: bool | ShiftMonitor, window: int
    ) -> tuple[ShiftMonitor | None, str | None]:
        """The shift monitor, or None and why not (said once per model and process)."""
        if isinstance(monitor, ShiftMonitor):
            return monitor, None
        if not monitor:
            return None, _OFF
        found, reason = monitor_for(self.model, self.source, window=window)
        if reason and self.source not in _SAID:
            _SAID.add(self.source)
            log.warning("%s", reason)
        return found, reason

    @classmethod
    def from_checkpoint(
        cls,
        model: str | Path,
        calibrated: bool = True,
        threshold: float | None = None,
        tta: bool = False,
        qc: str | Path | None = None,
        qc_mode: str = "flag",
        qc_threshold: float | None = None,
        lungs: str | Path | None = None,
        gradcam: bool = False,
        gradcam_layer: str | None = None,
        gradcam_class: str | int | None = None,
        max_pixels: int = MAX_PIXELS,
        threads: int | None = None,
        monitor: bool = True,
        window: int = WINDOW,
    ) -> Predictor:
        """Open a classifier and what goes with it.

        Args:
            model: a checkpoint (.ckpt), `models:/NAME/VERSION`, `models:/NAME@ALIAS`, or an
                ONNX export (.onnx, run by onnxruntime).
            calibrated: see `Predictor`.
            threshold: see `Predictor`.
            tta: see `Predictor`.
            qc: a `data=quality` model: the quality gate.
            qc_mode: "flag" or "refuse" bad images.
            qc_threshold: p_bad at or above which an image is bad (default: the gate's
                operating point).
            lungs: a lung segmentation model: the lungs check.
            gradcam: see `Predictor`.
            gradcam_layer: see `Predictor`.
            gradcam_class: see `Predictor`.
            max_pixels: see `Predictor`.
            threads: onnxruntime threads for .onnx models.
            monitor: see `Predictor`.
            window: see `Predictor`.
        """
        gate = QualityGate.from_checkpoint(qc, qc_threshold, qc_mode) if qc else None
        segmenter = Segmenter.from_checkpoint(lungs, max_pixels=max_pixels) if lungs else None
        return cls(
            open_model(model, threads),
            calibrated=calibrated,
            threshold=threshold,
            tta=tta,
            quality=gate,
            lungs=segmenter,
            gradcam=gradcam,
            gradcam_layer=gradcam_layer,
            gradcam_class=gradcam_class,
            max_pixels=max_pixels,
            source=str(model),
            monitor=monitor,
            window=window,
        )

    def configured(self, **changes: Any) -> Predictor:
        """The same model (and gate, and lungs) with other options, e.g.
        `predictor.configured(calibrated=False, tta=True)`.

        Args:
            **changes: `Predictor` arguments to change; the others are kept.
        """
        options = {
            "calibrated": self.calibrated,
            "threshold": self.threshold,
            "tta": self.tta,
            "quality": self.quality,
            "lungs": self.lungs,
            "gradcam": self.gradcam,
            "gradcam_layer": self.gradcam_layer,
            "gradcam_class": self.gradcam_class,
            "max_pixels": self.max_pixels,
            "source": self.source,
            "monitor": self.shift_monitor or self.shift_unavailable != _OFF,
            "window": self.window,
        }
        return Predictor(self.model, **{**options, **changes})

    # --- what the model is ----------------------------------------------------------------------

    @property
    def model_id(self) -> str:
        """How outputs name the model: `NAME@RUN`."""
        return self.card.model_id

    @property
    def backend(self) -> str:
        """ "pytorch" or "onnxruntime"."""
        return backend_of(self.model)

    @property
    def intensity(self) -> str:
        """The per-image standardisation the model was trained with (its inputs get it)."""
        return self.card.intensity

    @property
    def explainable(self) -> bool:
        """Grad-CAM can be computed (a PyTorch image classifier)."""
        return self.backend == "pytorch" and self.model.inputs == "image"

    def _check_explainable(self) -> None:
        if self.explainable:
            return
        what = "an ONNX export" if self.backend == "onnxruntime" else "a feature model"
        raise ConfigError(
            f"Grad-CAM (--gradcam, --lungs) needs the gradients of a PyTorch image classifier; "
            f"{self.source} is {what}: give its .ckpt file, or leave Grad-CAM out."
        )

    # --- using it -------------------------------------------------------------------------------

    def predict(
        self,
        inputs: Sequence[Source],
        names: Sequence[str] | None = None,
        batch_size: int = 16,
        gradcam: bool | None = None,
    ) -> list[Prediction]:
        """One `Prediction` per input; an unreadable input gets its `error`, the others are
        predicted.

        Args:
            inputs: image files (paths), their bytes, or pixels (HxWx3 RGB uint8 arrays).
            names: how results and errors name each input (default: its path, "image N").
            batch_size: images per forward pass.
            gradcam: Grad-CAM for these inputs (default: the predictor's setting).
        """
        results: list[Prediction] = []
        with as_items(inputs, names) as items:
            for start in range(0, len(items), max(1, batch_size)):
                chosen = items[start : start + max(1, batch_size)]
                results += self.run([self._prepare(item, gradcam) for item in chosen], gradcam)
        return results

    def stream(
        self, paths: Sequence[str | Path], batch_size: int = 16, workers: int = 2
    ) -> PredictionStream:
        """Predictions for many files, in order, read by DataLoader workers: a folder of
        50,000 files never sits in memory. Iterate it once; afterwards its `shift_report()`
        tests the whole set against the model's validation images.

        Args:
            paths: image files (e.g. `find_inputs(folder)`).
            batch_size: images per forward pass.
            workers: DataLoader worker processes (0: read in this process).

        Example:
            >>> stream = predictor.stream(find_inputs("site/"))
            >>> rows = [answer.probabilities for answer in stream]
            >>> print(stream.shift_report().summary())
        """
        paths = [Path(p) for p in paths]
        batches = file_batches(
            paths, self.model_input, self.max_pixels, self.intensity, batch_size, workers
        )
        answers = (self._infer(x, items, self.gradcam) for x, items in batches)
        return PredictionStream(answers, self)

    def shift_test(self, predictions: Sequence[Prediction]) -> ShiftReport | None:
        """The two-sample test of a set of predictions' images against the validation
        reference; None without a monitor (`shift_unavailable` says why) or below 2 images.

        Args:
            predictions: results of `predict` (or a stream); images that were not classified
                are left out.
        """
        if self.shift_monitor is None:
            return None
        sample = self.shift_monitor.sample()
        sample.add(*_monitored(predictions))
        return sample.report()

    def observe(self, predictions: Sequence[Prediction]) -> None:
        """Add served images to the monitor's window of recent ones (thread-safe; nothing
        without a monitor, and nothing for an image that was not classified).

        Args:
            predictions: results of `predict` or `run`.
        """
        features, scores = _monitored(predictions)
        if self.shift_monitor is not None and len(features):
            self.shift_monitor.observe(features, scores)

    def drift(self) -> dict[str, Any]:
        """The test over the window of observed images, as JSON (`ShiftMonitor.window`);
        `status` "unavailable" with its `reason` without a monitor."""
        if self.shift_monitor is None:
            return {"status": "unavailable", "reason": self.shift_unavailable}
        return self.shift_monitor.window()

    def prepare(
        self, source: Source, name: str | None = None, gradcam: bool | None = None
    ) -> Prepared:
        """Decode one input for `run`: the model's input and, when a step needs them, the
        pixels as they are. For a service, which decodes in parallel outside the model's lock.

        Args:
            source: a file path, its bytes, or HxWx3 uint8 RGB pixels.
            name: how the result and errors name it (default: its path, or "image 0").
            gradcam: the pixels Grad-CAM's overlay needs are kept (default: the predictor's
                setting).

        Raises:
            BadImageError: the input cannot be read (PixelLimitError: too many pixels).
        """
        with as_items([source], None if name is None else [name]) as (item,):
            prepared = self._prepare(item, gradcam, strict=True)
        return prepared

    def run(self, prepared: Sequence[Prepared], gradcam: bool | None = None) -> list[Prediction]:
        """The predictions for prepared inputs (one forward pass).

        Args:
            prepared: inputs decoded by `prepare`.
            gradcam: Grad-CAM for these inputs (default: the predictor's setting).
        """
        if not prepared:
            return []
        x = torch.stack([p.x if p.x is not None else self.model_input.blank() for p in prepared])
        gradcam = self.gradcam if gradcam is None else gradcam
        return self._infer(x, [p.item for p in prepared], gradcam)

    # --- the steps ------------------------------------------------------------------------------

    def _prepare(self, item: Item, gradcam: bool | None, strict: bool = False) -> Prepared:
        gradcam = self.gradcam if gradcam is None else gradcam
        try:
            x = self.model_input(item.pixels(self.intensity, self.max_pixels))
            if self.quality is not None or gradcam:  # judged and drawn on the image as it is
                item.pixels("none", self.max_pixels)
            if self.lungs is not None:
                item.pixels(self.lungs.intensity, self.max_pixels)
        except MedxError as err:
            if strict:
                raise
            item.error = describe(err)
            return Prepared(item, None)
        return Prepared(item, x)

    def _infer(self, x: torch.Tensor, items: list[Item], gradcam: bool) -> list[Prediction]:
        """Predictions for a batch: the quality verdicts, then the probabilities, decisions
        and explanations of the images the gate let through."""
        if gradcam:
            self._check_explainable()
        results = [
            Prediction(
                item.name,
                self.model_id,
                temperature=self.temperature,
                scale=self.scale,
                size=item.size,
                error=item.error,
            )
            for item in items
        ]
        for result, item in zip(results, items, strict=True):
            if not item.error and self.quality is not None:
                result.quality = self.quality.judge(self._pixels(item, "none"))
        refused = [bool(r.quality and r.quality.refused) for r in results]
        wanted = [i for i, r in enumerate(results) if not r.error and not refused[i]]
        if not wanted:
            return results
        warn_if_synthetic(self.card, self.source)
        batch = x[wanted].to(device_of(self.model))
        probs, monitored = self._forward(batch)
        explain = gradcam or self.lungs is not None
        cams = self._cams(batch, probs) if explain else None
        for j, i in enumerate(wanted):
            result, p = results[i], probs[j].tolist()
            result.probabilities = dict(zip(self.classes, p, strict=True))
            result.predicted = self.classes[int(np.argmax(p))]
            result.decision = self.rule(p[1]) if self.rule is not None else None
            if cams is not None:
                self._explain(result, items[i], cams[j], gradcam)
        if monitored is not None:
            self._mark_shift([results[i] for i in wanted], *monitored)
        return results

    def _forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[np.ndarray, ...] | None]:
        """`probabilities(x)` and, with a shift monitor, (features, raw scores) from the same
        pass (`embed`; with TTA its logits are the identity view's)."""
        if self.shift_monitor is None:
            return self.probabilities(x), None
        with torch.inference_mode():
            features, logits = self.model.embed(x)
            raw = torch.softmax(logits.float(), dim=1).cpu().numpy()
            if self.tta:
                from medx.evaluation.tta import tta_logits

                logits = tta_logits(self.model, x, identity=logits)
            probs = torch.softmax(logits.float() / self.temperature, dim=1).cpu()
        scores = reference_scores(raw)
        return probs, (features.float().cpu().numpy(), scores)

    def _mark_shift(self, results: list[Prediction], features: np.ndarray, scores: np.ndarray):
        """Each classified image's OOD score and flag, and what the set test needs of it."""
        assert self.shift_monitor is not None
        ood, flags = self.shift_monitor.ood(features)
        for j, result in enumerate(results):
            result.ood_score, result.ood_flag = float(ood[j]), bool(flags[j])
            result.features, result.raw_score = features[j], float(scores[j])

    def probabilities(self, x: torch.Tensor) -> torch.Tensor:
        """Class probabilities (N x classes, float32) of a batch of model inputs: softmax of
        the logits over the temperature; with TTA the mean over views (`tta_logits`).

        Args:
            x: N x 3 x S x S images in [0, 1] at the model's size (`ModelInput`).
        """
        with torch.inference_mode():
            if self.tta:
                from medx.evaluation.tta import tta_logits

                logits = tta_logits(self.model, x)
            else:
                logits = self.model(x)
            return torch.softmax(logits.float() / self.temperature, dim=1).cpu()

    def _cams(self, x: torch.Tensor, probs: torch.Tensor) -> np.ndarray:
        from medx.evaluation.explain import grad_cam

        wanted = probs.argmax(1) if self.explain_class is None else self.explain_class
        return grad_cam(self.model, x, wanted, self.gradcam_layer).cams

    def _explain(self, result: Prediction, item: Item, cam: np.ndarray, overlay: bool) -> None:
        """The lungs check and the overlay of one image's Grad-CAM."""
        from medx.evaluation.explain import mass_inside, overlay_cam

        mask = None
        if self.lungs is not None:
            mask = self.lungs.mask(self._pixels(item, self.lungs.intensity))
            share = mass_inside(cam, mask)
            result.cam_in_lungs = share
            result.shortcut_alarm = bool(share < LUNG_SHARE_ALARM)
        if overlay:
            result.gradcam = cam
            result.overlay = overlay_cam(self._pixels(item, "none"), cam, mask)

    def _pixels(self, item: Item, intensity: str) -> np.ndarray:
        return item.pixels(intensity, self.max_pixels)


class PredictionStream:
    """`Predictor.stream`'s predictions, in order; iterate it once. While they pass, the
    shift monitor collects each classified image (`ShiftSample`), so that `shift_report()`
    afterwards tests the whole set.

    Args:
        batches: the predictions, batch by batch.
        predictor: the predictor that made them (its monitor, or why it has none).
    """

    def __init__(self, batches: Iterator[list[Prediction]], predictor: Predictor) -> None:
        self._batches = batches
        monitor = predictor.shift_monitor
        self.sample = monitor.sample() if monitor is not None else None
        self.unavailable = predictor.shift_unavailable

    def __iter__(self) -> Iterator[Prediction]:
        for results in self._batches:
            if self.sample is not None:
                self.sample.add(*_monitored(results))
            yield from results

    def shift_report(self) -> ShiftReport | None:
        """The test of the images streamed so far; None without a monitor (`unavailable`
        says why) or with fewer than 2 classified images (a set test needs a set)."""
        return self.sample.report() if self.sample is not None else None


def _monitored(predictions: Sequence[Prediction]) -> tuple[np.ndarray, np.ndarray]:
    """(features (n, D), raw scores (n,)) of the predictions the monitor saw."""
    seen = [p for p in predictions if p.features is not None]
    if not seen:
        return np.empty((0, 0), np.float32), np.empty(0)
    return np.stack([p.features for p in seen]), np.array([p.raw_score for p in seen])


def _class_index(name: str | int | None, classes: list[str]) -> int | None:
    """The index of the class Grad-CAM explains, by name or index; ConfigError if none."""
    if name is None:
        return None
    text = str(name)
    if text in classes:
        return classes.index(text)
    if text.isdigit() and int(text) < len(classes):
        return int(text)
    raise ConfigError(f"--gradcam-class {text!r} is not one of the model's classes {classes}.")
