"""The one model a service process holds: loaded once, then used under a lock.

A checkpoint or a registered model (`models:/NAME@alias`) is served by PyTorch, an `.onnx`
export by onnxruntime: `medx.inference` opens either and does all the work (`Predictor`,
`Segmenter`, `QualityGate`), so the service answers what `medx.predict` and the MLflow pyfunc
answer for the same image. This module adds what a service needs around it: the lock, the
warm-up, the model's public description, and turning a result into the JSON answer. Grad-CAM
needs the PyTorch model's gradients, so `explain` is a checkpoint's alone.

Inference holds one lock: Grad-CAM hooks into the network and toggles `requires_grad`, so
two requests must not share the model at once, and PyTorch's own threads already use the
cores. Decoding, resizing and PNG encoding happen outside the lock, in parallel.

The shift monitor (a classifier with a shift reference) keeps the last `--drift-window`
classified requests (the warm-up pass is not one), under its own lock; `GET /drift` tests
them against the validation images in a worker thread, once per state of the window. Each
worker process of `--workers N` keeps its own window.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import threading
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from medx.errors import DataError
from medx.inference import Predictor, Prepared, QualityGate, Segmenter, backend_of, open_model
from medx.models.card import ModelCard
from medx.serve.limits import Refused
from medx.serve.settings import Settings

log = logging.getLogger(__name__)

_SEND_BETTER = "send a better exposed, sharper image"


class ServedModel:
    """A loaded model, its `Predictor` or `Segmenter`, and its public description."""

    def __init__(self, net: Any, settings: Settings) -> None:
        self.net, self.settings = net, settings
        self.backend = backend_of(net)
        self.card = ModelCard.from_dict(net.card)
        self.task = str(self.card.task or getattr(net, "task", "classification"))
        if self.task not in ("classification", "segmentation"):
            raise DataError(
                f"{settings.model} is a {self.task} model; the service serves classifiers "
                "(POST /predict) and segmenters (POST /segment). A quality model is given "
                "with --qc next to a classifier."
            )
        self.lock = threading.Lock()
        self.predictor: Predictor | None = None
        self.segmenter: Segmenter | None = None
        if self.task == "classification":
            gate = None
            if settings.qc:
                gate = QualityGate.from_checkpoint(
                    settings.qc, settings.qc_threshold, settings.qc_mode
                )
            self.predictor = Predictor(
                net,
                quality=gate,
                max_pixels=settings.max_pixels,
                source=settings.model,
                window=settings.drift_window,
            )
        else:
            self.segmenter = Segmenter(net, max_pixels=settings.max_pixels, source=settings.model)
        self.info = _model_info(self.card, self.backend, self.model_id)

    @classmethod
    def load(cls, settings: Settings) -> ServedModel:
        """Open `settings.model` with the backend its kind needs, and warm it up."""
        if settings.threads:
            torch.set_num_threads(settings.threads)
        served = cls(open_model(settings.model, settings.threads or None), settings)
        served.warm_up()
        return served

    @property
    def model_id(self) -> str:
        return self.card.model_id

    def warm_up(self) -> None:
        """One pass on a blank image, before /ready: first-call allocations and lazy imports
        (Grad-CAM's take seconds) are not paid by the first request."""
        side = self.card.image_size or 64
        blank = np.zeros((side, side, 3), np.uint8)
        if self.predictor is not None:
            explain = self.explainable
            self.classify(self.predictor.prepare(blank, "warm-up", explain), explain, False)
        else:
            self.segment(blank)

    @property
    def explainable(self) -> bool:
        return self.predictor is not None and self.predictor.explainable

    @property
    def decision(self) -> dict[str, Any] | None:
        """The rule the service decides by (threshold on the reported scale, its source)."""
        rule = self.predictor.rule if self.predictor is not None else None
        return rule.as_dict() if rule is not None else None

    def prepare(self, path: Path, name: str, explain: bool) -> Prepared:
        """Decode one upload for `classify` (outside the lock; BadImageError if unreadable)."""
        if self.predictor is None:
            raise Refused(400, self._wrong_endpoint("/predict"))
        if explain and not self.explainable:
            raise Refused(
                400,
                "explain=true needs the PyTorch checkpoint (Grad-CAM takes gradients, which an "
                "ONNX export has not); ask without explain, or serve the .ckpt file.",
            )
        return self.predictor.prepare(path, name, explain)

    def classify(self, prepared: Prepared, explain: bool, observe: bool = True) -> dict[str, Any]:
        """The answer for one prepared image and the time spent on it; `observe`: the image
        joins the shift monitor's window (`drift`)."""
        assert self.predictor is not None
        start = time.perf_counter()
        with self.lock:
            waited = time.perf_counter()
            (result,) = self.predictor.run([prepared], gradcam=explain)
        inferred = time.perf_counter()
        if observe:
            self.predictor.observe([result])
        quality = None
        if result.quality is not None:
            quality = result.quality.as_dict()
            if result.quality.refused:
                quality["reason"] = f"{result.quality.reason}; {_SEND_BETTER}"
        answer: dict[str, Any] = {
            "predicted": result.predicted,
            "probabilities": result.probabilities,
            "decision": result.decision.as_dict() if result.decision else None,
            "temperature": result.temperature,
            "scale": result.scale,
            "quality": quality,
            "gradcam_png": _png_base64(result.overlay) if result.overlay is not None else None,
            "ood_score": result.ood_score,
            "ood_flag": result.ood_flag,
            "size": list(result.size or (0, 0)),
            "timing_ms": {
                "queue": 1000 * (waited - start),
                "inference": 1000 * (inferred - waited),
            },
        }
        return answer

    def drift(self) -> dict[str, Any]:
        """The shift test over the window of recent requests (`Predictor.drift`)."""
        if self.predictor is None:
            model, task = self.settings.model, self.task
            reason = f"{model} is a {task} model: the shift monitor is for classifiers."
            return {"status": "unavailable", "reason": reason}
        return self.predictor.drift()

    def read_for_mask(self, path: Path | np.ndarray, name: str | None = None) -> np.ndarray:
        """Decode one upload as the segmenter's data were (outside the lock)."""
        if self.segmenter is None:
            raise Refused(400, self._wrong_endpoint("/segment"))
        return self.segmenter.read(path, name)

    def segment(self, image: np.ndarray) -> np.ndarray:
        """The mask (HxW uint8 0/255, at the image's own size) of one decoded image."""
        if self.segmenter is None:
            raise Refused(400, self._wrong_endpoint("/segment"))
        with self.lock:
            return self.segmenter.mask(image)

    def _wrong_endpoint(self, used: str) -> str:
        right = "/predict" if self.task == "classification" else "/segment"
        return f"This service holds a {self.task} model: POST the image to {right}, not {used}."


def _model_info(card: ModelCard, backend: str, model_id: str) -> dict[str, Any]:
    """Name, version and provenance of the served model, for every answer (no local paths:
    the file by its name, its version by its content's digest)."""
    source = card.source_name
    version = card.registered_version
    if version is None and card.checkpoint and Path(card.checkpoint).is_file():
        version = "sha256:" + _sha256(Path(card.checkpoint))[:12]
    return {
        "id": model_id,
        "name": card.registered_as or Path(source).stem,
        "version": None if version is None else str(version),
        "run_id": card.run.get("id"),
        "task": card.task,
        "backend": backend,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _png_base64(rgb: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the Grad-CAM overlay as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")
