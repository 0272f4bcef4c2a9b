"""Metrics, bootstrap CIs and the operating point on synthetic scores with known behaviour."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from sklearn.metrics import recall_score, roc_auc_score

from medx.evaluation.metrics import (
    bootstrap_ci,
    classification_metrics,
    report,
    threshold_for_sensitivity,
)


def scored(n: int, seed: int = 0, separation: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Binary labels and (n, 2) probabilities: positives score higher by `separation` logits."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    z = rng.normal(size=n) + separation * labels
    p = 1 / (1 + np.exp(-z))
    return labels, np.stack([1 - p, p], 1)


def test_binary_metrics_agree_with_scikit_learn():
    labels, probs = scored(300)

    m = classification_metrics(labels, probs)

    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs[:, 1]))
    assert m["sensitivity"] == pytest.approx(recall_score(labels, probs.argmax(1)))
    assert m["specificity"] == pytest.approx(recall_score(1 - labels, 1 - probs.argmax(1)))
    assert set(m) == {
        "acc", "balanced_acc", "auroc", "auprc", "f1", "sensitivity", "specificity", "ppv", "npv"
    }  # fmt: skip


def test_multiclass_is_macro_one_vs_rest_with_a_per_class_report():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 3, 200)
    logits = rng.normal(size=(200, 3)) + 2 * np.eye(3)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)

    m = classification_metrics(labels, probs)

    assert m["auroc"] == pytest.approx(roc_auc_score(labels, probs, multi_class="ovr"))
    text = report(labels, probs, ["a", "b", "c"])
    assert "precision" in text and "support" in text and "macro avg" in text


def test_ci_contains_the_point_estimate_and_narrows_with_more_samples():
    widths = []
    for n in (100, 1600):
        labels, probs = scored(n, seed=n)
        point = classification_metrics(labels, probs)

        cis = bootstrap_ci(labels, probs, n_boot=500, seed=0)

        for name, (low, high) in cis.items():
            assert low <= point[name] <= high, name
        widths.append(cis["auroc"][1] - cis["auroc"][0])
    assert widths[1] < widths[0] / 2  # ~1/sqrt(n): 4x narrower for 16x the samples


def test_ci_is_reproducible_from_its_seed():
    labels, probs = scored(200)
    assert bootstrap_ci(labels, probs, 200, seed=3) == bootstrap_ci(labels, probs, 200, seed=3)


@pytest.mark.parametrize("target", [0.8, 0.95, 1.0])
def test_val_threshold_reaches_the_target_sensitivity_on_val(target: float):
    labels, probs = scored(501, seed=7)

    t = threshold_for_sensitivity(labels, probs[:, 1], target)

    at_op = classification_metrics(labels, probs, threshold=t)
    assert at_op["sensitivity"] >= target
    # the highest such threshold: one step up would miss the target
    above = probs[:, 1][(labels == 1) & (probs[:, 1] > t)]
    assert len(above) / (labels == 1).sum() < target


def test_one_class_split_warns_and_keeps_the_defined_metrics(caplog):
    labels = np.ones(20, dtype=int)
    probs = np.stack([np.linspace(0.1, 0.9, 20), np.linspace(0.9, 0.1, 20)], 1)

    with caplog.at_level(logging.WARNING):
        m = classification_metrics(labels, probs)
        cis = bootstrap_ci(labels, probs, n_boot=50)

    assert "auroc" not in m and "auprc" not in m and "specificity" not in m
    assert m["sensitivity"] == pytest.approx(0.5) and "acc" in m
    assert "auroc" in caplog.text and "undefined" in caplog.text
    assert set(cis) == {"sensitivity"}
