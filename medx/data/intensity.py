"""Per-image intensity standardisation: the usual answer to X-ray machines that differ.

Two scanners (or one scanner before and after a software update) give the same anatomy
different grey levels: another gain, offset, gamma or processing curve. A model trained on one
and tested on the other then sees a shift it never learnt, and its threshold drifts. Mapping
each image by its own statistics removes what an affine change (gain, offset) does, and
equalisation removes any monotonic one.

Every method takes the decoded pixels at full precision (8- or 16-bit, or float: DICOM and
16-bit PNGs keep their depth until here) and returns uint8, which the rest of the pipeline
takes as before. Colour images are turned to gray first (X-rays are gray; an RGB export of one
is the same gray three times).

- `none`: 8-bit kept; deeper data windowed to the image's own min..max (the default);
- `zscore`: (x - mean) / std per image, ±3 std mapped to black..white; invariant to a gain
  > 0 and an offset;
- `equalize`: histogram equalisation on the full-precision values (their ranks); invariant
  to any increasing map;
- `clahe`: contrast-limited adaptive equalisation (OpenCV, 8×8 tiles, clip 2.0) of a 16-bit
  min..max copy; invariant to a gain > 0 and an offset.
"""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np

from medx.errors import ConfigError

ZSCORE_RANGE = 3.0  # standard deviations either side of the mean that span black..white
CLAHE_CLIP, CLAHE_TILES = 2.0, (8, 8)


def _gray(img: np.ndarray) -> np.ndarray:
    """HxW from HxW, HxWx1 or colour (luma weights, in float to keep the depth)."""
    if img.ndim == 3 and img.shape[2] >= 3:
        rgb = img[..., :3].astype(np.float64)
        return rgb @ np.array([0.114, 0.587, 0.299])  # OpenCV's BGR order
    return img.reshape(img.shape[0], img.shape[1], -1)[..., 0]


def _to_u8(unit: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(unit * 255.0), 0, 255).astype(np.uint8)


def _minmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    low, high = float(x.min()), float(x.max())
    return (x - low) / (high - low) if high > low else np.zeros_like(x)


def zscore(img: np.ndarray) -> np.ndarray:
    x = _gray(img).astype(np.float64)
    std = float(x.std())
    if std == 0:
        return np.full(x.shape, 128, np.uint8)
    z = (x - float(x.mean())) / std
    return _to_u8((np.clip(z, -ZSCORE_RANGE, ZSCORE_RANGE) + ZSCORE_RANGE) / (2 * ZSCORE_RANGE))


def equalize(img: np.ndarray) -> np.ndarray:
    """Each value → the share of pixels at or below it: ranks, so 16-bit detail is kept."""
    x = _gray(img)
    values, inverse, counts = np.unique(x.ravel(), return_inverse=True, return_counts=True)
    if len(values) == 1:
        return np.zeros(x.shape, np.uint8)
    cdf = np.cumsum(counts).astype(np.float64)
    cdf = (cdf - cdf[0]) / (cdf[-1] - cdf[0])
    return _to_u8(cdf[inverse].reshape(x.shape))


def clahe(img: np.ndarray) -> np.ndarray:
    deep = np.rint(_minmax(_gray(img)) * 65535).astype(np.uint16)
    out = cv2.createCLAHE(clipLimit=CLAHE_CLIP, tileGridSize=CLAHE_TILES).apply(deep)
    return _to_u8(out.astype(np.float64) / 65535)


METHODS: dict[str, Callable[[np.ndarray], np.ndarray] | None] = {
    "none": None,  # medx.data.io's own 8-bit conversion
    "zscore": zscore,
    "equalize": equalize,
    "clahe": clahe,
}


def check_method(method: str | None) -> str:
    """The method's name, or a ConfigError naming `data.intensity` and the choices."""
    method = method or "none"
    if method not in METHODS:
        raise ConfigError(f"data.intensity={method!r} is unknown; choices: {', '.join(METHODS)}.")
    return method


def standardise(img: np.ndarray, method: str) -> np.ndarray | None:
    """uint8 HxW of the decoded pixels by `method`; None for `none` (nothing to do here)."""
    fn = METHODS[check_method(method)]
    return None if fn is None else fn(img)
