"""The bootstrap computed from draw counts (one sort, blocks of resamples) gives exactly the
numbers of the straightforward version it replaced: resampled arrays, one rank per resample."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import rankdata

from medx.evaluation import metrics
from medx.evaluation.metrics import auroc, bootstrap_ci, predictions, rates, resample_counts


# --- the previous implementation, kept verbatim as the reference ---------------------------
def reference_auroc(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    classes = [1] if probs.shape[-1] == 2 else range(probs.shape[-1])
    per_class = []
    for c in classes:
        pos = labels == c
        n_pos, n_neg = pos.sum(1), (~pos).sum(1)
        ranks = rankdata(probs[..., c], axis=-1)
        u = (ranks * pos).sum(1) - n_pos * (n_pos + 1) / 2
        with np.errstate(invalid="ignore", divide="ignore"):
            per_class.append(np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan))
    return np.mean(per_class, axis=0)


def reference_rates(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict:
    classes = [1] if num_classes == 2 else range(num_classes)
    out: dict[str, list[np.ndarray]] = {"sensitivity": [], "specificity": [], "ppv": [], "npv": []}
    for c in classes:
        truth, said = labels == c, preds == c
        tp, fn = (truth & said).sum(1), (truth & ~said).sum(1)
        tn, fp = (~truth & ~said).sum(1), (~truth & said).sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["sensitivity"].append(tp / (tp + fn))
            out["specificity"].append(tn / (tn + fp))
            out["ppv"].append(tp / (tp + fp))
            out["npv"].append(tn / (tn + fn))
    return {k: np.mean(v, axis=0) for k, v in out.items()}


def reference_bootstrap_ci(labels, probs, n_boot=1000, seed=0, level=0.95, threshold=None):
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    y, p = labels[index], probs[index]
    values = {"auroc": reference_auroc(y, p)}
    values.update(
        reference_rates(
            y,
            predictions(p.reshape(-1, probs.shape[1]), threshold).reshape(y.shape),
            probs.shape[1],
        )
    )
    alpha = (1 - level) / 2 * 100
    cis = {}
    for name in ("auroc", "sensitivity", "specificity"):
        v = values[name][np.isfinite(values[name])]
        if len(v):
            low, high = np.percentile(v, [alpha, 100 - alpha])
            cis[name] = (float(low), float(high))
    return cis


# --- data ------------------------------------------------------------------------------------
def predictions_of(n: int, classes: int, seed: int, decimals: int | None = 2):
    """Labels and probabilities of a fair model; rounded, so that many scores tie."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(size=(n, classes)) + 1.5 * np.eye(classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs if decimals is None else probs.round(decimals)


CASES = [
    pytest.param(300, 2, 2, id="binary-ties"),
    pytest.param(257, 2, None, id="binary-no-ties"),
    pytest.param(240, 3, 2, id="three-classes-ties"),
    pytest.param(7, 2, 1, id="tiny-some-resamples-one-class"),
]


@pytest.mark.parametrize(("n", "classes", "decimals"), CASES)
def test_each_resample_scores_as_before(n: int, classes: int, decimals: int | None):
    labels, probs = predictions_of(n, classes, seed=n, decimals=decimals)
    rng = np.random.default_rng(5)
    index = rng.integers(0, n, size=(200, n))
    (counts,) = resample_counts(n, 200, seed=5)
    preds = predictions(probs)

    np.testing.assert_array_equal(
        auroc(labels, probs, counts), reference_auroc(labels[index], probs[index])
    )
    new, old = (
        rates(labels, preds, classes, counts),
        reference_rates(labels[index], preds[index], classes),
    )
    for name in old:
        np.testing.assert_array_equal(new[name], old[name], err_msg=name)


@pytest.mark.parametrize(("n", "classes", "decimals"), CASES)
@pytest.mark.parametrize("threshold", [None, 0.4])
def test_confidence_intervals_are_the_same_numbers(
    n: int, classes: int, decimals: int | None, threshold: float | None
):
    labels, probs = predictions_of(n, classes, seed=n + 1, decimals=decimals)
    threshold = threshold if classes == 2 else None

    assert bootstrap_ci(labels, probs, 1000, 3, threshold=threshold) == reference_bootstrap_ci(
        labels, probs, 1000, 3, threshold=threshold
    )


def test_blocks_of_resamples_do_not_change_the_intervals(monkeypatch: pytest.MonkeyPatch):
    labels, probs = predictions_of(500, 2, seed=9)
    whole = bootstrap_ci(labels, probs, 300, seed=1)

    monkeypatch.setattr(metrics, "RESAMPLED_AT_ONCE", 500 * 7)  # 7 resamples per block

    assert len(list(resample_counts(500, 300, seed=1))) == 43
    assert bootstrap_ci(labels, probs, 300, seed=1) == whole


def test_counts_are_draws_of_every_image_per_resample():
    counts = np.concatenate(list(resample_counts(50, 120, seed=0)))

    assert counts.shape == (120, 50)
    assert (counts.sum(1) == 50).all()  # each resample draws n images
    assert 0.5 < (counts == 0).mean() / np.exp(-1) < 1.5  # ~1/e of images left out each time
