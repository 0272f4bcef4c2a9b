"""Classification metrics on (labels, probabilities), NumPy + scikit-learn, no torch.

Binary tasks score the probability of class 1 (the classifier's positive class); multi-class
tasks average one-vs-rest per class (macro). Point estimates and bootstrap resamples go through
the same vectorised functions, so a CI is always about the number reported next to it.
A split with one class only leaves AUROC/AUPRC (and the rate of the missing class) undefined:
they are left out with a warning rather than crashing or reported as NaN.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Sequence

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    classification_report,
    confusion_matrix,
    f1_score,
)

log = logging.getLogger(__name__)

CI_METRICS = ("auroc", "sensitivity", "specificity")


def predictions(probs: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Class predictions: argmax, or for binary tasks `p(class 1) >= threshold` when given."""
    if threshold is not None and probs.shape[1] == 2:
        return (probs[:, 1] >= threshold).astype(int)
    return probs.argmax(1)


def auroc(labels: np.ndarray, probs: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """AUROC of labels (n,) and probs (n, K) per row of `counts` (B, n), how often each image
    counts (a bootstrap resample's draws; None: each once, B = 1). Macro one-vs-rest if K > 2.

    Mann-Whitney form: the count-weighted share of positive-negative pairs the positive wins,
    ties counted half, as scikit-learn does. One sort of the scores serves every resample (a
    resample holds the same scores, only repeated), so B resamples cost O(B n), not B sorts.
    NaN for a row (or, when multi-class, a class) that lacks positives or negatives.
    """
    counts = np.ones((1, len(labels)), dtype=np.int64) if counts is None else counts
    classes = [1] if probs.shape[-1] == 2 else range(probs.shape[-1])
    per_class = []
    for c in classes:
        order = np.argsort(probs[:, c], kind="stable")
        scores = probs[order, c]
        ties = np.flatnonzero(np.r_[True, scores[1:] != scores[:-1]])  # first of each score
        pos = labels[order] == c
        drawn = counts[:, order]
        n_pos_at = drawn * pos  # (B, distinct scores) once ties are summed
        n_neg_at = drawn - n_pos_at
        if len(ties) < len(scores):
            n_pos_at = np.add.reduceat(n_pos_at, ties, axis=1)
            n_neg_at = np.add.reduceat(n_neg_at, ties, axis=1)
        below = np.cumsum(n_neg_at, axis=1) - n_neg_at  # negatives scoring lower
        twice_u = (n_pos_at * (2 * below + n_neg_at)).sum(1)  # integers: exact
        n_pos, n_neg = n_pos_at.sum(1), n_neg_at.sum(1)
        with np.errstate(invalid="ignore", divide="ignore"):
            u = twice_u / 2
            per_class.append(np.where((n_pos > 0) & (n_neg > 0), u / (n_pos * n_neg), np.nan))
    return np.mean(per_class, axis=0)


def rates(
    labels: np.ndarray, preds: np.ndarray, num_classes: int, counts: np.ndarray | None = None
) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV of labels and predictions (n,) per row of `counts`
    (B, n), as in `auroc`; macro over classes if K > 2.

    A rate whose denominator is empty (e.g. sensitivity without positives) is NaN.
    """
    counts = np.ones((1, len(labels)), dtype=np.int64) if counts is None else counts
    classes = [1] if num_classes == 2 else range(num_classes)
    out: dict[str, list[np.ndarray]] = {"sensitivity": [], "specificity": [], "ppv": [], "npv": []}
    for c in classes:
        truth, said = labels == c, preds == c
        tp, fn = counts @ (truth & said), counts @ (truth & ~said)
        tn, fp = counts @ (~truth & ~said), counts @ (~truth & said)
        with np.errstate(invalid="ignore", divide="ignore"):
            out["sensitivity"].append(tp / (tp + fn))
            out["specificity"].append(tn / (tn + fp))
            out["ppv"].append(tp / (tp + fp))
            out["npv"].append(tn / (tn + fn))
    return {k: np.mean(v, axis=0) for k, v in out.items()}


RESAMPLED_AT_ONCE = 1 << 20  # drawn image indices held at once: memory flat in n and n_boot


def resample_counts(n: int, n_boot: int, seed: int) -> Iterator[np.ndarray]:
    """How often each of n images is drawn in each bootstrap resample, in blocks of rows
    (resamples, n). The draws are `default_rng(seed).integers(0, n, (n_boot, n))`, taken a
    block at a time from the same stream, so the CIs do not depend on the block size."""
    rng = np.random.default_rng(seed)
    rows = max(1, RESAMPLED_AT_ONCE // max(n, 1))
    for start in range(0, n_boot, rows):
        block = min(rows, n_boot - start)
        index = rng.integers(0, n, size=(block, n))
        index += np.arange(block)[:, None] * n  # row r's images at r*n ... r*n + n - 1
        yield np.bincount(index.ravel(), minlength=block * n).reshape(block, n)


def classification_metrics(
    labels: np.ndarray, probs: np.ndarray, threshold: float | None = None
) -> dict[str, float]:
    """acc, balanced_acc, auroc, auprc, f1, sensitivity, specificity, ppv, npv (defined ones).

    `threshold` (binary only) replaces argmax by `p(class 1) >= threshold`.
    """
    labels, num_classes = np.asarray(labels), probs.shape[1]
    preds = predictions(probs, threshold)
    present = np.unique(labels)
    metrics = {
        "acc": accuracy_score(labels, preds),
        "balanced_acc": balanced_accuracy_score(labels, preds),
        "f1": f1_score(
            labels,
            preds,
            average="binary" if num_classes == 2 else "macro",
            labels=None if num_classes == 2 else list(range(num_classes)),
            zero_division=0,
        ),
        "auroc": auroc(labels, probs)[0],
    }
    if num_classes == 2 and len(present) == 2:
        metrics["auprc"] = average_precision_score(labels, probs[:, 1])
    elif num_classes > 2 and len(present) == num_classes:
        onehot = np.eye(num_classes)[labels]
        metrics["auprc"] = average_precision_score(onehot, probs, average="macro")
    metrics.update({k: v[0] for k, v in rates(labels, preds, num_classes).items()})
    undefined = sorted(k for k, v in metrics.items() if not math.isfinite(v))
    undefined += [] if "auprc" in metrics else ["auprc"]
    if undefined:
        log.warning(
            "%s undefined on this split, left out (true classes present: %s, predicted: %s, "
            "of %d).",
            ", ".join(undefined),
            present.tolist(),
            np.unique(preds).tolist(),
            num_classes,
        )
    return {k: float(v) for k, v in metrics.items() if math.isfinite(v)}


def bootstrap_ci(
    labels: np.ndarray,
    probs: np.ndarray,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = 0.95,
    threshold: float | None = None,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap CIs (resampling images) for AUROC, sensitivity and specificity.

    Resamples where a metric is undefined (one class drawn) are dropped for that metric; a
    metric defined in no resample gets no CI. Seeded, so a run's CIs are reproducible.
    """
    labels, num_classes = np.asarray(labels), probs.shape[1]
    preds = predictions(probs, threshold)  # per image: resampling images resamples these
    blocks: dict[str, list[np.ndarray]] = {name: [] for name in CI_METRICS}
    for counts in resample_counts(len(labels), n_boot, seed):
        found = {"auroc": auroc(labels, probs, counts), **rates(labels, preds, num_classes, counts)}
        for name in CI_METRICS:
            blocks[name].append(found[name])
    values = {name: np.concatenate(v) for name, v in blocks.items()}
    alpha = (1 - level) / 2 * 100
    cis = {}
    for name in CI_METRICS:
        v = values[name][np.isfinite(values[name])]
        if len(v):
            low, high = np.percentile(v, [alpha, 100 - alpha])
            cis[name] = (float(low), float(high))
    return cis


def threshold_for_sensitivity(labels: np.ndarray, scores: np.ndarray, target: float) -> float:
    """The highest threshold t with sensitivity(score >= t) >= target, on these (val) labels.

    Highest, so specificity is as good as the target allows. Raises ValueError without positives.
    """
    positives = np.sort(np.asarray(scores)[np.asarray(labels) == 1])[::-1]
    if not len(positives):
        raise ValueError("no positive cases to set a sensitivity operating point on")
    k = math.ceil(target * len(positives) - 1e-9)  # positives that must score >= t
    return float(positives[max(k, 1) - 1])


def report(labels: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> str:
    """scikit-learn's per-class precision / recall / F1 / support table (argmax predictions)."""
    return classification_report(
        labels,
        predictions(probs),
        labels=list(range(len(class_names))),
        target_names=list(class_names),
        digits=4,
        zero_division=0,
    )


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts, rows = true class, columns = predicted class."""
    return confusion_matrix(labels, preds, labels=list(range(num_classes)))
