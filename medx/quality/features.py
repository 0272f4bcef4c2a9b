"""Handcrafted image-quality features of one gray image, in a fixed order (`FEATURES`).

Why handcrafted: a quality screen must be cheap (a whole data set before training), explainable
(which property made an image bad) and independent of the disease. Every feature is computed
on intensities scaled to [0, 1] (see `to_unit`), so 8- and 16-bit images give comparable values.
All work is done by OpenCV whole-image filters and reductions: no Python loop over pixels.

Definitions (I: the image in [0, 1], N: its number of pixels, borders reflected, OpenCV's
BORDER_REFLECT_101):

- ``laplacian_var`` (sharpness): variance of I convolved with the 4-neighbour Laplacian
  [[0, 1, 0], [1, -4, 1], [0, 1, 0]] (OpenCV ``Laplacian`` with ksize=1).
- ``contrast``: standard deviation of I (population, ddof=0).
- ``brightness``: mean of I.
- ``entropy``: Shannon entropy in bits of the 256-bin histogram of I (bin k holds the
  pixels with round(255·I) = k), -Σ p_k log2 p_k over the non-empty bins; in [0, 8].
- ``snr`` (SNR proxy, dB): 20·log10((brightness + ε) / (noise_sigma + ε)), ε = 1/1024: the
  mean signal divided by the estimated noise standard deviation (not by the contrast, which
  is anatomy, not noise). ε keeps a noiseless (e.g. constant) image finite.
- ``tenengrad`` (sharpness): mean of Gx² + Gy², G the 3×3 Sobel derivatives of I.
- ``noise_sigma``: Immerkær's estimate (1996) of additive noise σ: sqrt(π/2) / (6·(W-2)(H-2))
  · Σ |I ∗ M| over the interior pixels, M = [[1, -2, 1], [-2, 4, -2], [1, -2, 1]] (M is blind
  to linear ramps, so smooth anatomy hardly counts as noise). M = dᵀd with d = [1, -2, 1], so
  it runs as two 1-D passes (same values, a third of the time of the 3×3 filter).
- ``underexposed``: fraction of pixels with round(255·I) <= 5.
- ``overexposed``: fraction of pixels with round(255·I) >= 250.
- ``dynamic_range``: 99th minus 1st percentile of I (from the histogram, in 1/255 steps).
- ``blockiness`` (JPEG): mean |horizontal and vertical neighbour difference| across the 8-pixel
  block borders divided by the mean inside the blocks, (b + ε) / (i + ε); ≈1 without blocks.
"""

from __future__ import annotations

import math
import threading

import cv2
import numpy as np

from medx.errors import DataError

FEATURES: tuple[str, ...] = (
    "laplacian_var",
    "contrast",
    "brightness",
    "entropy",
    "snr",
    "tenengrad",
    "noise_sigma",
    "underexposed",
    "overexposed",
    "dynamic_range",
    "blockiness",
)
SEED_FEATURES = FEATURES[:5]  # the seed project's five
# Features spanning decades: a linear model sees them as log(x + 1e-8).
LOG_FEATURES = frozenset({"laplacian_var", "tenengrad", "noise_sigma"})

MIN_SIZE = 3  # the 3x3 filters need an interior pixel
EPS = 1.0 / 1024
_SECOND_DIFF = np.array([1, -2, 1], dtype=np.float32)  # Immerkær's M is its outer square
_BLOCK = 8
_LAPLACIAN = np.array([[0, 1, 0], [1, -4, 1], [0, 1, 0]], dtype=np.float32)
_SOBEL = ((1, 0), (0, 1))
_scratch = threading.local()  # per-thread filter outputs (compute_features runs threads)


def _buffer(shape: tuple[int, int], dtype: type) -> np.ndarray:
    """A reused per-thread filter output: a fresh 1024² int16 array costs page faults (~0.3
    ms) each time, as much as the filter itself."""
    key = (shape, np.dtype(dtype).str)
    cache = getattr(_scratch, "buffers", None)
    if cache is None or key not in cache:
        cache = _scratch.buffers = {key: np.empty(shape, dtype)}  # one size kept per thread
    return cache[key]


def to_unit(image: np.ndarray) -> tuple[np.ndarray, float]:
    """(gray pixels, scale) with I = pixels · scale in [0, 1]; gray from RGB(A), alpha dropped.

    uint8 and uint16 are kept as they are (integer sums are exact and read half or a quarter
    of the memory of float32). uint16 is read at the smallest bit depth 10, 12, 14 or 16 that
    holds its maximum, so 12-bit detector data in a 16-bit container is not mistaken for
    underexposure. Floats must already be in [0, 1]. Colour is converted with the usual luma
    weights (input taken as RGB).
    """
    img = np.asarray(image)
    if img.ndim == 3:
        if img.shape[2] == 1:
            img = img[:, :, 0]
        elif img.shape[2] in (3, 4):
            img = img[:, :, :3]
            if img.dtype not in (np.uint8, np.uint16, np.float32):
                img = img.astype(np.float32)
            img = cv2.cvtColor(np.ascontiguousarray(img), cv2.COLOR_RGB2GRAY)
    if img.ndim != 2:
        raise DataError(f"Expected a gray or RGB(A) image, got pixel array shape {image.shape}")
    if min(img.shape) < MIN_SIZE:
        raise DataError(
            f"Image of {img.shape[1]}x{img.shape[0]} pixels is too small for quality "
            f"features (at least {MIN_SIZE}x{MIN_SIZE})"
        )
    img = np.ascontiguousarray(img)
    if img.dtype == np.uint8:
        return img, 1.0 / 255
    if img.dtype == np.uint16:
        top = int(cv2.minMaxLoc(img)[1])
        bits = next(b for b in (10, 12, 14, 16) if top < 2**b)
        return img, 1.0 / (2**bits - 1)
    if img.dtype.kind in "fiu":
        img = img.astype(np.float32)
        if not np.isfinite(img).all():
            raise DataError("Image contains NaN or infinite pixel values")
        return img, 1.0
    raise DataError(f"Unsupported pixel type {img.dtype}")


