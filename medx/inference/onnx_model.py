"""The onnxruntime backend: a medx `.onnx` export used like the torch module it came from.

`python -m medx.export` writes the file (the module's `forward`: [0, 1] images in, logits
out, normalisation inside the graph) with the model card and the input contract in its
`metadata_props`; `OnnxModel` reads them back, so the inference core uses it wherever it uses
a module (`model(x)`, `predict_masks`, `card`, `task`, `inputs`).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from medx.errors import CheckpointError
from medx.models.card import ModelCard

__all__ = ["INPUT", "OUTPUT", "OnnxModel", "OnnxModelError", "pad_to_stride", "threshold_of"]

INPUT, OUTPUT = "image", "logits"


class OnnxModelError(CheckpointError):
    """An ONNX file cannot be used as a medx model, or is given an input it does not take."""


def pad_to_stride(x: np.ndarray, step: int) -> np.ndarray:
    """NCHW images padded at the bottom and right, repeating edge pixels, to multiples of step.

    Args:
        x: N x C x H x W images.
        step: the network's stride (`medx.input.stride` of the file).
    """
    h, w = x.shape[-2:]
    if h % step == 0 and w % step == 0:
        return x
    return np.pad(x, ((0, 0), (0, 0), (0, -h % step), (0, -w % step)), mode="edge")


def threshold_of(value: Any) -> tuple[float | None, str]:
    """`medx.threshold` as (value, scale): `{"value", "scale"}` since schema 2, a bare number
    (always raw) in files written before."""
    if isinstance(value, dict):
        number = value.get("value")
        return (None if number is None else float(number)), str(value.get("scale") or "raw")
    return (None if value is None else float(value)), "raw"


class OnnxModel:
    """A medx .onnx file run by onnxruntime, used like the torch module it came from.

    `card` (the checkpoint's model card, plus `card["onnx"]`: file, export, check), `task`,
    `class_names`, `temperature`, `threshold` (its scale in `threshold_scale`), and `model(x)`
    → logits for a [0, 1] float batch (torch tensor in → torch tensor out; NumPy in → NumPy
    out). Segmenters also have `predict_masks`, `postprocess` and pad inputs to the stride
    themselves. One session serves concurrent calls (onnxruntime's `run` is thread-safe).

    Args:
        path: the .onnx file written by `python -m medx.export`.
        threads: onnxruntime's intra-op threads (None: its default).
    """

    inputs = "image"

    def __init__(self, path: str | Path, threads: int | None = None) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise OnnxModelError(f"ONNX model {self.path} does not exist; check the path.")
        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(
                str(self.path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # onnxruntime's InvalidProtobuf, Fail, InvalidGraph, ...
            first = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise OnnxModelError(
                f"{self.path} cannot be opened by onnxruntime ({first}): not an ONNX file or "
                "damaged; export it again with `python -m medx.export`."
            ) from err
        props = self.session.get_modelmeta().custom_metadata_map
        if "medx.card" not in props:
            raise OnnxModelError(
                f"{self.path} is an ONNX model but not a medx export (no medx.card in its "
                "metadata); export the checkpoint with `python -m medx.export`."
            )
        self.metadata = {k: json.loads(v) for k, v in props.items() if k.startswith("medx.")}
        meta = self.metadata
        self.card: dict[str, Any] = ModelCard.from_dict(meta["medx.card"]).to_dict()
        self.card["onnx"] = {
            "file": self.path.name,
            "export": meta.get("medx.export"),
            "check": meta.get("medx.check"),
        }
        self.task: str = meta["medx.task"]
        self.input: dict[str, Any] = meta["medx.input"]
        self.class_names: list[str] = list(meta.get("medx.class_names") or [])
        self.temperature = float(meta.get("medx.temperature") or 1.0)
        self.threshold, self.threshold_scale = threshold_of(meta.get("medx.threshold"))
        self.stride = int(self.input.get("stride", 1))
        size = int(self.input["image_size"])
        self.image_size = size
        self.device = torch.device("cpu")
        if self.task == "segmentation":
            from medx.models.postprocess import make_postprocess

            self.postprocess = make_postprocess(meta.get("medx.postprocess") or "none")
            self.hparams = SimpleNamespace(image_size=size, threshold=self.threshold)
        else:
            outputs = self.session.get_outputs()[0].shape[1]
            classes = len(self.class_names) or (outputs if isinstance(outputs, int) else 0)
            self.hparams = SimpleNamespace(image_size=size, num_classes=classes)

    def eval(self) -> OnnxModel:
        return self

    def __call__(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Logits of a [0, 1] float batch (N x 3 x H x W)."""
        as_torch = isinstance(x, torch.Tensor)
        array = x.detach().cpu().numpy() if as_torch else np.asarray(x)
        self._check(array)
        array = np.ascontiguousarray(array, dtype=np.float32)
        h, w = array.shape[-2:]
        if self.task == "segmentation":
            array = pad_to_stride(array, self.stride)
        logits = self.session.run([OUTPUT], {INPUT: array})[0]
        if self.task == "segmentation":
            logits = np.ascontiguousarray(logits[..., :h, :w])
        return torch.from_numpy(logits) if as_torch else logits

    def predict_masks(self, x: torch.Tensor | np.ndarray) -> torch.Tensor | np.ndarray:
        """Foreground probabilities (N x 1 x H x W) of [0, 1] images.

        Args:
            x: N x 3 x H x W float images in [0, 1], any size (padded to the stride here).
        """
        logits = self(x)
        if isinstance(logits, torch.Tensor):
            return torch.sigmoid(logits)
        return 1.0 / (1.0 + np.exp(-logits))

    def _check(self, x: np.ndarray) -> None:
        if x.ndim != 4 or x.shape[1] != 3:
            raise OnnxModelError(
                f"{self.path.name} takes N x 3 x H x W images (RGB, gray repeated), not an "
                f"array of shape {tuple(x.shape)}."
            )
        if not np.issubdtype(x.dtype, np.floating):
            raise OnnxModelError(
                f"{self.path.name} takes float images in [0, 1], not {x.dtype} (divide uint8 "
                "pixels by 255)."
            )
        size = self.image_size
        if self.task != "segmentation" and x.shape[-2:] != (size, size):
            raise OnnxModelError(
                f"{self.path.name} takes {size}x{size} images, not {x.shape[2]}x{x.shape[3]}: "
                "resize them first (as medx.data.transforms.ImageTransform does)."
            )
