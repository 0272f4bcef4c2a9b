"""Quality features against hand-computed values, monotonic behaviour and awkward input."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from medx.errors import DataError
from medx.quality.degradations import degrade
from medx.quality.features import FEATURES, image_features


def feats(img: np.ndarray) -> dict[str, float]:
    return dict(zip(FEATURES, image_features(img), strict=True))


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    """A textured 8-bit image with structure at several scales."""
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.random((16, 16), dtype=np.float32), (128, 128))
    fine = cv2.GaussianBlur(rng.random((128, 128), dtype=np.float32), (0, 0), 1.0)
    return np.clip((0.6 * base + 0.8 * fine - 0.2) * 255, 0, 255).astype(np.uint8)


def test_constant_image_has_zero_sharpness_contrast_entropy_and_noise():
    f = feats(np.full((32, 32), 51, np.uint8))

    assert f["laplacian_var"] == 0 and f["tenengrad"] == 0 and f["noise_sigma"] == 0
    assert f["contrast"] == 0 and f["entropy"] == 0 and f["dynamic_range"] == 0
    assert f["brightness"] == pytest.approx(0.2)
    assert f["snr"] == pytest.approx(20 * np.log10((0.2 + 1 / 1024) / (1 / 1024)))
    assert f["blockiness"] == 1.0
    assert np.isfinite(list(f.values())).all()


def test_two_level_image_by_hand():
    """Left half 0, right half 255 (8x8): every value follows from the definitions."""
    img = np.zeros((8, 8), np.uint8)
    img[:, 4:] = 255
    f = feats(img)

    assert f["brightness"] == pytest.approx(0.5)
    assert f["contrast"] == pytest.approx(0.5)
    assert f["entropy"] == pytest.approx(1.0)  # two equally full bins: 1 bit
    assert f["underexposed"] == pytest.approx(0.5) and f["overexposed"] == pytest.approx(0.5)
    assert f["dynamic_range"] == pytest.approx(1.0)
    # Laplacian [[0,1,0],[1,-4,1],[0,1,0]]: +1 in column 3, -1 in column 4, 0 elsewhere
    # (rows are constant, reflected borders add nothing): variance = 16/64 - 0² = 0.25.
    assert f["laplacian_var"] == pytest.approx(0.25)
    # Sobel x = 4 in columns 3 and 4 ([1,2,1] x a unit step), Sobel y = 0: 16 of 64 pixels
    # have Gx² = 16, so the mean is 16/64·16 = 4.
    assert f["tenengrad"] == pytest.approx(4.0)


def test_laplacian_variance_matches_a_numpy_reference(texture: np.ndarray):
    unit = texture.astype(np.float64) / 255
    p = np.pad(unit, 1, mode="reflect")  # NumPy's "reflect" is OpenCV's BORDER_REFLECT_101
    lap = p[:-2, 1:-1] + p[2:, 1:-1] + p[1:-1, :-2] + p[1:-1, 2:] - 4 * unit
    counts = np.bincount(texture.ravel(), minlength=256) / texture.size
    nz = counts[counts > 0]

    f = feats(texture)

    assert f["laplacian_var"] == pytest.approx(lap.var(), rel=1e-6)
    assert f["contrast"] == pytest.approx(unit.std(), rel=1e-6)
    assert f["entropy"] == pytest.approx(-(nz * np.log2(nz)).sum(), rel=1e-6)


def test_noise_sigma_matches_immerkaers_formula(texture: np.ndarray):
    """The 3x3 mask M of the docstring, summed over interior pixels, 8- and 16-bit alike."""
    unit = texture.astype(np.float64) / 255
    m = np.array([[1, -2, 1], [-2, 4, -2], [1, -2, 1]])
    h, w = unit.shape
    conv = sum(m[i, j] * unit[i : h - 2 + i, j : w - 2 + j] for i in range(3) for j in range(3))
    sigma = np.sqrt(np.pi / 2) * np.abs(conv).sum() / (6 * (w - 2) * (h - 2))

    assert feats(texture)["noise_sigma"] == pytest.approx(sigma, rel=1e-9)
    sixteen = texture.astype(np.uint16) * 257  # the same image at full 16-bit range
    assert feats(sixteen)["noise_sigma"] == pytest.approx(sigma, rel=1e-6)


def test_blur_lowers_sharpness_monotonically(texture: np.ndarray):
    blurred = [texture] + [cv2.GaussianBlur(texture, (0, 0), s) for s in (0.7, 1.5, 3, 6)]
    lap = [feats(b)["laplacian_var"] for b in blurred]
    ten = [feats(b)["tenengrad"] for b in blurred]

    assert lap == sorted(lap, reverse=True) and len(set(lap)) == len(lap)
    assert ten == sorted(ten, reverse=True) and len(set(ten)) == len(ten)


def test_noise_lowers_snr_and_is_estimated():
    rng = np.random.default_rng(1)
    flat = np.full((256, 256), 128.0)
    snr, sigma = [], []
    for s in (2, 5, 10, 20):
        f = feats(np.clip(np.rint(flat + rng.normal(0, s, flat.shape)), 0, 255).astype(np.uint8))
        snr.append(f["snr"])
        sigma.append(f["noise_sigma"])
        assert f["noise_sigma"] == pytest.approx(s / 255, rel=0.1)  # Immerkær on a flat image
    assert snr == sorted(snr, reverse=True)


def test_jpeg_raises_blockiness(texture: np.ndarray):
    big = cv2.resize(texture, (256, 256))
    assert feats(degrade(big, "jpeg", 1.0, 0))["blockiness"] > feats(big)["blockiness"] + 0.1


def test_sixteen_bit_rgba_and_float_input(texture: np.ndarray):
    twelve_bit = texture.astype(np.uint16) * 16  # 12-bit data in a 16-bit container
    rgba = np.dstack([np.repeat(texture[:, :, None], 3, 2), np.zeros_like(texture)])

    eight = image_features(texture)
    assert image_features(twelve_bit) == pytest.approx(eight, rel=0.02, abs=1e-3)
    assert image_features(rgba) == pytest.approx(eight)
    assert image_features(texture / 255.0) == pytest.approx(eight, rel=1e-4, abs=1e-6)
    assert np.isfinite(image_features(np.zeros((3, 3), np.uint16))).all()


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (np.zeros((2, 50), np.uint8), "too small"),
        (np.full((8, 8), np.nan, np.float32), "NaN"),
        (np.zeros((4, 4, 5), np.uint8), "shape"),
    ],
)
def test_bad_input_is_a_clear_error(image: np.ndarray, message: str):
    with pytest.raises(DataError, match=message):
        image_features(image)
