"""Synthetic acquisition degradations of gray uint8 images, each driven by one severity in [0, 1].

Why: real "bad" radiographs are rare and unlabelled, so the quality task is built by degrading
clean images. Each degradation maps severity 0 to a mild, still visible defect and 1 to a gross
one; lengths are relative to the image width (reference 256 px), so a 128 px phantom and a
2048 px radiograph get the same look. Randomness (noise, motion direction) comes only from the
`rng` passed in, so a degraded image is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import cv2
import numpy as np

from medx.errors import ConfigError

Degradation = Callable[[np.ndarray, float, np.random.Generator], np.ndarray]


def scaled_length(img: np.ndarray, length: float) -> float:
    """A length given for a 256-px-wide image, scaled to this image (also
    `medx.data.acquisition`'s unit)."""
    return length * img.shape[1] / 256


def to_uint8(values: np.ndarray) -> np.ndarray:
    """Gray levels rounded and clipped to uint8."""
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def down_and_up(img: np.ndarray, factor: float) -> np.ndarray:
    """Shrunk by `factor` (area) and scaled back to its size (bilinear): resolution lost."""
    h, w = img.shape[:2]
    small = cv2.resize(
        img, (max(1, round(w / factor)), max(1, round(h / factor))), interpolation=cv2.INTER_AREA
    )
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def gaussian_blur(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Defocus / patient motion in all directions: σ from 1.2 to 4 px (256-px reference)."""
    return cv2.GaussianBlur(img, (0, 0), scaled_length(img, 1.2 + 2.8 * severity))


def motion_blur(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Breathing or patient motion: a line kernel of 4 to 16 px at a random angle."""
    length = max(3, round(scaled_length(img, 4 + 12 * severity)))
    kernel = np.zeros((length, length), np.float32)
    kernel[length // 2, :] = 1.0
    angle = float(rng.uniform(0, 180))
    rotation = cv2.getRotationMatrix2D(((length - 1) / 2, (length - 1) / 2), angle, 1.0)
    kernel = cv2.warpAffine(kernel, rotation, (length, length))
    return cv2.filter2D(img, -1, kernel / max(kernel.sum(), 1e-6))


def gaussian_noise(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Electronic (read-out) noise: additive, σ from 4 to 25 gray levels."""
    sigma = 4 + 21 * severity
    return to_uint8(img + rng.normal(0.0, sigma, img.shape))


def poisson_noise(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Quantum noise of a low dose: counts ~ Poisson(I·peak), peak from 400 to 15 photons."""
    peak = 400 * (15 / 400) ** severity
    counts = rng.poisson(img.astype(np.float64) / 255 * peak)
    return to_uint8(counts / peak * 255)


def low_contrast(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Scatter / wrong windowing: intensities pulled toward the mean, to 55% .. 20% contrast."""
    factor = 0.55 - 0.35 * severity
    mean = float(img.mean())
    return to_uint8(mean + (img.astype(np.float32) - mean) * factor)


def underexposure(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Too dark: gamma 1.6 .. 3 and gain 0.7 .. 0.35, crushing the dark end."""
    unit = img.astype(np.float32) / 255
    return to_uint8(255 * unit ** (1.6 + 1.4 * severity) * (0.7 - 0.35 * severity))


def overexposure(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Burnt out: gain 1.4 .. 2.2 plus offset, saturating the bright end."""
    return to_uint8(img.astype(np.float32) * (1.4 + 0.8 * severity) + 20 + 40 * severity)


def jpeg(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Heavy lossy compression: JPEG quality 25 .. 3 (8x8 blocks, ringing)."""
    quality = round(25 - 22 * severity)
    _, data = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
    return cv2.imdecode(data, cv2.IMREAD_GRAYSCALE)


def downsample(img: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Low resolution upscaled for display: down by 2.5 .. 6 (area), back up bilinearly."""
    return down_and_up(img, 2.5 + 3.5 * severity)


DEGRADATIONS: dict[str, Degradation] = {
    "gaussian_blur": gaussian_blur,
    "motion_blur": motion_blur,
    "gaussian_noise": gaussian_noise,
    "poisson_noise": poisson_noise,
    "low_contrast": low_contrast,
    "underexposure": underexposure,
    "overexposure": overexposure,
    "jpeg": jpeg,
    "downsample": downsample,
}


def check_degradations(ranges: Mapping[str, Sequence[float]]) -> dict[str, tuple[float, float]]:
    """{name: (low, high)} severity ranges, validated; ConfigError lists the choices."""
    if not ranges:
        raise ConfigError(f"data.degradations is empty; choose some of: {', '.join(DEGRADATIONS)}.")
    checked = {}
    for name, bounds in ranges.items():
        if name not in DEGRADATIONS:
            raise ConfigError(
                f"Unknown degradation {name!r} in data.degradations; choices: "
                f"{', '.join(DEGRADATIONS)}."
            )
        low, high = (float(b) for b in bounds)
        if not 0 <= low <= high <= 1:
            raise ConfigError(
                f"data.degradations.{name}={list(bounds)}: a severity range [low, high] "
                "with 0 <= low <= high <= 1."
            )
        checked[name] = (low, high)
    return checked


def degrade(img: np.ndarray, name: str, severity: float, seed: int) -> np.ndarray:
    """Apply degradation `name` to a gray uint8 image, reproducibly from `seed`."""
    if name not in DEGRADATIONS:
        raise ConfigError(f"Unknown degradation {name!r}; choices: {', '.join(DEGRADATIONS)}.")
    return DEGRADATIONS[name](img, severity, np.random.default_rng(seed))
