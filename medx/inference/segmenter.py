"""Segmentation masks at the image's own size: the one implementation every front door uses.

The image is read as the segmenter's training data were (its card's intensity step), resized
to the model's size, run, and the foreground probability resized back to the image's size
before it is thresholded and post-processed (`medx.models.postprocess`), so a mask lines up
with the image pixel for pixel, whatever its size.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from medx.errors import DataError, MedxError
from medx.inference.decision import check_threshold
from medx.inference.opening import backend_of, checked_card, open_model, warn_if_synthetic
from medx.inference.reading import MAX_PIXELS, Item, Source, as_items, describe, read
from medx.models.postprocess import make_postprocess

__all__ = ["Segmentation", "Segmenter", "predict_mask"]

_MODELS = object()  # predict_mask's default: the model's own post-processing


@dataclass
class Segmentation:
    """One image's mask.

    Args:
        source: the input, as named (its path, an upload's name, a row).
        model: the id of the model that drew it.
        mask: HxW uint8, 0 or 255, at the image's own size (None when it failed).
        foreground: the share of the image inside the mask.
        size: the image's (width, height).
        error: why the input could not be segmented ("" when it was).
    """

    source: str
    model: str
    mask: np.ndarray | None = None
    foreground: float | None = None
    size: tuple[int, int] | None = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error


@torch.no_grad()
def predict_mask(
    model: Any,
    image: np.ndarray,
    threshold: float,
    postprocess: Callable[[np.ndarray], np.ndarray] | object | None = _MODELS,
) -> np.ndarray:
    """HxWx3 uint8 image → HxW uint8 mask of 0/255 at the image's own size.

    Args:
        model: a segmenter (module or `OnnxModel`) taking [0, 1] images.
        image: decoded as the model's data were (see `Segmenter.read`).
        threshold: foreground probability at or above which a pixel is in the mask.
        postprocess: a mask → mask function, None for none; default: the model's own.
    """
    size = int(model.hparams.image_size)
    h, w = image.shape[:2]
    small = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    x = torch.from_numpy(small).permute(2, 0, 1).float().div(255)
    prob = model.predict_masks(x[None].to(model.device))[0, 0].cpu().numpy()
    prob = cv2.resize(prob, (w, h), interpolation=cv2.INTER_LINEAR)
    mask = np.where(prob >= threshold, 255, 0).astype(np.uint8)
    step = model.postprocess if postprocess is _MODELS else postprocess
    return step(mask) if step else mask


class Segmenter:
    """A segmentation model and how to use it.

    Args:
        model: an opened segmenter (`open_model`: checkpoint, `models:/` URI or .onnx).
        threshold: mask probability (default: the model's, 0.5 unless trained otherwise).
        postprocess: a `medx.models.postprocess` name (default: the model's).
        max_pixels: larger images are refused before decoding.
        source: how messages name the model.
    """

    def __init__(
        self,
        model: Any,
        threshold: float | None = None,
        postprocess: str | None = None,
        max_pixels: int = MAX_PIXELS,
        source: str = "",
    ) -> None:
        source = source or str(model.card.get("checkpoint", "model"))
        task = model.card.get("task") or getattr(model, "task", None)
        if task != "segmentation":
            raise DataError(
                f"{source} is not a medx segmentation checkpoint (it is a {task} model); "
                "train one with `python -m medx.train model=unet data=lung_seg`."
            )
        self.model, self.source, self.max_pixels = model, source, int(max_pixels)
        self.card = checked_card(model, source)
        default = getattr(model, "threshold", None)
        default = 0.5 if default is None else float(default)
        self.threshold = default if threshold is None else check_threshold(threshold)
        self.postprocess = (
            model.postprocess if postprocess is None else make_postprocess(postprocess)
        )

    @classmethod
    def from_checkpoint(
        cls,
        source: str | Path,
        threshold: float | None = None,
        postprocess: str | None = None,
        max_pixels: int = MAX_PIXELS,
        threads: int | None = None,
    ) -> Segmenter:
        """Open `source` (a checkpoint, `models:/NAME/VERSION|@ALIAS` or .onnx) to segment.

        Args:
            source: the segmentation model.
            threshold: see `Segmenter`.
            postprocess: see `Segmenter`.
            max_pixels: see `Segmenter`.
            threads: onnxruntime threads for .onnx models.

        Example:
            >>> lungs = Segmenter.from_checkpoint("lung_unet.ckpt")
            >>> (result,) = lungs.segment(["chest.dcm"])
            >>> result.mask.shape, result.foreground
        """
        return cls(open_model(source, threads), threshold, postprocess, max_pixels, str(source))

    @property
    def model_id(self) -> str:
        return self.card.model_id

    @property
    def intensity(self) -> str:
        return self.card.intensity

    @property
    def backend(self) -> str:
        return backend_of(self.model)

    def read(self, source: Source, name: str | None = None) -> np.ndarray:
        """One input's pixels as this model's data were decoded (BadImageError if not).

        Args:
            source: a file path, its bytes, or HxWx3 uint8 RGB pixels.
            name: how errors name it.
        """
        return read(source, self.max_pixels, self.intensity, name)

    def mask(self, image: np.ndarray) -> np.ndarray:
        """The mask of pixels decoded by `read` (HxW uint8 0/255, at their size).

        Args:
            image: HxWx3 uint8 RGB pixels from `read`.
        """
        warn_if_synthetic(self.card, self.source)
        return predict_mask(self.model, image, self.threshold, self.postprocess)

    def segment(
        self, inputs: Sequence[Source], names: Sequence[str] | None = None
    ) -> list[Segmentation]:
        """One `Segmentation` per input (files, bytes or arrays); an unreadable input gets
        its `error` and the others are segmented.

        Args:
            inputs: what to segment.
            names: how results and errors name each input (default: its path, or
                "image N").
        """
        with as_items(inputs, names) as items:
            return [self._one(item) for item in items]

    def _one(self, item: Item) -> Segmentation:
        try:
            image = item.pixels(self.intensity, self.max_pixels)
        except MedxError as err:
            return Segmentation(item.name, self.model_id, error=describe(err))
        mask = self.mask(image)
        return Segmentation(
            item.name, self.model_id, mask, float((mask > 0).mean()), item.size, error=""
        )
