"""PNG figures of an evaluation. `matplotlib.figure.Figure` directly (no pyplot): no global
backend state, safe in worker threads and on machines without a display.

Every figure medx writes goes through `save_figure`, which keeps all its text on the canvas:
a title wider than its panel grows the canvas instead of being cut at the image edge. Each
writer has a `*_figure` builder (tests/evaluation/test_figures.py checks them all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import precision_recall_curve, roc_curve

from medx.evaluation.calibration import Reliability

DPI = 100
MARGIN = 0.05  # inches kept free around the text when the canvas has to grow


def overflow(fig: Figure) -> tuple[float, float, float, float]:
    """How far (inches) the figure's drawn content, text included, reaches past the canvas on
    the left, bottom, right and top (0 where it stays inside)."""
    box = fig.get_tightbbox(FigureCanvasAgg(fig).get_renderer())
    width, height = fig.get_size_inches()
    return (
        max(0.0, -box.x0),
        max(0.0, -box.y0),
        max(0.0, box.x1 - width),
        max(0.0, box.y1 - height),
    )


def fit_text(fig: Figure) -> Figure:
    """Lay the figure out (tight_layout); if text still reaches past the canvas (a title wider
    than its panel), widen or heighten the canvas by that much, the panels keeping their size
    and place relative to the text."""
    fig.tight_layout()
    left, bottom, right, top = overflow(fig)
    if max(left, bottom, right, top) == 0:
        return fig
    pad_x = MARGIN if left or right else 0.0
    pad_y = MARGIN if bottom or top else 0.0
    width, height = fig.get_size_inches()
    grown_w = width + left + right + 2 * pad_x
    grown_h = height + bottom + top + 2 * pad_y
    p = fig.subplotpars
    shift_x, shift_y = left + pad_x, bottom + pad_y
    fig.set_size_inches(grown_w, grown_h)
    fig.subplots_adjust(  # the same panels in inches, moved off the edges
        left=(p.left * width + shift_x) / grown_w,
        right=(p.right * width + shift_x) / grown_w,
        bottom=(p.bottom * height + shift_y) / grown_h,
        top=(p.top * height + shift_y) / grown_h,
    )
    return fig


def save_figure(fig: Figure, path: Path, dpi: int = DPI) -> Path:
    """Write `fig` as a PNG with all its text inside the image (`fit_text`)."""
    fit_text(fig).savefig(path, dpi=dpi)
    return path


def confusion_matrices(out_dir: Path, cm: np.ndarray, class_names: Sequence[str]) -> list[Path]:
    """Counts and row-normalised (per true class: the sensitivity of each class on the diagonal)."""
    with np.errstate(invalid="ignore"):
        normalised = cm / cm.sum(1, keepdims=True)
    return [
        save_figure(confusion_figure(cm, class_names, "d"), out_dir / "confusion_matrix.png"),
        save_figure(
            confusion_figure(np.nan_to_num(normalised), class_names, ".2f"),
            out_dir / "confusion_matrix_normalised.png",
        ),
    ]


def confusion_figure(values: np.ndarray, class_names: Sequence[str], fmt: str) -> Figure:
    """One confusion matrix: counts (`fmt` "d") or rates (".2f")."""
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
    return fig


def roc_pr_curves(
    out_dir: Path,
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    threshold: float | None = None,
) -> list[Path]:
    """ROC and PR curves (one-vs-rest per class if multi-class); the operating point marked."""
    roc, pr = roc_pr_figures(labels, probs, class_names, threshold)
    return [save_figure(roc, out_dir / "roc_curve.png"), save_figure(pr, out_dir / "pr_curve.png")]


def roc_pr_figures(
    labels: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    threshold: float | None = None,
) -> tuple[Figure, Figure]:
    """The ROC figure and the precision-recall figure of `roc_pr_curves`."""
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
    return roc, pr


def reliability_diagram(path: Path, curves: Mapping[str, Reliability]) -> Path:
    """Accuracy against confidence per bin, one panel per curve (e.g. before / after scaling)."""
    return save_figure(reliability_figure(curves), path)


def reliability_figure(curves: Mapping[str, Reliability]) -> Figure:
    """The panels of `reliability_diagram`: the curve's name over its ECE and MCE."""
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
        ax.set_title(f"{title}\nECE {rel.ece:.3f}, MCE {rel.mce:.3f}", fontsize=10)
        ax.legend(loc="upper left", fontsize=8)
    return fig


def training_curves(path: Path, history: Mapping[str, Sequence[tuple[int, float]]]) -> Path:
    """Losses in one panel, other metrics (val/auroc, val/acc, ...) in another, by epoch."""
    return save_figure(training_curves_figure(history), path)


def training_curves_figure(history: Mapping[str, Sequence[tuple[int, float]]]) -> Figure:
    """The panels of `training_curves`; `history`: (epoch, value) pairs per metric (medx's
    MLflow runs step their metrics by epoch)."""
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_metric = fig.subplots(1, 2)
    for key, points in sorted(history.items()):
        steps, values = zip(*points, strict=True) if points else ((), ())
        ax = ax_loss if key.endswith("loss") else ax_metric
        ax.plot(steps, values, marker="o", markersize=3, label=key)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_metric.set(xlabel="epoch", title="Validation metrics")
    for ax in (ax_loss, ax_metric):
        ax.legend(fontsize=8)
    return fig


def ranking_figure(
    labels: Sequence[str],
    values: Sequence[float],
    metric: str,
    low: Sequence[float] | None = None,
    high: Sequence[float] | None = None,
) -> Figure:
    """Horizontal bars of `metric`, one per run, best on top; the 95% CI as error bars when
    given (medx.compare)."""
    values = np.asarray(values, dtype=float)
    fig = Figure(figsize=(7, 0.4 * len(values) + 1.5))
    ax = fig.subplots()
    err = None
    if low is not None and high is not None:
        below = np.clip(np.nan_to_num(values - np.asarray(low, dtype=float)), 0, None)
        above = np.clip(np.nan_to_num(np.asarray(high, dtype=float) - values), 0, None)
        err = [below, above]
    ax.barh(list(labels), values, xerr=err, color="tab:blue", capsize=3)
    ax.invert_yaxis()  # best on top
    ax.set_xlabel(metric)
    return fig
