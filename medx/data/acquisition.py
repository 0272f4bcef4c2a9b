"""Simulated acquisition shifts: what another scanner, site or software version does to an image.

One module for three users: the robustness stress test (`medx.evaluation.stress`), the shift
monitor's power benchmark (`benchmarks/shift.py`) and the `data.augment=acquisition` training
augmentation (`medx.data.transforms`). Each shift is a plausible change of acquisition or
processing, not a defect: another tone curve (gamma, contrast curve), another detector
sharpness (blur), dose (noise) or resolution (down-and-up sampling), a narrower field of view
(crop) or collimator shutters (collimation), a lossy archive (JPEG). Severities are graded
1..`SEVERITIES`: 1 is a change a radiologist barely notices, the last one is obvious.

Shifts act on the decoded gray pixels (uint8 HxW, or HxWx3 with equal channels), before
medx's per-image intensity standardisation, as a scanner would: so `data.intensity=zscore`
rightly undoes part of a gamma change, and the stress test measures that. Lengths are relative
to the image width (reference 256 px), so a 224 px copy and a 2048 px original get the same
look. Randomness (noise) comes only from the `rng` passed in: a shifted image is reproducible.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import cv2
import numpy as np

from medx.errors import ConfigError
from medx.quality.degradations import down_and_up, scaled_length, to_uint8

SEVERITIES = 3  # graded 1 (barely visible) .. 3 (obvious)

Shift = Callable[[np.ndarray, int, np.random.Generator], np.ndarray]


def _curve(img: np.ndarray, unit_curve: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """A tone curve on [0, 1] applied through a 256-entry lookup table."""
    lut = to_uint8(255 * unit_curve(np.linspace(0.0, 1.0, 256)))
    return cv2.LUT(img, lut)


def gamma(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Another detector response or display LUT: pixel ** γ, γ = 1.3, 1.7, 2.3 (darker)."""
    g = (1.3, 1.7, 2.3)[severity - 1]
    return _curve(img, lambda u: u**g)


def contrast(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Another vendor's processing curve: an S-shaped tone curve (logistic, slope 4, 7, 12)
    stretching the mid-tones and crushing both ends; not undone by a gain and offset."""
    k = (4.0, 7.0, 12.0)[severity - 1]
    low, high = 1 / (1 + np.exp(k / 2)), 1 / (1 + np.exp(-k / 2))
    return _curve(img, lambda u: (1 / (1 + np.exp(-k * (u - 0.5))) - low) / (high - low))


def blur(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A softer detector or a smoothing filter: Gaussian σ = 0.8, 1.6, 3 px (256-px reference)."""
    return cv2.GaussianBlur(img, (0, 0), scaled_length(img, (0.8, 1.6, 3.0)[severity - 1]))


def noise(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A lower dose or a noisier detector: additive Gaussian noise, σ = 4, 8, 16 gray levels."""
    sigma = (4.0, 8.0, 16.0)[severity - 1]
    gray = img[..., 0] if img.ndim == 3 else img
    noisy = to_uint8(gray + rng.normal(0.0, sigma, gray.shape))
    return np.repeat(noisy[..., None], img.shape[2], 2) if img.ndim == 3 else noisy


def resolution(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A coarser detector or an archived thumbnail: down by 2, 3, 5 (area), back up
    bilinearly."""
    return down_and_up(img, (2.0, 3.0, 5.0)[severity - 1])


def crop(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A narrower field of view: 5, 10, 18% cut from each side, the rest scaled back up."""
    cut = (0.05, 0.10, 0.18)[severity - 1]
    h, w = img.shape[:2]
    dy, dx = round(h * cut), round(w * cut)
    return cv2.resize(img[dy : h - dy, dx : w - dx], (w, h), interpolation=cv2.INTER_LINEAR)


def collimation(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """Collimator shutters: 6, 12, 20% of each side left unexposed (white, as on film)."""
    cut = (0.06, 0.12, 0.20)[severity - 1]
    h, w = img.shape[:2]
    dy, dx = round(h * cut), round(w * cut)
    out = np.full_like(img, 255)
    out[dy : h - dy, dx : w - dx] = img[dy : h - dy, dx : w - dx]
    return out


def jpeg(img: np.ndarray, severity: int, rng: np.random.Generator) -> np.ndarray:
    """A lossy archive or teleradiology link: JPEG re-compression at quality 30, 15, 6."""
    quality = (30, 15, 6)[severity - 1]
    gray = img[..., 0] if img.ndim == 3 else img
    _, data = cv2.imencode(".jpg", np.ascontiguousarray(gray), [cv2.IMWRITE_JPEG_QUALITY, quality])
    out = cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)
    return np.repeat(out[..., None], img.shape[2], 2) if img.ndim == 3 else out


SHIFTS: dict[str, Shift] = {
    "gamma": gamma,
    "contrast": contrast,
    "blur": blur,
    "noise": noise,
    "resolution": resolution,
    "crop": crop,
    "collimation": collimation,
    "jpeg": jpeg,
}


def check_shifts(names: Sequence[str] | None, key: str = "eval.stress_shifts") -> list[str]:
    """The shift names (all when None), or a ConfigError naming `key` and the choices.

    Args:
        names: shift names, or None for all.
        key: the config key the names came from, for the error.
    """
    names = list(SHIFTS) if names is None else list(names)
    unknown = [n for n in names if n not in SHIFTS]
    if unknown or not names:
        raise ConfigError(
            f"{key}={names} names unknown shifts {unknown}; choices: {', '.join(SHIFTS)}."
        )
    return names


def apply(img: np.ndarray, name: str, severity: int, rng: np.random.Generator) -> np.ndarray:
    """`img` (uint8 HxW or HxWx3) under shift `name` at `severity` (1..SEVERITIES).

    Args:
        img: decoded gray pixels (HxW, or HxWx3 with equal channels), before any intensity
            standardisation.
        name: a key of `SHIFTS`: gamma, contrast, blur, noise, resolution, crop,
            collimation, jpeg.
        severity: 1 (barely visible) to 3 (obvious).
        rng: the randomness (noise), so that a shifted image is reproducible.

    Example:
        >>> darker = apply(gray, "gamma", 2, np.random.default_rng(0))
    """
    if not 1 <= severity <= SEVERITIES:
        raise ValueError(f"severity must be in 1..{SEVERITIES}, got {severity}")
    out = SHIFTS[name](np.ascontiguousarray(img), severity, rng)
    return out.reshape(img.shape)


class RandomAcquisition:
    """Training augmentation: with probability `p`, one random shift at a random severity.

    Picklable (data loader workers); the randomness comes from NumPy's global generator, which
    Lightning seeds per worker (`seed_everything(workers=True)`).

    Args:
        p: the share of images shifted.
        max_severity: severities 1..max_severity are drawn.
    """

    def __init__(self, p: float = 0.5, max_severity: int = 2) -> None:
        self.p, self.max_severity = p, max_severity

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if np.random.random() >= self.p:
            return img
        rng = np.random.default_rng(np.random.randint(0, 2**31))
        name = list(SHIFTS)[rng.integers(len(SHIFTS))]
        return apply(img, name, int(rng.integers(1, self.max_severity + 1)), rng)
