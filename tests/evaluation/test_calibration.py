"""ECE/MCE and temperature scaling on synthetic data whose calibration is known."""

from __future__ import annotations

import numpy as np
import pytest

from medx.evaluation.calibration import fit_temperature, nll, reliability, softmax


def test_ece_of_perfectly_calibrated_data_is_about_zero():
    rng = np.random.default_rng(0)
    p = rng.uniform(0.5, 1.0, 200_000)  # top-label confidence
    correct = rng.uniform(size=p.size) < p  # right exactly as often as it claims
    labels = np.where(correct, 1, 0)
    probs = np.stack([1 - p, p], 1)

    rel = reliability(labels, probs)

    assert rel.ece < 0.01
    assert rel.mce < 0.03


def test_a_model_always_sure_and_half_right_has_ece_one_half():
    labels = np.arange(1000) % 2
    probs = np.tile([[0.0, 1.0]], (1000, 1))
    rel = reliability(labels, probs)
    assert rel.ece == pytest.approx(0.5) and rel.mce == pytest.approx(0.5)


def test_temperature_scaling_lowers_nll_of_overconfident_logits():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 2000)
    features = rng.normal(size=(2000, 3)) + 1.5 * np.eye(3)[labels]
    honest = 1.5 * features  # the exact posterior logits of this Gaussian mixture
    overconfident = 4.0 * honest  # same ranking, probabilities pushed to 0 and 1

    t = fit_temperature(overconfident, labels)

    assert t == pytest.approx(4.0, rel=0.15)  # it undoes the sharpening
    assert nll(overconfident, labels, t) < 0.7 * nll(overconfident, labels)
    before = reliability(labels, softmax(overconfident)).ece
    assert reliability(labels, softmax(overconfident, t)).ece < before / 2
