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
from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata
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


def auroc(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """AUROC per row of (B, n) resampled labels; probs (B, n, K). Macro one-vs-rest if K > 2.

    Mann-Whitney form (mean rank of positives), ties counted half, as scikit-learn does; NaN for
    a row (or, when multi-class, a class) that lacks positives or negatives.
    """
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


def rates(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> dict[str, np.ndarray]:
    """Sensitivity, specificity, PPV, NPV per row of (B, n) arrays; macro over classes if K > 2.

    A rate whose denominator is empty (e.g. sensitivity without positives) is NaN.
    """
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
        "auroc": auroc(labels[None], probs[None])[0],
    }
    if num_classes == 2 and len(present) == 2:
        metrics["auprc"] = average_precision_score(labels, probs[:, 1])
    elif num_classes > 2 and len(present) == num_classes:
        onehot = np.eye(num_classes)[labels]
        metrics["auprc"] = average_precision_score(onehot, probs, average="macro")
    metrics.update({k: v[0] for k, v in rates(labels[None], preds[None], num_classes).items()})
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
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(labels), size=(n_boot, len(labels)))
    y, p = labels[index], probs[index]
    values = {"auroc": auroc(y, p)}
    values.update(
        rates(
            y,
            predictions(p.reshape(-1, probs.shape[1]), threshold).reshape(y.shape),
            probs.shape[1],
        )
    )
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
