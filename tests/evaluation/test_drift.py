"""The shift monitor's statistics (medx.evaluation.drift) on features with a known answer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from medx.evaluation.drift import ShiftReference, mmd_test
from medx.inference.shift import ShiftMonitor, ShiftUnavailable, unavailable_reason

MIXING = np.random.default_rng(0).normal(size=(256, 24))


def features(n: int, seed: int, shift: float = 0.0) -> np.ndarray:
    """ReLU features of a 24-D latent: 256-D, like a small network's penultimate layer."""
    latent = np.random.default_rng(seed).normal(size=(n, 24))
    latent[:, :3] += shift
    return np.maximum(latent @ MIXING.T, 0)


@pytest.fixture(scope="module")
def reference() -> ShiftReference:
    return ShiftReference.fit(features(500, seed=1), np.random.default_rng(1).random(500))


def test_a_reference_is_plain_compact_and_survives_a_weights_only_checkpoint(
    reference: ShiftReference, tmp_path: Path
):
    entry = reference.to_dict()
    assert len(json.dumps(entry)) < 50_000  # JSON-able and tens of kB
    torch.save({"card": {"shift_reference": entry}}, tmp_path / "x.ckpt")
    loaded = torch.load(tmp_path / "x.ckpt", weights_only=True)["card"]["shift_reference"]
    again = ShiftReference.from_dict(loaded)
    x = features(10, seed=2)
    assert np.allclose(again.coordinates(x), reference.coordinates(x))
    assert again.test(x).p_value == reference.test(x).p_value


def test_in_distribution_batches_are_rarely_flagged_and_shifted_ones_are(
    reference: ShiftReference,
):
    alarms = [reference.test(features(100, seed=100 + i)).shifted for i in range(100)]
    assert np.mean(alarms) <= 0.05  # alarm level 1%
    shifted = [reference.test(features(100, seed=300 + i, shift=1.0)) for i in range(10)]
    assert all(r.shifted and r.effect > 3 for r in shifted)
    scores, flags = reference.ood(features(2000, seed=3))
    assert 0.0 <= flags.mean() <= 0.03 and np.median(scores) < 2  # threshold: val's 99%


def test_the_permutation_p_value_is_uniform_under_the_null():
    rng = np.random.default_rng(4)
    p = [
        mmd_test(rng.normal(size=(60, 3)), rng.normal(size=(40, 3)), 2.0, 200, i)[0]
        for i in range(200)
    ]
    assert 0.35 < np.mean(p) < 0.65 and np.mean(np.array(p) < 0.1) < 0.17


def test_a_service_window_collects_then_tests(reference: ShiftReference):
    monitor = ShiftMonitor(reference, window=50, min_images=20)
    monitor.observe(features(10, seed=5), [0.5] * 10)
    assert monitor.window()["status"] == "collecting"
    monitor.observe(features(80, seed=6, shift=1.5), [0.9] * 80)
    found = monitor.window()
    assert found["status"] == "tested" and found["images"] == 50 and found["seen"] == 90
    assert found["shifted"] and json.dumps(found)


def test_a_card_without_reference_says_how_to_add_one():
    reason = unavailable_reason({"module": "medx.models.classifier.ClassificationModule"}, "m.ckpt")
    assert "no shift reference" in reason and "python -m medx.eval ckpt_path=m.ckpt" in reason
    with pytest.raises(ShiftUnavailable, match=r"medx\.eval"):
        ShiftMonitor.from_card({}, "m.ckpt")
    broken = {"shift_reference": {"version": 99}}
    assert "cannot be read" in unavailable_reason(broken, "m.ckpt")
