"""PNG figures of an evaluation. `matplotlib.figure.Figure` directly (no pyplot): no global
backend state, safe in worker threads and on machines without a display."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from medx.evaluation.calibration import Reliability

DPI = 100


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


def confusion_matrices(out_dir: Path, cm: np.ndarray, class_names: Sequence[str]) -> list[Path]:
    """Counts and row-normalised (per true class: the sensitivity of each class on the diagonal)."""
    paths = []
    with np.errstate(invalid="ignore"):
        normalised = cm / cm.sum(1, keepdims=True)
    for name, values, fmt in (
        ("confusion_matrix.png", cm, "d"),
        ("confusion_matrix_normalised.png", np.nan_to_num(normalised), ".2f"),
    ):
        fig = Figure(figsize=(1.2 * len(class_names) + 2.5, 1.1 * len(class_names) + 2))
        ax = fig.subplots()
        ax.imshow(values, cmap="Blues")
        ticks = range(len(class_names))
        ax.set(xticks=ticks, yticks=ticks, xlabel="predicted", ylabel="true")
        ax.set_xticklabels(class_names, rotation=30, ha="right")
        ax.set_yticklabels(class_names)
        top = values.max() if values.size else 0
        for (i, j), v in np.ndenumerate(values):
            colour = "white" if v > top / 2 else "black"
            ax.text(j, i, format(v, fmt), ha="center", va="center", color=colour)
        ax.set_title("Confusion matrix" + (" (row-normalised)" if fmt != "d" else ""))
        paths.append(_save(fig, out_dir / name))
    return paths


def roc_pr_curves(
    out_dir: Path,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    threshold: float | None = None,
) -> list[Path]:
    """ROC and PR curves (one-vs-rest per class if multi-class); the operating point marked."""
    classes = [1] if probs.shape[1] == 2 else list(range(probs.shape[1]))
    roc, pr = Figure(figsize=(5, 5)), Figure(figsize=(5, 5))
    ax_roc, ax_pr = roc.subplots(), pr.subplots()
    for c in classes:
        truth = np.asarray(labels) == c
        if truth.all() or not truth.any():
            continue  # undefined for this class on this split
        fpr, tpr, _ = roc_curve(truth, probs[:, c])
        precision, recall, _ = precision_recall_curve(truth, probs[:, c])
        ax_roc.plot(fpr, tpr, label=class_names[c])
        ax_pr.plot(recall, precision, label=class_names[c])
        if threshold is not None:
            said = probs[:, c] >= threshold
            sens, fpr_op = said[truth].mean(), said[~truth].mean()
            ppv = said[truth].sum() / max(said.sum(), 1)
            mark = f"operating point (t={threshold:.3f})"
            ax_roc.plot(fpr_op, sens, "o", color="red", label=mark)
            ax_pr.plot(sens, ppv, "o", color="red", label=mark)
    ax_roc.plot([0, 1], [0, 1], ":", color="grey")
    ax_roc.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC", xlim=(0, 1))
    ax_pr.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision-recall")
    for ax in (ax_roc, ax_pr):
        ax.legend(loc="lower right" if ax is ax_roc else "lower left", fontsize=8)
    return [_save(roc, out_dir / "roc_curve.png"), _save(pr, out_dir / "pr_curve.png")]


def reliability_diagram(path: Path, curves: Mapping[str, Reliability]) -> Path:
    """Accuracy against confidence per bin, one panel per curve (e.g. before / after scaling)."""
    fig = Figure(figsize=(4.5 * len(curves), 4.5))
    axes = np.atleast_1d(fig.subplots(1, len(curves)))
    for ax, (title, rel) in zip(axes, curves.items(), strict=True):
        width = np.diff(rel.edges)
        ax.bar(
            rel.edges[:-1],
            np.nan_to_num(rel.accuracy),
            width,
            align="edge",
            edgecolor="black",
            alpha=0.7,
            label="accuracy",
        )
        ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence", ylabel="accuracy")
        ax.set_title(f"{title}: ECE {rel.ece:.3f}, MCE {rel.mce:.3f}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def training_curves(path: Path, history: Mapping[str, Sequence[tuple[int, float]]]) -> Path:
    """Losses in one panel, other metrics (val/auroc, val/acc, ...) in another, by step."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key, points in sorted(history.items()):
        steps, values = zip(*points, strict=True) if points else ((), ())
        ax = ax_loss if key.endswith("loss") else ax_metric
        ax.plot(steps, values, marker="o", markersize=3, label=key)
    ax_loss.set(xlabel="step", ylabel="loss", title="Loss")
    ax_metric.set(xlabel="step", title="Validation metrics")
    for ax in (ax_loss, ax_metric):
        ax.legend(fontsize=8)
    return _save(fig, path)
