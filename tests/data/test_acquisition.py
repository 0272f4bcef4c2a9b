"""Simulated acquisition shifts on a real chest X-ray: graded, reproducible, shape-keeping;
the `acquisition` augmentation and the shifted-image dataset built on them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from medx.data.acquisition import SEVERITIES, SHIFTS, apply, check_shifts
from medx.data.io import read_image
from medx.data.shifted import ShiftedImages
from medx.data.transforms import ImageTransform
from medx.errors import ConfigError


@pytest.fixture(scope="module")
def xray(medx_data: Path) -> Path:
    return sorted((medx_data / "chest_xray" / "train" / "NORMAL").glob("*.jpeg"))[0]


@pytest.mark.parametrize("name", list(SHIFTS))
def test_each_shift_departs_further_from_the_image_at_each_severity(name: str, xray: Path):
    image = read_image(xray)  # HxWx3, R = G = B
    shifted = [apply(image, name, k, np.random.default_rng(0)) for k in range(1, SEVERITIES + 1)]
    distance = [np.abs(s.astype(float) - image).mean() for s in shifted]
    assert all(s.shape == image.shape and s.dtype == np.uint8 for s in shifted)
    assert all((s[..., 0] == s[..., 2]).all() for s in shifted)  # still gray
    assert 0 < distance[0] < distance[1] < distance[2], distance
    again = apply(image, name, SEVERITIES, np.random.default_rng(0))
    assert (again == shifted[-1]).all()  # seeded: reproducible


def test_unknown_shift_names_are_a_config_error():
    with pytest.raises(ConfigError, match=r"eval\.stress_shifts.*'glare'.*choices: gamma"):
        check_shifts(["gamma", "glare"])


def test_the_acquisition_augmentation_changes_pixels_but_not_the_tensor_contract(xray: Path):
    image = read_image(xray)
    np.random.seed(0)
    transform = ImageTransform(64, "acquisition")
    views = [transform(image) for _ in range(8)]
    assert all(v.shape == (3, 64, 64) and v.dtype == torch.float32 for v in views)
    assert all(float(v.min()) >= 0 and float(v.max()) <= 1 for v in views)
    plain = ImageTransform(64, "none")(image)
    assert any(float((v - plain).abs().mean()) > 0.02 for v in views)


def test_shifted_images_read_clean_copies_as_the_model_does(xray: Path):
    clean = ShiftedImages([xray], [0], 64, "zscore")
    assert (clean.pixels(0) == read_image(xray, "zscore")).all()
    noisy = ShiftedImages([xray], [0], 64, "zscore", "noise", 3, seed=1)
    assert (
        noisy.pixels(0) == ShiftedImages([xray], [0], 64, "zscore", "noise", 3, 1).pixels(0)
    ).all()
    assert not (noisy.pixels(0) == clean.pixels(0)).all()
    # zscore undoes a gain and an offset, not a gamma: the shift survives standardisation
    gamma = ShiftedImages([xray], [0], 64, "zscore", "gamma", 3)
    assert np.abs(gamma.pixels(0).astype(float) - clean.pixels(0)).mean() > 5


def test_augment_acquisition_is_a_valid_choice_for_a_run():
    from medx import schema
    from medx.config import compose

    schema.check(compose(["data.augment=acquisition"]))  # no ConfigError
    with pytest.raises(ConfigError, match=r"data\.augment=.*acquisition"):
        schema.check(compose(["data.augment=scanner"]))
