"""Degradations: reproducible from the seed, visible, and unknown names listed."""

from __future__ import annotations

import numpy as np
import pytest

from medx.errors import ConfigError
from medx.quality.degradations import DEGRADATIONS, check_degradations, degrade


@pytest.mark.parametrize("name", sorted(DEGRADATIONS))
def test_each_degradation_changes_the_image_reproducibly(name: str):
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(120, 30, (96, 80)), 0, 255).astype(np.uint8)

    out = degrade(img, name, 0.5, seed=3)

    assert out.shape == img.shape and out.dtype == np.uint8
    assert np.abs(out.astype(int) - img).mean() > 1
    assert np.array_equal(out, degrade(img, name, 0.5, seed=3))


def test_unknown_degradation_lists_the_choices():
    with pytest.raises(ConfigError, match=r"gaussian_blur.*downsample"):
        check_degradations({"gausian_blur": [0, 1]})
    with pytest.raises(ConfigError, match=r"0 <= low <= high <= 1"):
        check_degradations({"jpeg": [0.5, 2]})
