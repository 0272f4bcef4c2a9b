"""Site calibration statistics (medx.evaluation.site) on scores with a known answer."""

from __future__ import annotations

import numpy as np
import pytest

from medx.errors import DataError
from medx.evaluation import metrics, site


def sample(n: int, seed: int, offset: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Binary logits (n, 2): positives score higher, and the whole site is `offset` lower."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    margin = 1.5 * labels + rng.normal(size=n) - offset
    return np.column_stack([np.zeros(n), margin]), labels


def test_the_threshold_reaches_the_target_on_new_images_of_the_site_within_its_interval():
    logits, labels = sample(400, seed=0, offset=2.0)
    found = site.recalibrate(logits, labels, 0.9, n_boot=300)
    assert found.sensitivity >= 0.9
    low, high = found.sensitivity_ci
    assert low < 0.9 < high and high - low < 0.25  # out-of-bag: ~75 positives a draw
    new_logits, new_labels = sample(4000, seed=1, offset=2.0)
    p = np.exp(new_logits[:, 1]) / np.exp(new_logits).sum(1)
    sens = metrics.rates(new_labels, (p >= found.threshold).astype(int), 2)["sensitivity"][0]
    assert low <= sens <= high
    assert found.threshold_ci[0] <= found.threshold <= found.threshold_ci[1]


def test_the_card_keeps_the_replaced_operating_point_and_records_provenance():
    logits, labels = sample(200, seed=2)
    found = site.recalibrate(logits, labels, 0.95, n_boot=50)
    card = {
        "operating_point": {"threshold": 0.3, "target_sensitivity": 0.95, "chosen_on": "val"},
        "previous_operating_points": [{"threshold": 0.5}],
        "calibration": {"temperature": 1.4, "fitted_on": "val"},
    }
    entries = site.card_entries(card, found, {"by": "medx.calibrate", "class_counts": {"a": 1}})
    assert [p["threshold"] for p in entries["previous_operating_points"]] == [0.5, 0.3]
    assert entries["operating_point"]["provenance"]["images"] == 200
    assert entries["operating_point"]["scale"] == "raw"
    assert entries["calibration"]["provenance"]["previous_temperature"] == 1.4
    assert card["previous_operating_points"] == [{"threshold": 0.5}]  # the input is not changed


def test_unfit_samples_are_refused_and_small_ones_warned():
    names = ["NORMAL", "PNEUMONIA"]
    with pytest.raises(DataError, match="no image of class PNEUMONIA"):
        site.check_sample(np.zeros(30, int), names, "site/")
    with pytest.raises(DataError, match=r"too few images \(PNEUMONIA: 3"):
        site.check_sample(np.r_[np.zeros(30, int), np.ones(3, int)], names, "site/")
    warnings = site.check_sample(np.r_[np.zeros(60, int), np.ones(20, int)], names, "site/")
    assert len(warnings) == 1 and "only 20 PNEUMONIA" in warnings[0]
