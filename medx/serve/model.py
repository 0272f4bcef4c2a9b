"""The one model a service process holds: loaded once, then used under a lock.

A checkpoint or a registered model (`models:/NAME@alias`, resolved by medx's loader) is served
by PyTorch; an `.onnx` export by onnxruntime (`medx.export.OnnxModel`). Either backend is a
callable from a [0, 1] image batch to logits that carries the model card, so what turns an
image into an answer is medx.predict's, unchanged: `Reading` (classes, input size, temperature,
decision at the operating point), `classify`, `QualityGate`, `predict_mask`. Grad-CAM needs the
PyTorch model's gradients, so `explain` is a checkpoint's alone.

Inference holds one lock: Grad-CAM hooks into the network and toggles `requires_grad`, so
two requests must not share the model at once, and PyTorch's own threads already use the
cores. Decoding, resizing and PNG encoding happen outside the lock, in parallel.
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

from medx.data.transforms import ImageTransform
from medx.errors import DataError
from medx.models.load import load
from medx.predict import Options, QualityGate, Reading, classify, predict_mask
from medx.serve.limits import Refused
from medx.serve.settings import Settings

log = logging.getLogger(__name__)


class ServedModel:
    """A loaded model and what the card says about using it (see the module docstring)."""

    def __init__(self, net: Any, backend: str, settings: Settings) -> None:
        self.net, self.backend, self.settings = net, backend, settings
        self.card: dict[str, Any] = dict(net.card)
        self.task = str(self.card.get("task", "classification"))
        if self.task not in ("classification", "segmentation"):
            raise DataError(
                f"{settings.model} is a {self.task} model; the service serves classifiers "
                "(POST /predict) and segmenters (POST /segment). A quality model is given "
                "with --qc next to a classifier."
            )
        self.lock = threading.Lock()
        options = Options(max_pixels=settings.max_pixels)
        self.reading = Reading.of(net, options) if self.task == "classification" else None
        self.transform = ImageTransform(self.reading.size) if self.reading else None
        self.gate = None
        if settings.qc:
            qc_options = Options(qc=Path(settings.qc), qc_threshold=settings.qc_threshold)
            self.gate = QualityGate(qc_options)
        self.info = _model_info(self.card, backend, self.reading)

    @classmethod
    def load(cls, settings: Settings) -> ServedModel:
        """Open `settings.model` with the backend its kind needs, and warm it up."""
        if settings.threads:
            torch.set_num_threads(settings.threads)
        if settings.model.lower().endswith(".onnx"):
            served = cls(_onnx(settings), "onnxruntime", settings)
        else:
            served = cls(load(settings.model), "pytorch", settings)
        served.warm_up()
        return served

    def warm_up(self) -> None:
        """One pass on a blank image, before /ready: first-call allocations and lazy imports
        (Grad-CAM's take seconds) are not paid by the first request."""
        side = self.reading.size if self.reading else 64
        blank = np.zeros((side, side, 3), np.uint8)
        if self.task == "classification":
            self.classify(blank, explain=self.explainable)
        else:
            self.segment(blank)

    @property
    def explainable(self) -> bool:
        return self.backend == "pytorch" and self.task == "classification"

    @property
    def intensity(self) -> str:
        """The per-image standardisation the model was trained with (`medx.data.intensity`),
        applied when decoding its input."""
        return (self.card.get("input") or {}).get("intensity") or "none"

    def needs_raw(self, explain: bool) -> bool:
        """Whether one request needs the image as decoded without the model's intensity
        step too: the quality model judges, and Grad-CAM is drawn on, the image as it is."""
        return self.intensity != "none" and (self.gate is not None or explain)

    def classify(
        self, image: np.ndarray, explain: bool, raw: np.ndarray | None = None
    ) -> dict[str, Any]:
        """The answer for one decoded image (HxWx3 uint8 RGB, decoded with `intensity`) and
        the time spent on it; `raw`: the same file decoded without it (see `needs_raw`)."""
        if self.reading is None:
            raise Refused(400, self._wrong_endpoint("/predict"))
        if explain and not self.explainable:
            raise Refused(
                400,
                "explain=true needs the PyTorch checkpoint (Grad-CAM takes gradients, which an "
                "ONNX export has not); ask without explain, or serve the .ckpt file.",
            )
        reading = self.reading
        raw = image if raw is None else raw
        x = self.transform(image)[None]
        start = time.perf_counter()
        with self.lock:
            waited = time.perf_counter()
            quality = self._quality(raw)
            refused = quality is not None and quality["refused"]
            probs = None if refused else classify(self.net, x, reading.temperature, False)[0]
            cam = self._cam(x) if explain and not refused else None
        inferred = time.perf_counter()
        answer: dict[str, Any] = {"predicted": None, "probabilities": None, "decision": None}
        if probs is not None:
            p = probs.tolist()
            answer["predicted"] = reading.classes[int(np.argmax(p))]
            answer["probabilities"] = dict(zip(reading.classes, p, strict=True))
            decide = reading.decide
            if decide is not None and decide.threshold is not None:
                answer["decision"] = {
                    "class": reading.classes[decide(p[1])],
                    "threshold": decide.threshold,
                    "source": decide.source,
                }
        answer["temperature"] = reading.temperature
        answer["quality"] = quality
        if cam is not None:
            answer["gradcam_png"] = _png_base64(_overlay(raw, cam))
        answer["timing_ms"] = {
            "queue": 1000 * (waited - start),
            "inference": 1000 * (inferred - waited),
        }
        return answer

    def segment(self, image: np.ndarray) -> np.ndarray:
        """The mask (HxW uint8 0/255, at the image's own size) of one decoded image."""
        if self.task != "segmentation":
            raise Refused(400, self._wrong_endpoint("/segment"))
        threshold = getattr(self.net, "threshold", None)
        with self.lock:
            return predict_mask(self.net, image, 0.5 if threshold is None else float(threshold))

    def _quality(self, image: np.ndarray) -> dict[str, Any] | None:
        if self.gate is None:
            return None
        p_bad = self.gate.p_bad(image)
        bad = p_bad >= self.gate.threshold
        refused = bad and self.settings.qc_mode == "refuse"
        return {
            "verdict": "bad" if bad else "good",
            "p_bad": p_bad,
            "threshold": self.gate.threshold,
            "refused": refused,
            "reason": (
                f"refused: image quality p_bad {p_bad:.3f} >= {self.gate.threshold:.3f}; "
                "send a better exposed, sharper image"
                if refused
                else None
            ),
        }

    def _cam(self, x: torch.Tensor) -> np.ndarray:
        from medx.evaluation.explain import grad_cam

        return grad_cam(self.net, x).cams[0]

    def _wrong_endpoint(self, used: str) -> str:
        right = "/predict" if self.task == "classification" else "/segment"
        return f"This service holds a {self.task} model: POST the image to {right}, not {used}."


def _model_info(card: dict[str, Any], backend: str, reading: Reading | None) -> dict[str, Any]:
    """Name, version and provenance of the served model, for every answer."""
    source = Path(str(card.get("checkpoint", "model")))
    run = card.get("run") or {}
    version = card.get("registered_version")
    if version is None and source.is_file():
        version = "sha256:" + _sha256(source)[:12]
    return {
        "id": reading.model_id if reading else (card.get("registered_as") or source.name),
        "name": card.get("registered_as") or source.stem,
        "version": None if version is None else str(version),
        "run_id": run.get("id"),
        "task": card.get("task"),
        "backend": backend,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _onnx(settings: Settings) -> Any:
    """The onnxruntime model of an `.onnx` export (torch tensors in and out, a card)."""
    from medx.export import OnnxModel

    onnx = OnnxModel(settings.model, threads=settings.threads or None)
    onnx.card["checkpoint"] = str(onnx.path)  # the file served names the model
    return onnx


def _overlay(image: np.ndarray, cam: np.ndarray) -> np.ndarray:
    from medx.evaluation.explain import overlay_cam

    return overlay_cam(image, cam)


def _png_base64(rgb: np.ndarray) -> str:
    ok, png = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise RuntimeError("OpenCV could not encode the Grad-CAM overlay as PNG")
    return base64.b64encode(png.tobytes()).decode("ascii")