def image_features(image: np.ndarray) -> np.ndarray:
    """The `FEATURES` of one image (2-D gray or HxWx3/4), float64, always finite.

    Sums go through ``cv2.norm``/``cv2.sumElems`` (one SIMD pass, no temporaries) on the
    pixels as given. Filters run in int16 on 8-bit input (exact for every 3×3 kernel used
    here), otherwise on one float32 copy (exact sums for 16-bit: |values| < 2**24).
    """
    img, scale = to_unit(image)
    eight_bit = img.dtype == np.uint8
    depth, out_type = (cv2.CV_16S, np.int16) if eight_bit else (cv2.CV_32F, np.float32)
    src = img if img.dtype in (np.uint8, np.float32) else img.astype(np.float32)
    h, w = img.shape
    n = img.size

    brightness = cv2.sumElems(img)[0] / n * scale
    contrast = math.sqrt(max(cv2.norm(img, cv2.NORM_L2SQR) / n * scale**2 - brightness**2, 0.0))

    out = _buffer(img.shape, out_type)
    lap = cv2.filter2D(src, depth, _LAPLACIAN, dst=out, borderType=cv2.BORDER_REFLECT_101)
    laplacian_var = _variance(lap, n) * scale**2
    tenengrad = (
        sum(
            cv2.norm(cv2.Sobel(src, depth, dx, dy, dst=out, ksize=3), cv2.NORM_L2SQR)
            for dx, dy in _SOBEL
        )
        / n
        * scale**2
    )

    residual = cv2.sepFilter2D(src, depth, _SECOND_DIFF, _SECOND_DIFF, dst=out)[1:-1, 1:-1]
    l1 = cv2.norm(residual, cv2.NORM_L1)
    noise_sigma = math.sqrt(math.pi / 2) * l1 / (6.0 * (w - 2) * (h - 2)) * scale

    levels = img if eight_bit else _levels(img, scale)
    hist = cv2.calcHist([levels], [0], None, [256], [0, 256]).ravel() / n
    nonzero = hist[hist > 0]
    entropy = float(-(nonzero * np.log2(nonzero)).sum())
    cdf = np.cumsum(hist)
    p1, p99 = np.searchsorted(cdf, [0.01, 0.99])
    dynamic_range = (min(int(p99), 255) - min(int(p1), 255)) / 255

    values = {
        "laplacian_var": laplacian_var,
        "contrast": contrast,
        "brightness": brightness,
        "entropy": entropy + 0.0,  # -0.0 for a constant image
        "snr": 20 * math.log10((brightness + EPS) / (noise_sigma + EPS)),
        "tenengrad": tenengrad,
        "noise_sigma": noise_sigma,
        "underexposed": float(hist[:6].sum()),
        "overexposed": float(hist[250:].sum()),
        "dynamic_range": dynamic_range,
        "blockiness": _blockiness(img, scale),
    }
    return np.array([values[name] for name in FEATURES], dtype=np.float64)


def _variance(values: np.ndarray, n: int) -> float:
    """Population variance from one sum and one sum of squares (clipped at 0 for rounding)."""
    mean = cv2.sumElems(values)[0] / n
    return max(cv2.norm(values, cv2.NORM_L2SQR) / n - mean**2, 0.0)


def _levels(img: np.ndarray, scale: float) -> np.ndarray:
    """round(255·I) as uint8 (saturating), for the histogram of a non-8-bit image."""
    return cv2.convertScaleAbs(img, alpha=255 * scale)


def _blockiness(img: np.ndarray, scale: float) -> float:
    """Neighbour differences across 8-pixel block borders over those inside the blocks."""
    h, w = img.shape
    total = cv2.norm(img[:, 1:], img[:, :-1], cv2.NORM_L1) + cv2.norm(
        img[1:], img[:-1], cv2.NORM_L1
    )
    n_total = h * (w - 1) + (h - 1) * w
    border, n_border = 0.0, 0
    if w > _BLOCK:  # column pairs (8k-1, 8k): copies, as strided columns are no OpenCV Mat
        right, left = img[:, _BLOCK::_BLOCK].copy(), img[:, _BLOCK - 1 : -1 : _BLOCK].copy()
        border += cv2.norm(right, left, cv2.NORM_L1)
        n_border += right.size
    if h > _BLOCK:
        border += cv2.norm(img[_BLOCK::_BLOCK], img[_BLOCK - 1 : -1 : _BLOCK], cv2.NORM_L1)
        n_border += img[_BLOCK::_BLOCK].size
    b = border / n_border * scale if n_border else 0.0
    i = (total - border) / max(n_total - n_border, 1) * scale
    return (b + EPS) / (i + EPS)
